"""What the step cache and compiled blocks buy (issue 28): measured, never asserted in tests.

1. The demo model (models/shapes-v1, klein base: true CFG, the demo config's 24 steps at 256²) on the held-out
   captions ``bench/demo_heldout.py`` grades (seeds 1000+), without a cache and with ``first-block`` and
   ``teacache`` at each of their thresholds: full DiT evaluations (true CFG: two a step) and denoising wall time
   relative to no cache, held-out colour / position / shape accuracy (``fluxframe.demo.shapes.analyse``), and the
   mean absolute pixel difference (0-255) from the uncached image of the same caption and seed.
2. The tiny FLUX.2 preset (random weights) at 512²: the same counts, time and difference (no grading: its images
   are noise).
3. ``[model] compile``: DiT forward time compiled / uncompiled on the demo model at 256² and the tiny preset at
   512², in ``--reps`` interleaved rounds (median, min and max of the per-round ratios; by default one thread and
   process CPU time, which a shared machine's other work disturbs least), with the 1-min load average before and
   after; the compile itself is reported apart. ``library_share`` is the part of the uncompiled forward spent in
   matrix products and attention kernels, which inductor calls unchanged: no compiled/uncompiled ratio goes under
   it. ``--compile-variants freezing max-autotune`` also measures inductor options that were tried and not
   adopted (see docs/speed.md).

    .venv/bin/python bench/step_cache.py                     # everything, 48 captions (slow on a CPU)
    .venv/bin/python bench/step_cache.py --captions 16 --json
    .venv/bin/python bench/step_cache.py --skip demo tiny --compile-variants default freezing max-autotune
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
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="first-block thresholds")
    p.add_argument("--teacache-thresholds", type=float, nargs="*", default=[0.1, 0.2, 0.4],
                   help="teacache thresholds (none: first-block only)")
    p.add_argument("--tiny-images", type=int, default=2)
    p.add_argument("--tiny-steps", type=int, default=12)
    p.add_argument("--reps", type=int, default=21, help="timed rounds (one forward each way) per compile measurement")
    p.add_argument("--compile-threads", type=int, default=1,
                   help="torch threads for the compile measurement (1 with --clock cpu: steadiest on a shared machine)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="compile measurement: process CPU time (ignores time lost to other processes) or wall time")
    p.add_argument("--compile-variants", nargs="+", default=["default"],
                   choices=["default", "freezing", "max-autotune"],
                   help="default: what [model] compile does; the others were tried and are not offered")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", nargs="*", default=[], choices=["demo", "tiny", "compile"])
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def _cache(setting):
    """None (no cache) or (method, threshold): the [sampler.cache] table."""
    return None if setting is None else {"method": setting[0], "threshold": setting[1]}


def _settings(args) -> list:
    return [None, *(("first-block", t) for t in args.thresholds),
            *(("teacache", t) for t in args.teacache_thresholds)]


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


def _row(setting, images, computed, total, seconds, base) -> dict:
    method, threshold = setting or (None, None)
    row = {"method": method, "threshold": threshold, "dit_evaluations": computed, "of": total,
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
    for threshold in _settings(args):
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
    for threshold in _settings(args):
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


def _compiled_variant(transformer, variant: str):
    """A copy of ``transformer`` with its blocks compiled as ``variant`` says (what ``[model] compile`` does is
    "default"; the others are what else was tried, measured here, not offered in the config): "freezing" treats
    the weights as constants (oneDNN/MKL prepacked linears; one graph per block, not per class: LoRA and offloading
    could not change the weights any more), "max-autotune" (inductor's C++ GEMM templates, also frozen)."""
    import copy

    import torch._inductor.config as inductor_config

    clone = copy.deepcopy(transformer)
    mode = "max-autotune-no-cudagraphs" if variant == "max-autotune" else None
    for block in [*clone.double_blocks, *clone.single_blocks]:
        if not any(block is b for b in clone.eager_blocks):
            block.forward = torch.compile(block.forward, backend="inductor", mode=mode)
    patch = {"freezing": variant in ("freezing", "max-autotune")}
    return clone, lambda *a: _with_config(inductor_config, patch, clone, a)


def _with_config(config, patch, module, args):
    with config.patch(patch):  # read when a graph compiles, i.e. on the first calls
        return module(*args)


def _library_share(transformer, inputs) -> float:
    """The share of an uncompiled forward's CPU time spent in matrix products and attention (BLAS / oneDNN / the
    flash-attention kernel), which inductor calls as they are: the compiled/uncompiled ratio cannot go under it."""
    from torch.profiler import ProfilerActivity, profile

    kernels = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_",
               "aten::_scaled_dot_product_flash_attention_for_cpu")
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            transformer(*inputs)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in kernels) / total


