"""The IP filter: protected names (characters, brands, public persons) matched fuzzily in prompts, and a
registry of protected reference images matched by perceptual hash against input images and outputs.

Names are compared after the same normalisation the prompt filter uses (case, look-alikes, accents,
leetspeak, punctuation), as whole windows of prompt words, with and without the spaces between them.
Images are compared by 64-bit pHash (imagehash.phash); each reference is also hashed mirrored and
centre-cropped to 90 % and 80 %, so flipped or slightly cropped copies still match.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fluxframe.core.interfaces import Filter, Verdict
from fluxframe.errors import ConfigError
from fluxframe.safety import options as opt
from fluxframe.safety.normalize import views, word_view

NAME = "ip"
TARGETS = frozenset({"prompt", "negative_prompt", "upsampled_prompt", "input_image", "output_image"})
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
OPTIONS = ("names", "names_file", "images_dir", "hashes_file", "name_threshold", "image_distance")
SHORT_NAME = 4  # names of at most this many letters (spaces removed) must match exactly


def phash(image: Any) -> int:
    """64-bit perceptual hash as an int (imagehash.phash's bits, in its hex order)."""
    import imagehash

    return int(str(imagehash.phash(image)), 16)


def reference_hashes(image: Any) -> list[int]:
    """Hashes a protected image is registered under: as is, mirrored, and centre crops of 90 % and 80 %."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    variants = [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    for keep in (0.9, 0.8):
        dx, dy = round(w * (1 - keep) / 2), round(h * (1 - keep) / 2)
        if w - 2 * dx >= 8 and h - 2 * dy >= 8:
            variants.append(image.crop((dx, dy, w - dx, h - dy)))
    return list(dict.fromkeys(phash(v) for v in variants))


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x) if hasattr(np, "bitwise_count") else np.array([bin(int(v)).count("1") for v in x])


@dataclass(frozen=True)
class ProtectedName:
    label: str  # as the deployer wrote it
    spaced: str  # normalised, words separated by one space
    compact: str  # normalised, no spaces
    words: int


class IPFilter(Filter):
    name = NAME
    version = "1.0"
    targets = TARGETS

    def __init__(self, *, base_dir: str | Path | None = None, **options: Any):
        opt.reject_unknown(NAME, options, OPTIONS)
        self.name_threshold = opt.number(NAME, "name_threshold", options.get("name_threshold", 0.88), low=0.5,
                                         high=1.0)
        self.image_distance = int(opt.number(NAME, "image_distance", options.get("image_distance", 8), low=0,
                                             high=24))
        if isinstance(options.get("image_distance", 8), float):
            raise ConfigError("must be a whole number of bits", key=opt.key(NAME, "image_distance"))

        labels: list[str] = []
        if "names" in options:
            labels += opt.string_list(NAME, "names", options["names"])
        if "names_file" in options:
            path = opt.path(NAME, "names_file", options["names_file"], base_dir)
            for line in path.read_text(encoding="utf-8").splitlines():
                line = line.split("#", 1)[0].strip()
                labels += [part.strip() for part in line.split("|") if part.strip()]
        self.names: list[ProtectedName] = []
        for label in dict.fromkeys(labels):
            spaced = word_view(label)
            if not spaced:
                raise ConfigError(f"protected name {label!r} has no letters or digits", key=opt.key(NAME, "names"))
            self.names.append(ProtectedName(label, spaced, spaced.replace(" ", ""), spaced.count(" ") + 1))

        refs: list[tuple[int, str]] = []
        if "images_dir" in options:
            folder = opt.path(NAME, "images_dir", options["images_dir"], base_dir, kind="dir")
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}",
                                  key=opt.key(NAME, "images_dir"))
            from PIL import Image

            for file in files:
                try:
                    with Image.open(file) as im:
                        im.load()
                        if np.asarray(im.convert("L")).std() < 1.0:
                            raise ConfigError(f"{file.name} is a flat image: its hash would match any flat image",
                                              key=opt.key(NAME, "images_dir"))
                        refs += [(h, file.name) for h in reference_hashes(im)]
                except ConfigError:
                    raise
                except Exception as exc:
                    raise ConfigError(f"cannot read protected image {file}: {exc}",
                                      key=opt.key(NAME, "images_dir")) from None
        if "hashes_file" in options:
            path = opt.path(NAME, "hashes_file", options["hashes_file"], base_dir)
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                value, _, label = line.partition(" ")
                try:
                    if len(value) != 16:
                        raise ValueError
                    refs.append((int(value, 16), label.strip() or f"{path.name}:{number}"))
                except ValueError:
                    raise ConfigError(f"{path}:{number}: expected a 16-digit hex pHash, then a label",
                                      key=opt.key(NAME, "hashes_file")) from None
        if not self.names and not refs:
            raise ConfigError("nothing to protect: give names, names_file, images_dir or hashes_file",
                              key=opt.key(NAME, "names"))
        self.hashes = np.array([h for h, _ in refs], dtype=np.uint64)
        self.hash_labels = [label for _, label in refs]
        digest = hashlib.sha256()
        for n in self.names:
            digest.update(n.spaced.encode() + b"\n")
        digest.update(self.hashes.tobytes())
        self.version = f"1.0+names.{len(self.names)}+images.{len(set(self.hash_labels))}.{digest.hexdigest()[:12]}"
        self._by_words: dict[int, list[ProtectedName]] = {}
        for n in self.names:
            self._by_words.setdefault(n.words, []).append(n)

    # -- names ----------------------------------------------------------------------------------

    def best_name(self, text: str) -> tuple[float, ProtectedName | None]:
        """The highest similarity (0-1) of any protected name with any window of the prompt's words."""
        from rapidfuzz import fuzz, process

        best, best_name = 0.0, None
        readings = views(text)
        for count, names in self._by_words.items():
            windows: set[str] = set()
            for reading in readings:
                words = reading.split()
                for size in {max(1, count - 1), count, count + 1}:
                    for i in range(0, max(0, len(words) - size) + 1):
                        windows.add(" ".join(words[i:i + size]))
            if not windows:
                continue
            windows_list = sorted(windows)
            compact = [w.replace(" ", "") for w in windows_list]
            long_names = [n for n in names if len(n.compact) > SHORT_NAME]
            for n in names:
                if len(n.compact) <= SHORT_NAME and n.compact in compact:
                    return 1.0, n
            if not long_names:
                continue
            spaced_scores = process.cdist(windows_list, [n.spaced for n in long_names], scorer=fuzz.ratio,
                                          dtype=np.uint8, workers=1)
            compact_scores = process.cdist(compact, [n.compact for n in long_names], scorer=fuzz.ratio,
                                           dtype=np.uint8, workers=1)
            scores = np.maximum(spaced_scores, compact_scores)
            i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
            if scores[i, j] / 100 > best:
                best, best_name = float(scores[i, j]) / 100, long_names[j]
        return best, best_name

    def check_prompt(self, text: str, target: str = "prompt") -> Verdict:
        if not isinstance(text, str):
            raise TypeError(f"prompt text must be a str, got {type(text).__name__}")
        if not self.names:
            return Verdict(self.name, self.version, True, target, {}, None, "no protected names configured")
        score, match = self.best_name(text)
        scores = {"protected_name": round(score, 4)}
        if match is not None and score >= self.name_threshold:
            return Verdict(self.name, self.version, False, target, scores, self.name_threshold,
                           f"protected name {match.label!r} (similarity {score:.2f} >= {self.name_threshold:.2f})",
                           action="block")
        return Verdict(self.name, self.version, True, target, scores, self.name_threshold,
                       f"no protected name (best similarity {score:.2f})")

    # -- images ---------------------------------------------------------------------------------

    def check_image(self, image: Any, target: str = "output_image") -> Verdict:
        if not len(self.hashes):
            return Verdict(self.name, self.version, True, target, {}, None, "no protected images configured")
        h = np.uint64(phash(image))
        distances = _popcount(self.hashes ^ h)
        i = int(np.argmin(distances))
        distance = int(distances[i])
        similarity = 1.0 - distance / 64
        threshold = 1.0 - self.image_distance / 64
        scores = {"protected_image": round(similarity, 4)}
        if distance <= self.image_distance:
            return Verdict(self.name, self.version, False, target, scores, threshold,
                           f"matches protected image {self.hash_labels[i]!r} (pHash distance {distance} <= "
                           f"{self.image_distance})", action="block")
        return Verdict(self.name, self.version, True, target, scores, threshold,
                       f"no protected image (nearest pHash distance {distance} > {self.image_distance})")
