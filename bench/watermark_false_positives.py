"""Watermark false positives (issue 26, part 4): detection on unmarked images that share nothing with the marked set.

The set, generated deterministically each run (no image files are kept):

* **procedural**: white and smooth colour noise, checkerboards and stripes of many periods (8 to 256 px, so
  including ``fluxframe-ss``'s 128 px tile period and its multiples), linear and radial gradients, random shapes,
  flat colours, each at several sizes from 256×256 to 1024×1024 and odd aspect ratios, seeds of their own;
* **demo**: outputs of the demo model (``configs/demo.toml``, safety and provenance off, so unmarked) at 256²
  for captions of its vocabulary and seeds of their own;
* **tiny**: outputs of the ``tiny`` FLUX.2 preset (random weights) at 256² and 320×256;
* **photos**: the scikit-image images that ``tests/robustness.py.marked_set`` does not use (``page``, ``text``,
  ``microaneurysms``, ``logo``, ``horse``, ``binary_blobs``, ``shepp_logan_phantom``, ``checkerboard``; not
  ``cat``, which is ``chelsea`` of the marked set), each cut at several boxes and sizes.

Each image is read the way ``fluxframe verify`` reads it: ``fluxframe-rs`` and ``fluxframe-ss`` looking for
fluxframe's message, ``dwtDct`` for every message of ``watermark.KNOWN_MESSAGES``. Reported per method and per
source: the images read, the false positives (any image claimed), the highest score against the threshold
(``fluxframe-rs`` / ``-ss``: the sync confidence, threshold ``CONFIDENCE_THRESHOLD`` of ``lattice`` / ``robust``,
and how many images the BCH code decoded to any message at all; ``dwtDct``: the bit agreement, threshold
``watermark.THRESHOLD``) and the false-match probability from the decision rule (see ``probabilities``).

    .venv/bin/python bench/watermark_false_positives.py               # markdown, ~520 images
    .venv/bin/python bench/watermark_false_positives.py --demo 0 --tiny 0 --json
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import time
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # timing, when imported by a test
from timing import timed_report  # noqa: E402

from fluxframe.provenance import lattice, robust  # noqa: E402
from fluxframe.provenance import watermark as wm  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SEED = 26_000  # seeds of this set: none of the marked set's (0) or of unmarked_set's (1-3)
METHODS = (wm.LATTICE_METHOD, wm.ROBUST_METHOD, "dwtDct")
SIZES = [(256, 256), (1024, 1024), (512, 512), (384, 256), (640, 480), (300, 700), (768, 768), (1000, 560)]
#: scikit-image images that tests/robustness.py's marked set does not use (cat is chelsea, so it is left out).
PHOTOS = ("page", "text", "microaneurysms", "logo", "horse", "binary_blobs", "shepp_logan_phantom", "checkerboard")
PHOTO_BOXES = [(0, 0, 1, 1), (0.1, 0.1, 0.9, 0.9), (0, 0, 0.6, 0.6), (0.4, 0.4, 1, 1), (0.2, 0, 0.8, 1)]
PHOTO_SIZES = [(256, 256), (512, 512), (1024, 1024), (640, 400), (384, 576)]
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
PLACES = ("in the centre", "on the left", "on the right", "at the top", "at the bottom")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procedural", type=int, default=380, help="procedural images")
    p.add_argument("--demo", type=int, default=60, help="demo-model outputs (256²)")
    p.add_argument("--demo-steps", type=int, default=12, help="sampling steps of the demo outputs")
    p.add_argument("--tiny", type=int, default=40, help="tiny-preset outputs")
    p.add_argument("--photos", type=int, default=len(PHOTOS) * len(PHOTO_BOXES), help="photo cuts (at most 40)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--markdown", action="store_true", help="print markdown (the default without --json)")
    return p.parse_args(argv)


# --- the images -------------------------------------------------------------------------------------------------


def procedural(kind: str, size: tuple[int, int], seed: int) -> Image.Image:
    """One procedural image: "noise" (white colour noise), "smooth" (noise blurred by upsampling), "checker",
    "stripes" (any angle), "gradient" (linear), "radial", "shapes", "flat"."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    colours = rng.integers(0, 256, (2, 3)).astype(np.float64)
    if kind == "noise":
        rgb = rng.normal(rng.uniform(60, 190), rng.uniform(5, 60), (height, width, 3))
    elif kind == "smooth":
        cells = int(rng.integers(3, 40))
        small = rng.integers(0, 256, (cells, max(2, cells * width // height), 3), dtype=np.uint8)
        return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    elif kind in ("checker", "stripes"):
        period = int(rng.choice([8, 16, 32, 64, 96, 128, 256, 17, 45]))
        if kind == "checker":
            on = ((x // period + y // period) % 2)[..., None]
        else:
            angle = rng.uniform(0, np.pi)
            on = (np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period) > 0)[..., None]
        rgb = colours[0] * on + colours[1] * (1 - on)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = (x * np.cos(angle) + y * np.sin(angle))
        t = ((t - t.min()) / (np.ptp(t) or 1.0))[..., None]
        rgb = colours[0] * t + colours[1] * (1 - t)
    elif kind == "radial":
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        t = np.hypot(x - cx, y - cy)
        t = (t / (t.max() or 1.0))[..., None]
        rgb = colours[0] * t + colours[1] * (1 - t)
    elif kind == "shapes":
        image = Image.new("RGB", size, tuple(int(c) for c in colours[0]))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 40))):
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            w, h = int(rng.integers(8, width // 2)), int(rng.integers(8, height // 2))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + w, y0 + h), fill=fill)
        return image
    elif kind == "flat":
        rgb = np.broadcast_to(colours[0], (height, width, 3))
    else:
        raise ValueError(f"unknown procedural kind {kind!r}")
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


PROCEDURAL = ("noise", "smooth", "checker", "stripes", "gradient", "radial", "shapes", "flat")


def procedural_set(count: int) -> Iterator[tuple[str, Image.Image]]:
    for i in range(count):
        kind, size = PROCEDURAL[i % len(PROCEDURAL)], SIZES[(i // len(PROCEDURAL)) % len(SIZES)]
        yield f"{kind} {size[0]}x{size[1]} seed {SEED + i}", procedural(kind, size, SEED + i)


def photo_set(count: int) -> Iterator[tuple[str, Image.Image]]:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import robustness as rb

    used = set(rb.COLOUR_PHOTOS + rb.GREY_PHOTOS)
    cuts = [(name, box, size) for name in PHOTOS for box, size in zip(PHOTO_BOXES, PHOTO_SIZES, strict=True)]
    assert not used & set(PHOTOS), "the false-positive photos must not be in the marked set"
    for name, box, size in cuts[:count]:
        image = _binary(name, size, box) if name in ("horse", "binary_blobs") else rb.photo(name, size, box)
        yield f"{name} {box} {size[0]}x{size[1]}", image


def _binary(name: str, size, box) -> Image.Image:
    """scikit-image's boolean images (horse, binary_blobs) as black and white RGB, cut and resized."""
    from skimage import data

    image = Image.fromarray((getattr(data, name)().astype(np.uint8) * 255)).convert("RGB")
    width, height = image.size
    image = image.crop((round(box[0] * width), round(box[1] * height), round(box[2] * width), round(box[3] * height)))
    return image.resize(size, Image.Resampling.LANCZOS)


def captions() -> Iterator[str]:
    """Demo captions in a fixed shuffled order."""
    combos = list(itertools.product(("small", "large"), COLOURS, SHAPES, PLACES, COLOURS))
    order = np.random.default_rng(SEED).permutation(len(combos))
    for index in order:
        size, colour, shape, place, background = combos[index]
        if background != colour:
            yield f"a {size} {colour} {shape} {place}, on a {background} background"


def demo_set(count: int, steps: int) -> Iterator[tuple[str, Image.Image]]:
    if count <= 0:
        return
    from pathlib import Path

    from fluxframe import api

    config = api.load_config(Path(ROOT) / "configs" / "demo.toml").model_copy(update={"safety": None,
                                                                                      "provenance": None})
    pipeline = api.load(config)
    for i, caption in zip(range(count), captions(), strict=False):
        result = pipeline.generate(api.GenerationRequest(prompt=caption, seed=SEED + i, steps=steps), write=False)
        yield f"demo seed {SEED + i}: {caption}", result.image


def tiny_set(count: int) -> Iterator[tuple[str, Image.Image]]:
    if count <= 0:
        return
    from fluxframe import api

    pipelines = {size: api.load(api.parse_config({"model": {"preset": "tiny", "dtype": "float32", "device": "cpu"},
                                                  "sampler": {"steps": 4, "width": size[0], "height": size[1]}}))
                 for size in ((256, 256), (320, 256))}
    prompts = ("a cat", "a lighthouse at dusk", "an empty room", "a bowl of fruit", "a city street in the rain")
    for i in range(count):
        size = (256, 256) if i % 2 == 0 else (320, 256)
        prompt = prompts[i % len(prompts)]
        result = pipelines[size].generate(api.GenerationRequest(prompt=prompt, seed=SEED + i), write=False)
        yield f"tiny {size[0]}x{size[1]} seed {SEED + i}: {prompt}", result.image


def sources(args) -> dict[str, Iterator[tuple[str, Image.Image]]]:
    return {"procedural": procedural_set(args.procedural), "demo": demo_set(args.demo, args.demo_steps),
            "tiny": tiny_set(args.tiny), "photos": photo_set(args.photos)}


# --- detection --------------------------------------------------------------------------------------------------


def score(method: str, image) -> dict:
    """verify's reading of one image: ``{"detected", "score", "decoded"}`` (``decoded``: fluxframe-ss only, whether
    the BCH code decoded the word read at the best period to some message at all, whatever the confidence)."""
    if method in wm.TILED:
        found = wm.match(image, {"fluxframe": wm.FLUXFRAME_MESSAGE}, method=method)
        # match drops the decoded message under the confidence threshold: read the word itself for "decoded".
        word = wm.TILED[method].read(np.asarray(image.convert("RGB")), {len(wm.FLUXFRAME_MESSAGE)})["words"].get(
            len(wm.FLUXFRAME_MESSAGE))
        return {"detected": bool(found["detected"]), "score": found["confidence"],
                "decoded": word is not None and word["message"] is not None}
    found = wm.match(image, wm.KNOWN_MESSAGES, method=method)
    return {"detected": bool(found["detected"]), "score": found["agreement"], "decoded": None}


def probabilities() -> dict[str, dict]:
    """False-match probability of one unmarked image under each method's decision rule, bits taken as fair coins.

    ``dwtDct``: ``match`` claims a message when at least 90 % of its bits agree (44 of 48, 42 of 46) under any of
    len + 1 decision cuts and 2 readings; ``watermark.false_match_probability`` bounds that per message, summed
    here over ``KNOWN_MESSAGES``. ``fluxframe-ss``: the BCH-corrected word must equal fluxframe's 48-bit message,
    i.e. the read word must lie within the code's correction radius of that message's codeword
    (``watermark.robust_false_match_probability``); the sync confidence ≥ ``CONFIDENCE_THRESHOLD`` comes on top
    and is not counted (its distribution on unmarked images is measured, not modelled).
    """
    dwt = sum(wm.false_match_probability(len(bits)) for bits in wm.KNOWN_MESSAGES.values())
    code = robust._bch(len(wm.FLUXFRAME_MESSAGE))
    return {
        "dwtDct": {"probability": dwt, "rule": "≥ 90 % of the bits of a known message (44/48 or 42/46), best of "
                                               "len+1 cuts × 2 readings, summed over the 2 known messages"},
        wm.ROBUST_METHOD: {"probability": wm.robust_false_match_probability(len(wm.FLUXFRAME_MESSAGE)),
                           "rule": f"BCH word of {len(wm.FLUXFRAME_MESSAGE) + code.ecc_bits} bits within "
                                   f"{code.t} errors of fluxframe's codeword, and sync confidence ≥ "
                                   f"{robust.CONFIDENCE_THRESHOLD} (not counted)"},
        wm.LATTICE_METHOD: {"probability": wm.lattice_false_match_probability(len(wm.FLUXFRAME_MESSAGE)),
                            "rule": f"BCH word of {len(wm.FLUXFRAME_MESSAGE) + code.ecc_bits} bits within "
                                    f"{code.t} + {lattice._CHASE} errors (Chase decoding) of fluxframe's codeword, "
                                    f"in any of up to {lattice.READINGS} words read on different lattices, "
                                    f"and sync confidence ≥ {lattice.CONFIDENCE_THRESHOLD} (not counted)"},
    }


def run(sets: dict[str, Iterator[tuple[str, Image.Image]]], methods) -> dict:
    """The figures: per method, overall and per source, images, false positives (names), highest score, and for
    fluxframe-ss how many words decoded to any message; per source the images and the seconds spent."""
    thresholds = {wm.LATTICE_METHOD: lattice.CONFIDENCE_THRESHOLD, wm.ROBUST_METHOD: robust.CONFIDENCE_THRESHOLD,
                  "dwtDct": wm.THRESHOLD}
    per = {m: {"threshold": thresholds[m], "images": 0, "false_positives": [], "highest": None, "highest_image": None,
               "decoded_any": 0, "sources": {}} for m in methods}
    generation = {}
    for source, images in sets.items():
        started, count = time.perf_counter(), 0
        for name, image in images:
            count += 1
            for method in methods:
                found = score(method, image)
                entry = per[method]
                src = entry["sources"].setdefault(source, {"images": 0, "false_positives": 0, "highest": None})
                entry["images"] += 1
                src["images"] += 1
                entry["decoded_any"] += bool(found["decoded"])
                if found["detected"]:
                    entry["false_positives"].append(f"{source}: {name}")
                    src["false_positives"] += 1
                if found["score"] is not None:
                    if src["highest"] is None or found["score"] > src["highest"]:
                        src["highest"] = found["score"]
                    if entry["highest"] is None or found["score"] > entry["highest"]:
                        entry["highest"], entry["highest_image"] = found["score"], f"{source}: {name}"
        generation[source] = {"images": count, "seconds": time.perf_counter() - started}  # generating + reading
    probs = probabilities()
    for method in methods:
        per[method]["false_match_probability"] = probs[method]
    return {"methods": per, "sources": generation}


def markdown(figures: dict) -> str:
    lines = []
    total = next(iter(figures["methods"].values()))["images"] if figures["methods"] else 0
    parts = ", ".join(f"{s} {g['images']}" for s, g in figures["sources"].items())
    lines.append(f"{total} unmarked images ({parts}).\n")
    lines.append("| method | images | false positives | highest score | threshold | false-match probability |")
    lines.append("|---|---|---|---|---|---|")
    for method, entry in figures["methods"].items():
        label = "sync confidence" if method in wm.TILED else "bit agreement"
        highest = "–" if entry["highest"] is None else f"{entry['highest']:.2f}"
        p = entry["false_match_probability"]["probability"]
        lines.append(f"| {method} | {entry['images']} | {len(entry['false_positives'])} | {label} {highest} "
                     f"({entry['highest_image']}) | {entry['threshold']} | {p:.1e} |")
    lines.append("")
    lines.append("| source | " + " | ".join(f"{m} highest | {m} FP" for m in figures["methods"]) + " |")
    lines.append("|---|" + "---|---|" * len(figures["methods"]))
    for source, gen in figures["sources"].items():
        row = []
        for entry in figures["methods"].values():
            src = entry["sources"].get(source, {"highest": None, "false_positives": 0})
            row += ["–" if src["highest"] is None else f"{src['highest']:.2f}", str(src["false_positives"])]
        lines.append(f"| {source} ({gen['images']}) | " + " | ".join(row) + " |")
    lines.append("")
    for method, entry in figures["methods"].items():
        rule = entry["false_match_probability"]["rule"]
        extra = (f"; BCH decoded to some message on {entry['decoded_any']} of {entry['images']}"
                 if method in wm.TILED else "")
        lines.append(f"* {method}: rule {rule}{extra}.")
        for name in entry["false_positives"]:
            lines.append(f"  * FALSE POSITIVE: {name}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    logging.disable(logging.WARNING)
    figures = timed_report(lambda: run(sources(args), args.methods), markdown, as_json=args.json)
    return 1 if any(e["false_positives"] for e in figures["methods"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
