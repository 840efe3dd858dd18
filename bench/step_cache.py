"""What the step cache and compiled blocks buy (issue 28): measured, never asserted in tests.

1. The demo model (models/shapes-v1, klein base: true CFG, the demo config's 24 steps at 256²) on the held-out
   captions ``bench/demo_heldout.py`` grades (seeds 1000+), without a cache and with ``first-block`` at each
   threshold: full DiT evaluations (true CFG: two a step) and denoising wall time relative to no cache, held-out
   colour / position / shape accuracy (``fluxframe.demo.shapes.analyse``), and the mean absolute pixel difference
   (0-255) from the uncached image of the same caption and seed.
2. The tiny FLUX.2 preset (random weights) at 512²: the same counts, time and difference (no grading: its images
   are noise).
3. ``[model] compile``: DiT forward time compiled / uncompiled on the demo model at 256² and the tiny preset at
   512² (median of ``--reps`` forwards after warm-up; the compile itself is reported apart).

    .venv/bin/python bench/step_cache.py                     # everything, 48 captions (slow on a CPU)
    .venv/bin/python bench/step_cache.py --captions 16 --json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time

import numpy as np
import torch
from _demo import DEMO_MODEL, demo_pipeline


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", type=int, default=48, help="held-out captions (demo_heldout.py grades 48)")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--tiny-images", type=int, default=2)
    p.add_argument("--tiny-steps", type=int, default=12)
    p.add_argument("--reps", type=int, default=5, help="timed forwards per compile measurement")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", nargs="*", default=[], choices=["demo", "tiny", "compile"])
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def _cache(threshold):
    return None if threshold is None else {"method": "first-block", "threshold": threshold}


def _run(pipeline, requests, pictures=None):
    """(pixel arrays, full DiT evaluations, evaluations without a cache, denoising seconds) over the requests;
    the PIL images are appended to ``pictures`` when given."""
    from fluxframe import api

    images, computed, total, seconds = [], 0, 0, 0.0
    for request in requests:
        result = pipeline.generate(api.GenerationRequest(**request), write=False)
        images.append(np.asarray(result.image, dtype=np.float64))
        if pictures is not None:
            pictures.append(result.image)
        seconds += result.timings["denoising"]
        passes = 2 if pipeline.stages.model.true_cfg(result.guidance) else 1
        total += passes * result.steps
        computed += result.step_cache["computed"] if result.step_cache else passes * result.steps
    return images, computed, total, seconds


def _row(threshold, images, computed, total, seconds, base) -> dict:
    row = {"threshold": threshold, "dit_evaluations": computed, "of": total,
           "fewer_evaluations": round(total / computed, 2), "denoise_s": round(seconds, 1)}
    if base is not None:
        row["time_vs_uncached"] = round(seconds / base["seconds"], 3)
        row["mean_abs_diff"] = round(float(np.mean([np.abs(a - b).mean() for a, b in zip(images, base["images"])])), 3)
    return row


def bench_demo(args) -> list[dict]:
    from fluxframe.demo import shapes

    scenes = shapes.held_out_scenes(args.captions)
    requests = [{"prompt": scene.caption, "seed": args.seed + i} for i, scene in enumerate(scenes)]
    rows, base = [], None
    for threshold in [None, *args.thresholds]:
        pipeline, _ = demo_pipeline(DEMO_MODEL, cache=_cache(threshold))
        pictures = []
        images, computed, total, seconds = _run(pipeline, requests, pictures)
        row = _row(threshold, images, computed, total, seconds, base)
        found = [shapes.grade(scene, shapes.analyse(image)) for scene, image in zip(scenes, pictures)]
        row.update({key: round(sum(f[key] for f in found) / len(scenes), 3) for key in shapes.GRADED})
        if base is None:
            base = {"images": images, "seconds": seconds}
        rows.append(row)
        print(json.dumps({"demo": row}), file=sys.stderr)
    return rows


def _tiny_pipeline(size: int, steps: int, **model):
    from fluxframe import api

    def make(threshold=None):
        sampler = {"steps": steps, "width": size, "height": size, **({"cache": _cache(threshold)} if threshold else {})}
        return api.load(api.parse_config({"model": {"preset": "tiny", "dtype": "float32", "device": "cpu", **model},
                                          "sampler": sampler}))
    return make


def bench_tiny(args) -> list[dict]:
    make = _tiny_pipeline(512, args.tiny_steps)
    requests = [{"prompt": "a red circle on a blue background", "seed": 10 + i} for i in range(args.tiny_images)]
    rows, base = [], None
    for threshold in [None, *args.thresholds]:
        images, computed, total, seconds = _run(make(threshold), requests)
        rows.append(_row(threshold, images, computed, total, seconds, base))
        if base is None:
            base = {"images": images, "seconds": seconds}
        print(json.dumps({"tiny": rows[-1]}), file=sys.stderr)
    return rows


def _forward_inputs(pipeline, size: int):
    model = pipeline.stages.model
    latents = model.initial_noise(0, size, size)
    text = model.encode_prompts(["a large red circle on the left, on a blue background"])
    t = torch.full((1,), 0.5)
    g = torch.full((1,), 4.0) if model.embedded_guidance else None
    return model.transformer, (latents.tokens, latents.ids, text.embeds, text.ids, t, g)


def _median_forward(transformer, inputs, reps: int) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            started = time.perf_counter()
            transformer(*inputs)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def _demo_compiled(compile: bool):
    from fluxframe import api

    return api.load(api.parse_config({"model": {"family": "flux2", "path": str(DEMO_MODEL), "dtype": "float32",
                                                "device": "cpu", "compile": compile}}))


def bench_compile(args) -> list[dict]:
    rows = []
    cases = [("demo 256²", _demo_compiled, 256),
             ("tiny 512²", lambda compile: _tiny_pipeline(512, 2, compile=compile)(), 512)]
    for name, make, size in cases:
        plain = make(False)
        compiled = make(True)
        transformer, inputs = _forward_inputs(plain, size)
        ctransformer, _ = _forward_inputs(compiled, size)
        with torch.inference_mode():
            transformer(*inputs)  # warm-up
            started = time.perf_counter()
            ctransformer(*inputs)  # compiles
            compile_s = time.perf_counter() - started
            diff = float((ctransformer(*inputs) - transformer(*inputs)).abs().max())
        eager = _median_forward(transformer, inputs, args.reps)
        fast = _median_forward(ctransformer, inputs, args.reps)
        rows.append({"case": name, "eager_ms": round(eager * 1e3, 1), "compiled_ms": round(fast * 1e3, 1),
                     "ratio": round(fast / eager, 3), "first_call_s": round(compile_s, 1), "max_abs_diff": diff,
                     "compile": compiled.stages.model.compiled})
        print(json.dumps({"compile": rows[-1]}), file=sys.stderr)
    return rows


def main() -> int:
    args = parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    out = {"threads": args.threads, "thresholds": args.thresholds, "captions": args.captions}
    if "demo" not in args.skip:
        out["demo"] = bench_demo(args)
    if "tiny" not in args.skip:
        out["tiny_512"] = bench_tiny(args)
    if "compile" not in args.skip:
        out["compile"] = bench_compile(args)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
