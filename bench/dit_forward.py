"""FLUX.2 DiT forward: fluxframe's Flux2Transformer against diffusers' Flux2Transformer2DModel.

Both models get identical weights (diffusers' state dict mapped through ``keymap.from_diffusers``)
and identical inputs, and run in the same process under ``torch.inference_mode``. After a warm-up
the two are timed in alternating rounds (ours first on even rounds, theirs first on odd) so drift
in machine load hits both alike. Reported: median time per model, the median of the per-round
ratios fluxframe / diffusers (target <= 0.9) with min and max, and the relative error
||ours - theirs|| / ||theirs|| of the outputs; the script exits 1 if that error is too large
(1e-4 in float32, 3e-2 in bfloat16, where both sides round differently).

    .venv/bin/python bench/dit_forward.py                        # 4 double + 8 single, hidden 512, fp32
    .venv/bin/python bench/dit_forward.py --dtype bfloat16 --threads 2 --json
    .venv/bin/python bench/dit_forward.py --threads 1 --clock cpu    # steadiest on a busy machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from fluxframe.plugins.flux2 import keymap
from fluxframe.plugins.flux2.family import image_ids, text_ids
from fluxframe.plugins.flux2.transformer import Flux2Transformer, TransformerConfig

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--double", type=int, default=4, help="double-stream blocks")
    p.add_argument("--single", type=int, default=8, help="single-stream blocks")
    p.add_argument("--hidden", type=int, default=512, help="hidden size (heads x head dim)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--image-tokens", type=int, default=1024, help="a square number (square latent grid)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--text-dim", type=int, default=1536, help="joint_attention_dim")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time, which ignores time lost to other processes; use with --threads 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args()


def build_models(args, dtype):
    from diffusers import Flux2Transformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # no advice about from_pretrained on .to(dtype)

    head_dim = args.hidden // args.heads
    if head_dim * args.heads != args.hidden or head_dim % 8:
        sys.exit(f"--hidden {args.hidden} / --heads {args.heads} must give a head dim divisible by 8")
    ref = Flux2Transformer2DModel(
        in_channels=128, num_layers=args.double, num_single_layers=args.single, attention_head_dim=head_dim,
        num_attention_heads=args.heads, joint_attention_dim=args.text_dim, axes_dims_rope=(head_dim // 4,) * 4,
        guidance_embeds=True,
    ).eval()
    with torch.no_grad():  # scaled random weights, norm scales near 1, so every tensor shapes the output
        for p in ref.parameters():
            p.normal_(0, 0.5 / p.shape[-1] ** 0.5 if p.ndim > 1 else 0.2).add_(0.0 if p.ndim > 1 else 1.0)
    config = TransformerConfig.from_dict(dict(ref.config))
    sd = ref.state_dict()
    mapped = {k: sd[s] if isinstance(s, str) else s[1]([sd[x] for x in s[0]])
              for k, s in keymap.from_diffusers(config).items()}
    with torch.device("meta"):
        ours = Flux2Transformer(config)
    ours.load_state_dict({k: v.clone() for k, v in mapped.items()}, assign=True)  # no storage shared with ref
    return ours.eval().to(dtype), ref.to(dtype), config


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    side = round(args.image_tokens ** 0.5)
    if side * side != args.image_tokens:
        sys.exit(f"--image-tokens {args.image_tokens} is not a square number")
    torch.manual_seed(args.seed)
    load_before = os.getloadavg()[0]  # the timings are only as quiet as the machine: report its load
    ours, ref, config = build_models(args, dtype)

    img = torch.randn(1, args.image_tokens, config.in_channels).to(dtype)
    txt = torch.randn(1, args.text_tokens, config.joint_attention_dim).to(dtype)
    img_ids, txt_ids = image_ids(side, side), text_ids(args.text_tokens)
    t, g = torch.tensor([0.7], dtype=dtype), torch.tensor([4.0], dtype=dtype)  # sigma; guidance scale as is

    def run_ours():
        return ours(img, img_ids, txt, txt_ids, t, g)

    def run_theirs():
        return ref(hidden_states=img, encoder_hidden_states=txt, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                   guidance=g, return_dict=False)[0]

    clock = time.perf_counter if args.clock == "wall" else time.process_time

    def timed(fn):
        start = clock()
        fn()
        return clock() - start

    with torch.inference_mode():
        a, b = run_ours(), run_theirs()
        rel_err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        for _ in range(args.warmup - 1):
            run_ours(), run_theirs()
        times = {run_ours: [], run_theirs: []}
        for r in range(args.rounds):  # ours first on even rounds, diffusers first on odd ones
            for fn in (run_ours, run_theirs) if r % 2 == 0 else (run_theirs, run_ours):
                times[fn].append(timed(fn))
        times_ours, times_theirs = times[run_ours], times[run_theirs]

    ratios = [o / d for o, d in zip(times_ours, times_theirs)]
    tol = TOLERANCE[dtype]
    result = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype, "clock": args.clock,
        "config": {"double": args.double, "single": args.single, "hidden": args.hidden, "heads": args.heads,
                   "head_dim": config.attention_head_dim, "image_tokens": args.image_tokens,
                   "text_tokens": args.text_tokens, "text_dim": args.text_dim, "rounds": args.rounds},
        "ours_ms": 1e3 * statistics.median(times_ours), "diffusers_ms": 1e3 * statistics.median(times_theirs),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "rel_err": rel_err, "rel_err_tolerance": tol, "ok": rel_err < tol,
    }
    if args.json:
        print(json.dumps(result))
    else:
        c = result["config"]
        print(f"torch {result['torch']}, {result['threads']} threads, {args.dtype}, {args.clock} clock, "
              f"1-min load average {result['load_avg_1min'][0]} before / {result['load_avg_1min'][1]} after")
        print(f"config: {c['double']} double + {c['single']} single blocks, hidden {c['hidden']} "
              f"({c['heads']} heads x {c['head_dim']}), {c['image_tokens']} image + {c['text_tokens']} text tokens, "
              f"text dim {c['text_dim']}, batch 1, {args.rounds} rounds")
        print(f"fluxframe  {result['ours_ms']:9.2f} ms (median)")
        print(f"diffusers  {result['diffusers_ms']:9.2f} ms (median)")
        print(f"ratio fluxframe/diffusers: median {result['ratio_median']:.3f} "
              f"(min {result['ratio_min']:.3f}, max {result['ratio_max']:.3f}; target <= 0.9)")
        print(f"output rel err {rel_err:.2e} (tolerance {tol:.0e}) {'ok' if result['ok'] else 'FAIL'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
