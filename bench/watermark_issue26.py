"""Issue 26, part 2: does ``fluxframe-rs`` give the 48-bit message back exactly, at 256², 384×256, 512² and
1024², after each attack of ``tests/robustness.py.ISSUE26`` (JPEG 90/75/60, WebP 80, crop 10 % of each side and
of all sides, resize 50 % and 150 %, brightness and contrast ±10 %, rotation ±2° and ±5° with the corners filled
or cropped, aspect x 0.9, and JPEG 75 + crop 10 % + resize 50 % together)?

Per size, over the 20 images of ``tests/robustness.py.sized_set``: how many of 20 are claimed by ``match`` with
the message right, the PSNR of the marked images (minimum, mean), the median estimated rotation and scale per
attack, and the time to embed and to detect (the minimum of ``--runs`` on one photo, and the machine's load).

    .venv/bin/python bench/watermark_issue26.py                    # markdown
    .venv/bin/python bench/watermark_issue26.py --sizes 256x256 --json
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # the attacks

import robustness as rb  # noqa: E402
from timing import timed_report  # noqa: E402

from fluxframe.provenance import lattice  # noqa: E402
from fluxframe.provenance import watermark as wm  # noqa: E402

MESSAGE = wm.FLUXFRAME_MESSAGE
METHOD = wm.LATTICE_METHOD


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["256x256", "384x256", "512x512", "1024x1024"],
                   help="WIDTHxHEIGHT of the marked images")
    p.add_argument("--runs", type=int, default=5, help="timed runs (minimum reported)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p.parse_args(argv)


def timing(width: int, height: int, runs: int) -> dict:
    photo = rb.photo("astronaut", (width, height))
    rgb = np.asarray(photo)
    marked = lattice.embed_rgb(rgb, MESSAGE)
    embed, detect = [], []
    for _ in range(runs):
        started = time.perf_counter()
        lattice.embed_rgb(rgb, MESSAGE)
        embed.append(time.perf_counter() - started)
        started = time.perf_counter()
        lattice.read(marked, {len(MESSAGE)})
        detect.append(time.perf_counter() - started)
    return {"embed_s": min(embed), "detect_s": min(detect), "total_s": min(embed) + min(detect),
            "load": os.getloadavg()[0]}


def run(sizes: list[str], runs: int) -> dict:
    out: dict = {"sizes": {}}
    for spec in sizes:
        width, height = (int(v) for v in spec.lower().split("x"))
        originals = rb.sized_set(width, height)
        marked = {name: wm.embed(image, MESSAGE, method=METHOD)[0] for name, image in originals.items()}
        psnr = [rb.psnr(originals[name], marked[name]) for name in originals]
        cells = {}
        for attack_name, attack in rb.ISSUE26.items():
            ok, failed, rotation, scale = 0, [], [], []
            for name, image in marked.items():
                found = wm.match(attack(image), {"fluxframe": MESSAGE}, method=METHOD)
                if found["detected"] and found["decoded"] == MESSAGE:
                    ok += 1
                    rotation.append(found["rotation"])
                    scale.append(found["scale"])
                else:
                    failed.append(name)
            cells[attack_name] = {"recovered": ok, "images": len(marked), "failed": failed,
                                  "rotation_median": statistics.median(rotation) if rotation else None,
                                  "scale_median": [statistics.median(s[i] for s in scale) for i in (0, 1)]
                                  if scale else None}
        out["sizes"][spec] = {"psnr_min": min(psnr), "psnr_mean": statistics.fmean(psnr), "cells": cells,
                              "timing": timing(width, height, runs)}
    return out


def markdown(figures: dict) -> str:
    sizes = list(figures["sizes"])
    lines = ["| attack | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
    first = figures["sizes"][sizes[0]]["cells"]
    for attack in first:
        row = []
        for spec in sizes:
            c = figures["sizes"][spec]["cells"][attack]
            row.append(f"{c['recovered']}/{c['images']}")
        lines.append(f"| {attack} | " + " | ".join(row) + " |")
    lines.append("| PSNR min / mean (dB) | " + " | ".join(
        f"{figures['sizes'][s]['psnr_min']:.1f} / {figures['sizes'][s]['psnr_mean']:.1f}" for s in sizes) + " |")
    lines.append("| embed + detect, s (min of runs; load) | " + " | ".join(
        f"{t['embed_s']:.3f} + {t['detect_s']:.3f} = {t['total_s']:.3f} ({t['load']:.1f})"
        for t in (figures["sizes"][s]["timing"] for s in sizes)) + " |")
    lines.append("")
    for spec in sizes:
        for attack, c in figures["sizes"][spec]["cells"].items():
            if c["failed"]:
                lines.append(f"* {spec}, {attack}: not recovered on {', '.join(c['failed'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    timed_report(lambda: run(args.sizes, args.runs), markdown, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
