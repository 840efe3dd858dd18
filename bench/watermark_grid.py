"""Watermark robustness grid (issue 26, part 3): a Video Seal–style sweep of each attack's strength, per image size.

For fluxframe's ``fluxframe-ss`` mark and the FLUX reference's ``dwtDct``, at each ``--sizes`` edge (square
images; each method only where it marks: ``fluxframe-ss`` from ``robust.MIN_EDGE`` = 512 px per edge, ``dwtDct``
from 256×256 pixels), over ``--images`` images of ``tests/robustness.py.marked_set`` (scikit-image photos and
generated images, picked evenly from its 20), and each cell of ``tests/robustness.py.grid``: JPEG quality 40–90,
centre crop and resize keeping 0.3–0.9 of each edge, rotation 1–10° (corners filled black), brightness 0.5–2.0,
Gaussian blur, and JPEG 75 + crop 10 % all sides + resize 50 % together. Per cell: the bit accuracy before
error correction (mean over the images the detector could read at all; 0.5 = chance), how many it could not read
(too small, or no period found), and the message success rate, as ``bench/watermark_robustness.py`` counts it
(``fluxframe-ss``: sync confidence over its threshold and the BCH-corrected message right; ``dwtDct``: claimed by
``match``, ≥ 90 % of the bits).

    .venv/bin/python bench/watermark_grid.py                          # markdown tables, 12 images, 256/512/1024
    .venv/bin/python bench/watermark_grid.py --sizes 512 --images 4 --json
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # watermark_robustness, when imported by a test
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # the attacks

import robustness as rb  # noqa: E402
from timing import timed_report  # noqa: E402
from watermark_robustness import MESSAGE, read  # noqa: E402

from fluxframe.provenance import robust  # noqa: E402
from fluxframe.provenance import watermark as wm  # noqa: E402

METHODS = (wm.ROBUST_METHOD, "dwtDct")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024], help="square image edges")
    p.add_argument("--images", type=int, default=12, help="images per size (of the 20 of marked_set)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--markdown", action="store_true", help="print markdown tables (the default without --json)")
    return p.parse_args(argv)


def marks(method: str, size: int) -> bool:
    """Whether ``method`` marks a size×size image."""
    if method == wm.ROBUST_METHOD:
        return robust.too_small(size, size) is None
    return size * size >= wm.MIN_AREA


def pick(images: dict, count: int) -> dict:
    """``count`` of the images, spread evenly over the set (photos, colour and grey, and generated ones)."""
    names = list(images)
    count = max(1, min(count, len(names)))
    chosen = [names[round(i * (len(names) - 1) / max(1, count - 1))] for i in range(count)] if count > 1 else names[:1]
    return {name: images[name] for name in dict.fromkeys(chosen)}


def cell(method: str, marked: dict, attack) -> dict:
    rows = [read(method, attack(image), unreadable=None) for image in marked.values()]
    readable = [r[0] for r in rows if r[0] is not None]
    return {"bit_accuracy_mean": statistics.fmean(readable) if readable else None,
            "bit_accuracy_min": min(readable) if readable else None,
            "unreadable": len(rows) - len(readable),
            "success_rate": sum(r[1] for r in rows) / len(rows), "images": len(rows)}


def run_grid(sizes, images: int, methods, attacks: dict[str, dict] | None = None) -> dict:
    """The figures: ``{"sizes": {size: {"images": [...], "methods": {method: {"psnr_mean", "cells": {family:
    {attack: cell}}}}}}}``; a method that does not mark a size is absent from that size's methods."""
    attacks = rb.grid() if attacks is None else attacks
    out: dict = {"sizes": {}, "message_bits": len(MESSAGE)}
    for size in sizes:
        originals = pick(rb.marked_set(size, square=True), images)
        entry: dict = {"images": list(originals), "methods": {}, "skipped": {}}
        for method in methods:
            if not marks(method, size):
                entry["skipped"][method] = (robust.too_small(size, size) if method == wm.ROBUST_METHOD
                                            else f"under the {wm.MIN_AREA} pixels dwtDct needs")
                continue
            started = time.perf_counter()
            marked = {name: wm.embed(image, MESSAGE, method=method)[0] for name, image in originals.items()}
            psnr = [rb.psnr(originals[name], marked[name]) for name in originals]
            cells = {family: {name: cell(method, marked, attack) for name, attack in members.items()}
                     for family, members in attacks.items()}
            entry["methods"][method] = {"psnr_mean": statistics.fmean(psnr), "cells": cells,
                                        "seconds": time.perf_counter() - started}
        out["sizes"][size] = entry
    return out


def _pct(value) -> str:
    return "–" if value is None else f"{value:.0%}"


def markdown(figures: dict) -> str:
    """One table per size: a row per attack, per method the bit accuracy (mean) and the message success rate."""
    lines = []
    for size, entry in figures["sizes"].items():
        methods = list(entry["methods"])
        lines.append(f"#### {size}×{size}, {len(entry['images'])} images\n")
        for method, why in entry["skipped"].items():
            lines.append(f"*{method}: not marked at this size ({why}).*\n")
        if not methods:
            continue
        psnr = ", ".join(f"{m} {entry['methods'][m]['psnr_mean']:.1f} dB" for m in methods)
        lines.append(f"Mean PSNR of the marked images: {psnr}.\n")
        head = " | ".join(f"{m} bit acc. | {m} success" for m in methods)
        lines.append(f"| attack | {head} |")
        lines.append("|---|" + "---|" * (2 * len(methods)))
        first = entry["methods"][methods[0]]["cells"]
        for family, members in first.items():
            for name in members:
                row = []
                for m in methods:
                    c = entry["methods"][m]["cells"][family][name]
                    acc = _pct(c["bit_accuracy_mean"])
                    if c["unreadable"]:
                        acc += f" ({c['unreadable']} unread)"
                    row += [acc, _pct(c["success_rate"])]
                lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    timed_report(lambda: run_grid(args.sizes, args.images, args.methods), markdown, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
