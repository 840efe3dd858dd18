"""Watermark robustness grid (issue 26, part 3): a Video Seal–style sweep of each attack's strength, per image size.

For fluxframe's ``fluxframe-rs`` mark (the default; ``fluxframe-ss``, its predecessor, on request) and the FLUX
reference's ``dwtDct``, at each ``--sizes`` size (an edge for square images, or WIDTHxHEIGHT; each method only where
it marks: ``fluxframe-rs`` from ``lattice.MIN_EDGE`` = 256 px per edge, ``fluxframe-ss`` from 512, ``dwtDct`` from
256×256 pixels), over ``--images`` images of ``tests/robustness.py.sized_set`` (scikit-image photos and
generated images, picked evenly from its 20), and each cell of ``tests/robustness.py.grid``: JPEG quality 40–90,
centre crop and resize keeping 0.3–0.9 of each edge, rotation 1–10° (corners filled black), brightness 0.5–2.0,
Gaussian blur, aspect change, and JPEG 75 + crop 10 % all sides + resize 50 % together. Per cell: the bit accuracy
before error correction (mean over the images the detector could read at all; 0.5 = chance), how many it could not
read (too small, or no period found), and the message success rate, as ``bench/watermark_robustness.py`` counts it
(``fluxframe-rs`` / ``-ss``: sync confidence over its threshold and the BCH-corrected message right; ``dwtDct``:
claimed by ``match``, ≥ 90 % of the bits).

    .venv/bin/python bench/watermark_grid.py               # markdown tables, 12 images, 256, 384x256, 512, 1024
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

from fluxframe.provenance import watermark as wm  # noqa: E402

METHODS = (wm.LATTICE_METHOD, wm.ROBUST_METHOD, "dwtDct")
DEFAULT_METHODS = (wm.LATTICE_METHOD, "dwtDct")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["256", "384x256", "512", "1024"],
                   help="square image edges, or WIDTHxHEIGHT")
    p.add_argument("--images", type=int, default=12, help="images per size (of the 20 of marked_set)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--markdown", action="store_true", help="print markdown tables (the default without --json)")
    return p.parse_args(argv)


def dimensions(size) -> tuple[int, int]:
    """(width, height) of a ``--sizes`` entry: an edge (square) or WIDTHxHEIGHT."""
    text = str(size).lower()
    if "x" in text:
        width, height = (int(v) for v in text.split("x"))
        return width, height
    return int(text), int(text)


def marks(method: str, width: int, height: int) -> bool:
    """Whether ``method`` marks a width×height image."""
    if method in wm.TILED:
        return wm.TILED[method].too_small(width, height) is None
    return width * height >= wm.MIN_AREA


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
        width, height = dimensions(size)
        size = f"{width}x{height}"
        originals = pick(rb.sized_set(width, height), images)
        entry: dict = {"images": list(originals), "methods": {}, "skipped": {}}
        for method in methods:
            if not marks(method, width, height):
                entry["skipped"][method] = (wm.TILED[method].too_small(width, height) if method in wm.TILED
                                            else f"under the {wm.MIN_AREA} pixels dwtDct needs")
                continue
            started = time.perf_counter()
            marked = {name: wm.embed(image, MESSAGE, method=method)[0] for name, image in originals.items()}
            psnr = [rb.psnr(originals[name], marked[name]) for name in originals]
            cells = {family: {name: cell(method, marked, attack) for name, attack in members.items()}
                     for family, members in attacks.items()}
            entry["methods"][method] = {"psnr_mean": statistics.fmean(psnr), "psnr_min": min(psnr), "cells": cells,
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
        lines.append(f"#### {size.replace('x', '×')}, {len(entry['images'])} images\n")
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
