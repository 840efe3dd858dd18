"""Does the outline-style LoRA draw outlines on captions it never saw? (issue 27, part 5)

Generates the shapes data set's held-out captions (every held-out (shape, colour, position) triple, twice by
default: once small and once large, each on another background) through the public API with the demo model alone
and with the LoRA, reads each image back with ``shapes.analyse`` and prints, for each, how many came out hollow
(``style == "outline"``) and how many have the caption's colour and position. ``--sheet`` writes a before/after
contact sheet: for each group of 8 captions a row without the LoRA above the same seeds with it.

    .venv/bin/python bench/demo_outline_lora.py                  # models/shapes-v1-outline-lora/outline.safetensors
    .venv/bin/python bench/demo_outline_lora.py --lora FILE --captions 32 --sheet docs/outline-lora.jpg
    .venv/bin/python bench/demo_outline_lora.py --save /tmp/outline-images   # keep the images to grade again
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _demo import DEMO_MODEL, ROOT, demo_pipeline

DEMO_LORA = ROOT / "models" / "shapes-v1-outline-lora" / "outline.safetensors"
TILE = 96  # pixels per image on the contact sheet
GRADED = ("hollow", "colour", "position", "all three")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL), help="a shapes checkpoint folder")
    p.add_argument("--lora", default=str(DEMO_LORA), help="the LoRA file")
    p.add_argument("--weight", type=float, default=1.0, help="the LoRA's weight")
    p.add_argument("--captions", type=int, default=64, help="held-out captions to generate (32: each triple once)")
    p.add_argument("--seed", type=int, default=3000, help="caption i is generated with seed SEED + i")
    p.add_argument("--which", choices=("both", "base", "lora"), default="both")
    p.add_argument("--steps", type=int, help="default: the demo config's")
    p.add_argument("--guidance", type=float, help="default: the demo config's")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--sheet", type=Path, help="also write a before/after contact sheet (the first 16 captions)")
    p.add_argument("--save", type=Path, help="also write every generated image here (base-NNN.png, lora-NNN.png)")
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def grade(pipeline, scenes, seed: int):
    """(counts of GRADED, images, rows per caption)."""
    from fluxframe import api
    from fluxframe.demo import shapes

    counts, images, rows = dict.fromkeys(GRADED, 0), [], []
    for i, scene in enumerate(scenes):
        image = pipeline.generate(api.GenerationRequest(prompt=scene.caption, seed=seed + i), write=False).image
        found = shapes.analyse(image)
        ok = {"hollow": found.style == "outline", "colour": found.colour == scene.colour,
              "position": found.position == scene.position}
        ok["all three"] = all(ok.values())
        for key in GRADED:
            counts[key] += ok[key]
        images.append(image)
        rows.append({"caption": scene.caption, "seed": seed + i, "hollowness": round(found.hollow, 3), **ok,
                     "read": f"{found.colour} {found.style} {found.shape} {found.position}"})
    return counts, images, rows


def contact_sheet(before, after, path: Path) -> None:
    from PIL import Image

    pairs = -(-len(before) // 8)
    sheet = Image.new("RGB", (8 * TILE, 2 * pairs * TILE), (255, 255, 255))
    for row, images in enumerate((before, after)):
        for i, image in enumerate(images):
            sheet.paste(image.resize((TILE, TILE), Image.Resampling.LANCZOS),
                        ((i % 8) * TILE, (2 * (i // 8) + row) * TILE))
    sheet.save(path, quality=85)


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from fluxframe.demo import shapes

    scenes = shapes.held_out_scenes(args.captions)
    result = {"model": args.model, "lora": args.lora, "weight": args.weight, "captions": len(scenes),
              "seed": args.seed}
    images = {}
    for which in ("base", "lora"):
        if args.which not in ("both", which):
            continue
        started = time.perf_counter()
        loras = [(args.lora, args.weight)] if which == "lora" else []
        pipeline, sampler = demo_pipeline(args.model, loras=loras, steps=args.steps, guidance=args.guidance)
        counts, images[which], rows = grade(pipeline, scenes, args.seed)
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images[which]):
                image.save(args.save / f"{which}-{i:03d}.png")
        result.update(steps=sampler["steps"], guidance=sampler["guidance"])
        result.setdefault("runs", {})[which] = {"counts": counts, "rows": rows,
                                                "seconds": round(time.perf_counter() - started, 1)}
    if args.sheet and len(images) == 2:
        contact_sheet(images["base"][:16], images["lora"][:16], args.sheet)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.model} on {len(scenes)} held-out captions, seeds {args.seed}+, {result['steps']} steps, guidance "
          f"{result['guidance']}")
    for which in ("base", "lora"):
        if which in result.get("runs", {}):
            run = result["runs"][which]
            counts = run["counts"]
            label = "without the LoRA" if which == "base" else f"with {Path(args.lora).name} at {args.weight:g}"
            print(f"  {label} ({run['seconds']} s): "
                  + ", ".join(f"{key} {counts[key]}/{len(scenes)} ({counts[key] / len(scenes):.0%})"
                              for key in GRADED))
            for row in run["rows"]:
                if which == "lora" and not row["all three"]:
                    print(f"    {row['caption']!r} seed {row['seed']}: read {row['read']} "
                          f"(hollowness {row['hollowness']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
