"""Watermark robustness: what survives what platforms do to images (issue 8), for fluxframe's ``fluxframe-ss``
mark and, for comparison, the ``dwtDct`` mark of the FLUX reference code.

For each attack of ``tests/robustness.py.ATTACKS`` (JPEG 90/75/60, WebP 80, crops, resizes,
brightness and contrast, JPEG 75 + crop + resize together) over the 20 images of ``marked_set`` (16
scikit-image photos, 4 generated images, 1024 px): the bit accuracy before error correction (mean and minimum
over the images; 0.5 = chance), and the message success rate — the share of images whose message comes back
exactly and is claimed by ``match`` (fluxframe-ss: sync confidence over the threshold and the BCH-corrected
message equal to the one embedded; dwtDct: at least 90 % of the 48 bits, as ``verify`` claims it, and in
brackets every bit right). Then the PSNR of the marked images, attacks beyond the bar (what the mark does not
survive), false positives on the 228 unmarked images of ``unmarked_set``, and the time per 1024² image to embed
and to detect (median of ``--runs`` after a warm-up).

    .venv/bin/python bench/watermark_robustness.py                  # markdown tables
    .venv/bin/python bench/watermark_robustness.py --json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys

from timing import median_ms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # the attacks

import robustness as rb  # noqa: E402

from fluxframe.provenance import robust  # noqa: E402
from fluxframe.provenance import watermark as wm  # noqa: E402

MESSAGE = wm.FLUXFRAME_MESSAGE


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="edge of the marked images")
    p.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--methods", nargs="*", default=[wm.ROBUST_METHOD, "dwtDct"], choices=[wm.ROBUST_METHOD, "dwtDct"])
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p.parse_args()


def read(method: str, image, unreadable: float | None = 0.0) -> tuple[float | None, bool, bool]:
    """(bit accuracy before error correction, claimed with the right message, every bit right); the bit accuracy
    is ``unreadable`` where the detector reads no bits at all (image too small, or no period found)."""
    found = wm.match(image, {"fluxframe": MESSAGE}, method=method)
    if method in wm.TILED:
        ok = bool(found["detected"] and found["decoded"] == MESSAGE)
        return (unreadable if found["agreement"] is None else float(found["agreement"])), ok, ok
    stock = found["stock_agreement"].get("fluxframe")
    if stock is None:  # too small to read
        return unreadable, False, False
    return float(stock), bool(found["detected"]), stock == 1.0


def robustness(method: str, marked: dict, attacks: dict) -> dict[str, dict]:
    out = {}
    for name, attack in attacks.items():
        rows = [read(method, attack(image)) for image in marked.values()]
        accuracy = [r[0] for r in rows]
        out[name] = {"bit_accuracy_mean": statistics.fmean(accuracy), "bit_accuracy_min": min(accuracy),
                     "success_rate": sum(r[1] for r in rows) / len(rows),
                     "exact_rate": sum(r[2] for r in rows) / len(rows), "images": len(rows)}
    return out


def false_positives(method: str, images: list) -> dict:
    claimed, confidence = [], []
    for name, image in images:
        found = wm.match(image, wm.KNOWN_MESSAGES if method == "dwtDct" else {"fluxframe": MESSAGE}, method=method)
        if found["detected"]:
            claimed.append(name)
        confidence.append(found.get("confidence") if method in wm.TILED else found["agreement"])
    return {"images": len(images), "false_positives": len(claimed), "which": claimed,
            "highest": max(c for c in confidence if c is not None),
            "threshold": robust.CONFIDENCE_THRESHOLD if method == wm.ROBUST_METHOD else wm.THRESHOLD}


def timing(method: str, runs: int) -> dict[str, float]:
    image = rb.photo("astronaut", (1024, 1024))
    marked, _ = wm.embed(image, MESSAGE, method=method)
    embed = median_ms(lambda: wm.embed(image, MESSAGE, method=method), runs)
    detect = median_ms(lambda: wm.match(marked, {"fluxframe": MESSAGE}, method=method), runs)
    return {"embed_ms": embed, "detect_ms": detect, "total_ms": embed + detect}


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    originals = rb.marked_set(args.size)
    unmarked = rb.unmarked_set()
    load_before = os.getloadavg()[0]
    figures: dict = {"size": args.size, "images": list(originals), "methods": {}}
    for method in args.methods:
        marked = {name: wm.embed(image, MESSAGE, method=method)[0] for name, image in originals.items()}
        psnr = [rb.psnr(originals[name], marked[name]) for name in originals]
        attacks = dict(rb.ATTACKS) | (rb.BEYOND if method == wm.ROBUST_METHOD else {})
        figures["methods"][method] = {
            "psnr_mean": statistics.fmean(psnr), "psnr_min": min(psnr),
            "attacks": robustness(method, marked, attacks),
            "false_positives": false_positives(method, unmarked),
            "timing_1024": timing(method, args.runs),
        }
    figures["load_average"] = (load_before, os.getloadavg()[0])
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"# Watermark robustness, {len(originals)} images at {args.size} px (scikit-image photos + generated)\n")
    for method, data in figures["methods"].items():
        print(f"## {method}\n")
        print(f"PSNR against the unmarked image: mean {data['psnr_mean']:.1f} dB, min {data['psnr_min']:.1f} dB\n")
        print("| attack | bit accuracy before ECC, mean | min | message success | every bit right |")
        print("|---|---|---|---|---|")
        beyond = False
        for name, row in data["attacks"].items():
            if name in rb.BEYOND and not beyond:
                beyond = True
                print("| *beyond the bar:* | | | | |")
            print(f"| {name} | {row['bit_accuracy_mean']:.3f} | {row['bit_accuracy_min']:.3f} | "
                  f"{row['success_rate']:.0%} | {row['exact_rate']:.0%} |")
        fp = data["false_positives"]
        label = "sync confidence" if method == wm.ROBUST_METHOD else "bit agreement"
        print(f"\nFalse positives on {fp['images']} unmarked images: {fp['false_positives']} "
              f"(threshold: {label} >= {fp['threshold']}; highest {label} seen: {fp['highest']:.2f})")
        t = data["timing_1024"]
        print(f"Time per 1024² image (median of {args.runs}): embed {t['embed_ms']:.0f} ms, detect "
              f"{t['detect_ms']:.0f} ms, together {t['total_ms']:.0f} ms\n")
    print(f"Load average (1 min) before / after: {figures['load_average'][0]:.1f} / "
          f"{figures['load_average'][1]:.1f} on {os.cpu_count()} cores", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
