"""Where along the sampling schedule does the demo model lose the shape? (issue 9's diagnosis)

For training scenes of the shapes data set: render each, encode it with the checkpoint's own autoencoder (a real
latent), noise it to the schedule's sigma at step k (with a seeded noise) and sample from step k to the end, exactly
as generation does (same sampler, guidance and 512-position prompts), then read the image back with
``shapes.analyse``. k = steps means no sampling at all (the autoencoder's round trip); k = 0 is plain generation from
noise (with the scene's caption). A model that denoises well keeps the round trip's accuracy down to small k; the
step where accuracy falls shows which noise levels the transformer handles badly.

    .venv/bin/python bench/demo_denoising.py                          # models/shapes-v1, the demo config's sampler
    .venv/bin/python bench/demo_denoising.py --model PATH --scenes 96 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter

import torch
from _demo import DEMO_MODEL, demo_pipeline


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL), help="a shapes checkpoint folder")
    p.add_argument("--scenes", type=int, default=48, help="training scenes graded per start step")
    p.add_argument("--starts", default="0,12,16,20,22,23", help="schedule steps to start sampling from")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from fluxframe.core.images import to_pil
    from fluxframe.core.types import Conditioning
    from fluxframe.demo import shapes
    from fluxframe.demo.train import render_all, to_unit

    pipeline, sampler = demo_pipeline(args.model)
    steps, guidance, size = sampler["steps"], sampler["guidance"], sampler["width"]
    model, euler = pipeline.stages.model, pipeline.stages.sampler
    train = shapes.all_scenes("train")  # jitter-free, sorted: every k-th spreads over shapes and colours
    scenes = train[:: max(1, len(train) // args.scenes)][: args.scenes]
    starts = sorted({int(s) for s in args.starts.split(",")} | {steps})
    rows = {k: Counter() for k in starts}
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(scenes), args.batch):
            batch = scenes[i:i + args.batch]
            clean = model.encode_image(to_unit(render_all(batch, size)))
            text = model.encode_prompts([s.caption for s in batch])
            text.negative = model.encode_prompts([""] * len(batch)) if model.true_cfg(guidance) else None
            sigmas = model.sigmas(steps, clean.tokens.shape[1])
            noise = torch.randn(clean.tokens.shape, generator=torch.Generator().manual_seed(i))

            def velocity(x, sigma, step):
                return model.predict(x, clean.ids, sigma, text, Conditioning(), guidance)

            for k in starts:
                s = float(sigmas[k])
                x = (1 - s) * clean.tokens.float() + s * noise
                out = dataclasses.replace(clean, tokens=euler.sample(x, sigmas[k:], velocity) if k < steps else x)
                for scene, image in zip(batch, to_pil(model.decode(out))):
                    for key, ok in shapes.grade(scene, shapes.analyse(image)).items():
                        rows[k][key] += ok
    result = {"model": args.model, "scenes": len(scenes), "steps": steps, "guidance": guidance,
              "seconds": round(time.perf_counter() - started, 1),
              "by_start": [{"start_step": k, "sigma": round(float(sigmas[k]), 3),
                            **{key: rows[k][key] / len(scenes) for key in shapes.GRADED}} for k in starts]}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['model']}: {len(scenes)} training scenes, {steps} steps, guidance {guidance} "
          f"({result['seconds']} s)\n")
    print("| start step | sigma | " + " | ".join(shapes.GRADED) + " |")
    print("|---|---|" + "---|" * len(shapes.GRADED))
    for row in result["by_start"]:
        label = f"{row['start_step']} (no sampling)" if row["start_step"] == steps else str(row["start_step"])
        print(f"| {label} | {row['sigma']} | " + " | ".join(f"{row[k]:.0%}" for k in shapes.GRADED) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
