"""How hollow can the demo model's outlines come out at all? (issue 27, part 5: the style LoRA's ceiling)

The style LoRA adapts only the transformer; the demo autoencoder decides which strokes survive. This renders the
held-out evaluation scenes (``shapes.held_out_scenes``, the captions bench/demo_outline_lora.py grades) in a style,
encodes each with the checkpoint's own autoencoder and decodes it again (no sampling), and reads the result with
``shapes.analyse``: how many come back hollow, of the right colour and position, by shape and size. Drawn in the
filled style the same round trip shows whether the analysis still reads every filled shape as filled.

    .venv/bin/python bench/demo_outline_ceiling.py                     # outline style, 64 scenes
    .venv/bin/python bench/demo_outline_ceiling.py --style filled --save /tmp/ceiling
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from _demo import DEMO_MODEL, demo_pipeline


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL), help="a shapes checkpoint folder")
    p.add_argument("--scenes", type=int, default=64, help="held-out scenes (as bench/demo_outline_lora.py's captions)")
    p.add_argument("--style", choices=("outline", "filled"), default="outline")
    p.add_argument("--training", action="store_true", help="the outline LoRA's training scenes instead (192)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save", type=Path, help="write each drawn and round-tripped image here as PNG")
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from fluxframe.core.images import to_pil
    from fluxframe.demo import shapes
    from fluxframe.demo.train import render_all, to_unit

    pipeline, sampler = demo_pipeline(args.model)
    model, size = pipeline.stages.model, sampler["width"]
    scenes = shapes.outline_scenes(192) if args.training else shapes.held_out_scenes(args.scenes)
    scenes = [dataclasses.replace(s, style=args.style) for s in scenes]
    counts, by_kind, rows = Counter(), Counter(), []
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for start in range(0, len(scenes), 8):
            batch = scenes[start:start + 8]
            drawn = render_all(batch, size)
            decoded = to_pil(model.decode(model.encode_image(to_unit(drawn))))
            for i, (scene, image) in enumerate(zip(batch, decoded), start):
                found = shapes.analyse(image)
                ok = {"hollow": found.style == "outline", "colour": found.colour == scene.colour,
                      "position": found.position == scene.position}
                ok["all three"] = all(ok.values()) if args.style == "outline" else ok["colour"] and ok["position"]
                counts.update({key: int(value) for key, value in ok.items()})
                by_kind[(scene.shape, scene.size)] += ok["hollow"]
                rows.append({"index": i, "caption": scene.caption, "hollowness": round(found.hollow, 3), **ok})
                if args.save:
                    image.save(args.save / f"{i:03d}-{scene.shape}-{scene.size}-rt.png")
                    to_pil(to_unit(drawn[i - start:i - start + 1]))[0].save(args.save / f"{i:03d}-drawn.png")
    result = {"model": args.model, "style": args.style, "scenes": len(scenes), "counts": dict(counts),
              "hollow_by_shape_size": {f"{s} {z}": by_kind[(s, z)] for s in shapes.SHAPES for z in shapes.SIZE_NAMES},
              "outline_width": shapes.OUTLINE_WIDTH, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    n = len(scenes)
    print(f"{args.model}: {n} {'training' if args.training else 'held-out'} scenes drawn {args.style}, "
          "encoded and decoded: " + ", ".join(f"{k} {counts[k]}/{n}" for k in ("hollow", "colour", "position",
                                                                                "all three")))
    print("  hollow by shape and size: " + ", ".join(f"{k} {v}" for k, v in result["hollow_by_shape_size"].items()))
    for row in rows:
        if row["hollow"] != (args.style == "outline") or not (row["colour"] and row["position"]):
            print(f"    {row['index']:3d} {row['caption']!r}: hollowness {row['hollowness']}, colour {row['colour']}, "
                  f"position {row['position']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