def _interleaved(eager, compiled, inputs, reps: int, clock) -> tuple[list[float], list[float]]:
    """Per-round times of both, alternating which goes first, so load changes hit both alike."""
    a, b = [], []
    with torch.inference_mode():
        for r in range(reps):
            for fn, out in ((eager, a), (compiled, b)) if r % 2 == 0 else ((compiled, b), (eager, a)):
                started = clock()
                fn(*inputs)
                out.append(clock() - started)
    return a, b


def _demo_compiled(compile: bool):
    from fluxframe import api

    return api.load(api.parse_config({"model": {"family": "flux2", "path": str(DEMO_MODEL), "dtype": "float32",
                                                "device": "cpu", "compile": compile}}))


def bench_compile(args) -> list[dict]:
    import os

    rows = []
    threads = args.compile_threads or args.threads
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    cases = [("demo 256²", _demo_compiled, 256),
             ("tiny 512²", lambda compile: _tiny_pipeline(512, 2, compile=compile)(), 512)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, make, size in cases:
            plain = make(False)
            transformer, inputs = _forward_inputs(plain, size)
            share = _library_share(transformer, inputs)
            for variant in args.compile_variants:
                torch._dynamo.reset()  # blocks of one class share compiled code: no variant may reuse another's
                if variant == "default":
                    compiled = make(True)
                    record = compiled.stages.model.compiled
                    ctransformer = _forward_inputs(compiled, size)[0]
                else:
                    record = {"variant": variant}
                    ctransformer = _compiled_variant(transformer, variant)[1]
                load = os.getloadavg()[0]
                with torch.inference_mode():
                    transformer(*inputs)  # warm-up
                    started = time.perf_counter()
                    ctransformer(*inputs)  # compiles
                    compile_s = time.perf_counter() - started
                    ctransformer(*inputs)
                    diff = float((ctransformer(*inputs) - transformer(*inputs)).abs().max())
                eager, fast = _interleaved(transformer, ctransformer, inputs, args.reps, clock)
                ratios = [f / e for e, f in zip(eager, fast)]
                rows.append({"case": name, "variant": variant, "threads": threads, "clock": args.clock,
                             "eager_ms": round(statistics.median(eager) * 1e3, 1),
                             "compiled_ms": round(statistics.median(fast) * 1e3, 1),
                             "ratio": round(statistics.median(ratios), 3), "ratio_min": round(min(ratios), 3),
                             "ratio_max": round(max(ratios), 3), "ratio_of_minima": round(min(fast) / min(eager), 3),
                             "library_share": round(share, 3), "first_call_s": round(compile_s, 1),
                             "max_abs_diff": diff, "load_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
                             "compile": record})
                print(json.dumps({"compile": rows[-1]}), file=sys.stderr)
    finally:
        torch.set_num_threads(before)
    return rows


def main() -> int:
    args = parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    out = {"threads": args.threads, "thresholds": args.thresholds, "teacache_thresholds": args.teacache_thresholds,
           "captions": args.captions}
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
