"""How well does a demo checkpoint draw captions it never saw? (issue 9's measure, with any seeds and settings)

Generates the shapes data set's held-out captions (every held-out (shape, colour, position) triple, some twice with
another size and background) through the public API, reads each image back with ``shapes.analyse`` and prints the
share of each attribute read right, each shape's confusion and every misread shape. With the defaults it grades
exactly what ``tests/test_demo_quality.py`` grades (seeds 1000+, the demo config's sampler).

    .venv/bin/python bench/demo_heldout.py                                  # models/shapes-v1
    .venv/bin/python bench/demo_heldout.py --model PATH --seed 2000 --grid sheet.jpg
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from _demo import DEMO_MODEL, demo_pipeline

TILE = 96  # pixels per image on the contact sheet


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL), help="a shapes checkpoint folder")
    p.add_argument("--captions", type=int, default=48, help="held-out captions to generate")
    p.add_argument("--seed", type=int, default=1000, help="caption i is generated with seed SEED + i")
    p.add_argument("--steps", type=int, help="default: the demo config's")
    p.add_argument("--guidance", type=float, help="default: the demo config's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", type=Path, help="also write the images as a contact sheet (8 per row) to this file")
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def contact_sheet(images, path: Path) -> None:
    from PIL import Image

    rows = -(-len(images) // 8)
    sheet = Image.new("RGB", (8 * TILE, rows * TILE))
    for i, image in enumerate(images):
        sheet.paste(image.resize((TILE, TILE), Image.Resampling.LANCZOS), ((i % 8) * TILE, (i // 8) * TILE))
    sheet.save(path, quality=90)


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from fluxframe import api
    from fluxframe.demo import shapes

    pipeline, sampler = demo_pipeline(args.model, steps=args.steps, guidance=args.guidance)
    scenes = shapes.held_out_scenes(args.captions)
    counts, confusion, images, misread = Counter(), defaultdict(Counter), [], []
    started = time.perf_counter()
    for i, scene in enumerate(scenes):
        image = pipeline.generate(api.GenerationRequest(prompt=scene.caption, seed=args.seed + i), write=False).image
        images.append(image)
        found = shapes.analyse(image)
        for key, ok in shapes.grade(scene, found).items():
            counts[key] += ok
        confusion[scene.shape][str(found.shape)] += 1
        if found.shape != scene.shape:
            misread.append({"caption": scene.caption, "read": found.shape, "solidity": round(found.solidity, 3),
                            "fill": round(found.fill, 3), "disk_overlap": round(found.disk_overlap, 3),
                            "square_overlap": round(found.square_overlap, 3)})
    if args.grid:
        contact_sheet(images, args.grid)
    result = {"model": args.model, "captions": len(scenes), "seed": args.seed, "steps": sampler["steps"],
              "guidance": sampler["guidance"], "seconds": round(time.perf_counter() - started, 1),
              **{key: counts[key] / len(scenes) for key in shapes.GRADED},
              "confusion": {shape: dict(read) for shape, read in confusion.items()}, "misread": misread}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.model}: {len(scenes)} held-out captions, seeds {args.seed}+, {sampler['steps']} steps, guidance "
          f"{sampler['guidance']} ({result['seconds']} s)")
    print(", ".join(f"{key} {result[key]:.0%}" for key in shapes.GRADED))
    for shape, read in confusion.items():
        print(f"  {shape}: {read[shape]} of {sum(read.values())} right, read as {dict(read)}")
    for row in misread:
        print(f"  {row['caption']!r}: read {row['read']} (solidity {row['solidity']}, fill {row['fill']}, "
              f"disk {row['disk_overlap']}, square {row['square_overlap']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
