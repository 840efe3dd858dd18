"""Provenance cost and watermark robustness.

(a) Time added per 1024² image, median of ``--runs`` runs after a warm-up, by the two postprocessors as the
    runner calls them: the watermark's process_image (embed with fluxframe's vectorised encoder — the library's
    own is timed for comparison — and read the mark back) and process_file (re-read lossy files to record
    whether the mark survived the encoding), and C2PASigner.process_file (sign into a second temporary file,
    rename) for a PNG and a JPEG; then verify() of each. Encoding the image is not counted: it happens with or
    without provenance.
(b) dwtDct robustness: bit accuracy (fraction of the 48 bits of fluxframe's message that come back, 0.5 =
    chance) as invisible-watermark's stock decoder reads them, and how many images ``verify`` still finds
    marked (≥ 90 % agreement), after JPEG, WebP, resizing, cropping and on small images, averaged over
    natural photos from scikit-image.

    .venv/bin/python bench/provenance.py                 # markdown tables
    .venv/bin/python bench/provenance.py --runs 9 --json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from timing import median_ms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test images and helpers

from provenance_helpers import dev_signer, output_context  # noqa: E402
from robustness import photo  # noqa: E402

from fluxframe.provenance import watermark as wm  # noqa: E402
from fluxframe.provenance.verify import verify  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field", "retina")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7, help="timed runs per measurement (median reported)")
    p.add_argument("--size", type=int, default=1024, help="edge of the square image timed")
    p.add_argument("--photos", nargs="*", default=list(PHOTOS), help="scikit-image photos for robustness")
    p.add_argument("--method", default="dwtDct", choices=wm.METHODS[:2],
                   help="watermark method timed (the robustness part is dwtDct's; bench/watermark_robustness.py "
                        "measures fluxframe-ss)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p.parse_args()


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def timing(runs: int, size: int, method: str = "dwtDct") -> dict[str, float]:
    from imwatermark import WatermarkEncoder

    image = photo("astronaut", (size, size))
    marked, _ = wm.embed(image, wm.FLUXFRAME_MESSAGE, method)
    post = wm.WatermarkPostprocessor(method=method)
    library = WatermarkEncoder()
    library.set_watermark("bits", [int(b) for b in wm.FLUXFRAME_MESSAGE])
    bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
    context = output_context()
    out: dict[str, float] = {}
    out[f"watermark embed only (wm.embed, {method})"] = median_ms(
        lambda: wm.embed(image, wm.FLUXFRAME_MESSAGE, method), runs)
    out["watermark embed, invisible-watermark's encoder (comparison, not used)"] = median_ms(
        lambda: library.encode(bgr, "dwtDct"), runs)
    out["watermark process_image (embed + read-back check)"] = median_ms(lambda: post.process_image(image, context),
                                                                       runs)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        signer, paths = dev_signer(folder / "certs")
        for fmt, ext, media_type in (("PNG", "png", "image/png"), ("JPEG", "jpg", "image/jpeg")):
            data = encoded(marked, fmt)
            path = folder / f"out.{ext}"
            write_only = median_ms(lambda: path.write_bytes(data), runs)

            def check():
                path.write_bytes(data)
                post.process_file(path, media_type, context)

            def sign():
                path.write_bytes(data)
                signer.process_file(path, media_type, context)

            out[f"watermark process_file, {fmt} (re-read the encoded file)"] = max(
                0.0, median_ms(check, runs) - write_only)
            out[f"c2pa process_file, {fmt} (sign, no thumbnail)"] = max(0.0, median_ms(sign, runs) - write_only)
            out[f"total added per image, {fmt}"] = (out["watermark process_image (embed + read-back check)"]
                                                    + out[f"watermark process_file, {fmt} (re-read the encoded file)"]
                                                    + out[f"c2pa process_file, {fmt} (sign, no thumbnail)"])
            path.write_bytes(data)
            signer.process_file(path, media_type, context)
            out[f"verify {fmt} (manifest + watermark, incl. decoding the file)"] = median_ms(
                lambda: verify(path, trust=[paths["ca"]]), runs)
    return out


def _reopen(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def attacks(size: int) -> dict[str, callable]:
    half = size // 2
    cut = size // 20  # 5 % of the edge
    return {
        "clean (PNG)": lambda im: _reopen(encoded(im, "PNG")),
        "JPEG 95": lambda im: _reopen(encoded(im, "JPEG", quality=95)),
        "JPEG 90": lambda im: _reopen(encoded(im, "JPEG", quality=90)),
        "JPEG 75 (PIL default)": lambda im: _reopen(encoded(im, "JPEG", quality=75)),
        "JPEG 95, 4:4:4 chroma": lambda im: _reopen(encoded(im, "JPEG", quality=95, subsampling=0)),
        "JPEG 90, 4:4:4 chroma": lambda im: _reopen(encoded(im, "JPEG", quality=90, subsampling=0)),
        "JPEG 75, 4:4:4 chroma": lambda im: _reopen(encoded(im, "JPEG", quality=75, subsampling=0)),
        "WebP lossless": lambda im: _reopen(encoded(im, "WEBP", lossless=True)),
        "WebP 90": lambda im: _reopen(encoded(im, "WEBP", quality=90)),
        "resize to 50 %": lambda im: im.resize((half, half), Image.Resampling.LANCZOS),
        "resize to 50 % and back": lambda im: im.resize((half, half), Image.Resampling.LANCZOS).resize(
            (size, size), Image.Resampling.LANCZOS),
        "crop 10 % (5 % off each edge)": lambda im: im.crop((cut, cut, size - cut, size - cut)),
        "crop 10 % off the bottom": lambda im: im.crop((0, 0, size, size - 2 * cut)),
        "crop 10 % off the right": lambda im: im.crop((0, 0, size - 2 * cut, size)),
    }


def robustness(names: list[str], size: int = 1024) -> list[dict]:
    message = {"fluxframe": wm.FLUXFRAME_MESSAGE}
    rows: dict[str, dict[str, list]] = {}

    def record(condition: str, image: Image.Image | None, marked: bool = True) -> None:
        row = rows.setdefault(condition, {"accuracy": [], "detected": [], "n": 0})
        row["n"] += 1
        if image is None:
            return
        found = wm.match(image, message)
        if found["agreement"] is None:
            return
        row["accuracy"].append(found["stock_agreement"]["fluxframe"])
        row["detected"].append(found["detected"])

    for name in names:
        original = photo(name, (size, size))
        marked, _ = wm.embed(original, wm.FLUXFRAME_MESSAGE)
        for condition, attack in attacks(size).items():
            record(condition, attack(marked))
        record("unmarked photo (false positives)", original, marked=False)
        for w, h in ((512, 512), (384, 384), (320, 240), (256, 256), (200, 200)):
            small, rec = wm.embed(photo(name, (w, h)), wm.FLUXFRAME_MESSAGE)
            label = f"small image {w}x{h}" + ("" if rec["applied"] else " (not marked: under 256²)")
            record(label, _reopen(encoded(small, "PNG")) if rec["applied"] else None)
    out = []
    for condition, row in rows.items():
        acc = row["accuracy"]
        out.append({
            "condition": condition,
            "images": row["n"],
            "bit_accuracy_mean": float(np.mean(acc)) if acc else None,
            "bit_accuracy_min": float(np.min(acc)) if acc else None,
            "detected": int(sum(row["detected"])),
        })
    return out


def main() -> int:
    args = parse_args()
    logging.getLogger("fluxframe.provenance").setLevel(logging.ERROR)  # lossy encodings warn on every image
    times = timing(args.runs, args.size, args.method)
    robust = robustness(args.photos)
    if args.json:
        print(json.dumps({"timing_ms": times, "robustness": robust}, indent=2))
        return 0
    print(f"## Time per {args.size}² image (median of {args.runs}, ms)\n")
    print("| step | ms |\n|---|---|")
    for step, ms in times.items():
        print(f"| {step} | {ms:.1f} |")
    print(f"\n## dwtDct robustness, fluxframe's 48-bit message, {len(args.photos)} photos at 1024²\n")
    print("Bit accuracy as invisible-watermark's stock decoder reads the marks (1.00 = every bit back, 0.50 = "
          "chance); detected = images `verify` finds marked (≥ 90 % agreement).\n")
    print("| condition | bit accuracy (mean) | worst | detected |\n|---|---|---|---|")
    for row in robust:
        if row["bit_accuracy_mean"] is None:
            print(f"| {row['condition']} | — | — | — |")
            continue
        print(f"| {row['condition']} | {row['bit_accuracy_mean']:.2f} | {row['bit_accuracy_min']:.2f} | "
              f"{row['detected']}/{row['images']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
