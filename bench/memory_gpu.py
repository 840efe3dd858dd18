"""Step time and peak GPU memory of a FLUX.2 DiT under each memory configuration: fluxframe's strategies against
diffusers' equivalent options, in one run, on the same random weights (issue 7's GPU benchmark).

Default: the full-size FLUX.2 dev DiT (32 B parameters) in bf16 at 1024² (4,096 image tokens) with 512 text
tokens, one forward per step as in sampling (guidance embedded). Configurations (``--configs``, default all):

  fluxframe:none                        everything on the GPU
  fluxframe:model-offload               the DiT copied to the GPU when it runs (first step), then kept
  fluxframe:group-offload               blocks streamed one at a time, next one prefetched on a side stream
  fluxframe:int8 / fp8 / nf4            ``quantize`` (weights dequantised per layer at matmul time)
  fluxframe:int8+group-offload          the quantised blocks streamed
  fluxframe:int8+group-offload+resident the same with ``resident_blocks`` filling a ``--card`` GB card
  diffusers:none                        Flux2Transformer2DModel on the GPU
  diffusers:model-offload               accelerate's cpu_offload_with_hook (what enable_model_cpu_offload puts
                                        on each pipeline component)
  diffusers:group-offload               enable_group_offload(block_level, 1 block per group, use_stream)
  diffusers:fp8-storage                 enable_layerwise_casting(float8_e4m3fn storage, bf16 compute)
  diffusers:fp8-storage+group-offload   both

Both frameworks get the same weights: every tensor, in diffusers' layout, is drawn on the device from a
generator seeded by its name; fluxframe's tensors are made from those through ``keymap.from_diffusers``. Each
configuration runs in a fresh subprocess (its own CUDA allocator and host memory), is built on the GPU, placed
as the strategy places it (the offloading ones copy it to pinned CPU memory), and then timed: the first step
(which includes model-offload's copy) and the median of the following ``--steps`` − 1 (CUDA-synchronised wall
clock). Reported per configuration: the GPU memory its weights hold after placement and the peak during the
steps (torch.cuda.max_memory_allocated), both times, and the first output's relative L2 error against
fluxframe:none. The summary gives fluxframe/diffusers speed with everything on the GPU (target ≥ 1.2×) and the
configurations that peak within ``--card`` GB with their step time relative to fluxframe:none (target ≤ 2×).

    python bench/memory_gpu.py                                  # all configurations, dev, 1024², on CUDA
    python bench/memory_gpu.py --configs fluxframe:none diffusers:none --results run.json   # a subset, merged
                                                                # (outputs kept in run.json.outputs/)
    python bench/memory_gpu.py --results run.json --report-only --markdown   # the table for BENCHMARKS.md
    .venv/bin/python bench/memory_gpu.py --device cpu --shape tiny --dtype float32 --in-process   # a smoke run

On the CPU (``--device cpu``) the same code runs, memory figures are left out, and offloading copies between
two CPU tensors; it checks that the script works, nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_table import ACTIVATIONS, GB, SHAPES, dit_bytes, streaming  # noqa: E402

from fluxframe.core.interfaces import ComposedStrategy  # noqa: E402
from fluxframe.plugins.flux2 import keymap  # noqa: E402
from fluxframe.plugins.flux2.family import image_ids, text_ids  # noqa: E402
from fluxframe.plugins.flux2.transformer import Flux2Transformer, TransformerConfig  # noqa: E402
from fluxframe.plugins.memory import GroupOffload, KeepOnDevice, ModelOffload, Quantize  # noqa: E402

TINY = TransformerConfig(num_layers=2, num_single_layers=4, num_attention_heads=2, attention_head_dim=32,
                         axes_dims_rope=(8, 8, 8, 8), joint_attention_dim=64)
CONFIGS = ("fluxframe:none", "fluxframe:model-offload", "fluxframe:group-offload", "fluxframe:int8",
           "fluxframe:fp8", "fluxframe:nf4", "fluxframe:int8+group-offload", "fluxframe:int8+group-offload+resident",
           "diffusers:none", "diffusers:model-offload", "diffusers:group-offload", "diffusers:fp8-storage",
           "diffusers:fp8-storage+group-offload")
REFERENCE = "fluxframe:none"


def shape_config(name: str) -> TransformerConfig:
    return TINY if name == "tiny" else SHAPES[name][0]


def draw(name: str, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The tensor called ``name`` (diffusers' key): matrices scaled by 0.5/sqrt(fan-in) so 56 blocks of random
    weights keep activations finite in bf16, norm scales near 1, biases near 0."""
    generator = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
    out = torch.empty(shape, device=device, dtype=torch.float32)
    if len(shape) > 1:
        out.normal_(0.0, 0.5 / shape[-1] ** 0.5, generator=generator)
    elif name.endswith("bias"):
        out.normal_(0.0, 0.02, generator=generator)
    else:
        out.normal_(1.0, 0.1, generator=generator)
    return out.to(dtype)


def build_fluxframe(config: TransformerConfig, device: torch.device, dtype: torch.dtype) -> Flux2Transformer:
    with torch.device("meta"):
        model = Flux2Transformer(config)
    shapes = {k: v.shape for k, v in keymap.to_diffusers(model.state_dict(), config).items()}
    state = {}
    for ours, theirs in keymap.from_diffusers(config).items():
        if isinstance(theirs, str):
            state[ours] = draw(theirs, shapes[theirs], device, dtype)
        else:
            keys, combine = theirs
            state[ours] = combine([draw(k, shapes[k], device, dtype) for k in keys])
    model.load_state_dict(state, assign=True)
    return model.eval()


def build_diffusers(config: TransformerConfig, device: torch.device, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    with init_empty_weights():
        model = Flux2Transformer2DModel(**dataclasses.asdict(config))
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(draw(name, param.shape, device, dtype))
    return model.eval()


def resident_blocks(config: TransformerConfig, shape: str, card: float) -> int:
    if shape == "tiny":
        return (config.num_layers + config.num_single_layers) // 2
    return streaming(dit_bytes(config), "int8", card * GB - ACTIVATIONS)[2]


def place_fluxframe(name: str, model, config, device, args):
    """(strategy, model) as the named configuration runs it: built on the device, quantised there, then moved to
    the CPU where a strategy streams or offloads it."""
    option = name.split(":", 1)[1]
    fmt = next((f for f in ("int8", "fp8", "nf4") if option.startswith(f)), None)
    if fmt:
        Quantize(fmt).place("transformer", model, device)  # on the device: fast; the same layers as while loading
    if option in ("none", "int8", "fp8", "nf4"):
        return KeepOnDevice(), model
    if option == "model-offload":
        strategy = ModelOffload()
    else:
        resident = resident_blocks(config, args.shape, args.card) if option.endswith("resident") else 0
        strategy = GroupOffload(blocks_per_group=1, resident_blocks=resident)
        if fmt:
            strategy = ComposedStrategy([Quantize(fmt), strategy])  # Quantize finds no layer left to rewrite
    return strategy, strategy.place("transformer", model, device)  # copies what it offloads to (pinned) CPU memory


def place_diffusers(name: str, model, device):
    option = name.split(":", 1)[1]
    if option.startswith("fp8-storage"):
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=model.dtype)
    # Both move the model to the CPU themselves. Group offloading pins a CPU copy of every weight and points the
    # weights at it; called on a CPU model that copy would come on top of the model's (2 x 64 GB for dev).
    if option == "model-offload":
        from accelerate import cpu_offload_with_hook

        cpu_offload_with_hook(model, execution_device=device)
    elif option.endswith("group-offload"):
        model.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1,
                                   use_stream=device.type == "cuda")
    return model


def run_one(name: str, args) -> tuple[dict, torch.Tensor]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = shape_config(args.shape)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    grid = args.size // 16  # 8x autoencoder, 2x2 patches
    g = torch.Generator(device=device).manual_seed(1)
    img = torch.randn(1, grid * grid, config.in_channels, generator=g, device=device).to(dtype)
    txt = torch.randn(1, args.text, config.joint_attention_dim, generator=g, device=device).to(dtype)
    img_ids, txt_ids = image_ids(grid, grid).to(device), text_ids(args.text).to(device)
    sigma = torch.tensor([0.7], device=device, dtype=dtype)
    guidance = torch.tensor([4.0], device=device, dtype=dtype) if config.guidance_embeds else None

    if name.startswith("fluxframe:"):
        strategy, model = place_fluxframe(name, build_fluxframe(config, device, dtype), config, device, args)

        def forward():
            with strategy.using("transformer", model, device):
                return model(img, img_ids, txt, txt_ids, sigma, guidance)
    else:
        model = place_diffusers(name, build_diffusers(config, device, dtype), device)

        def forward():
            return model(hidden_states=img, encoder_hidden_states=txt, timestep=sigma, img_ids=img_ids,
                         txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]

    def timed():
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = forward()
        if cuda:
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - start

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        placed = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        output, first = timed()
        steps = [timed()[1] for _ in range(max(1, args.steps - 1))]
    row = {"config": name, "first_s": first, "step_s": statistics.median(steps), "steps": len(steps),
           "weights_gb": placed / GB if cuda else None,
           "peak_gb": torch.cuda.max_memory_allocated(device) / GB if cuda else None}
    return row, output.float().cpu()


def _stem(scratch: Path, name: str) -> Path:
    """Where a configuration's first output (.pt) and, from a worker, its row (.json) are kept."""
    return Path(scratch) / name.replace(":", "_")


def worker(args) -> int:
    row, output = run_one(args.worker, args)
    stem = _stem(args.scratch, args.worker)
    torch.save(output, stem.with_suffix(".pt"))
    stem.with_suffix(".json").write_text(json.dumps(row))
    return 0


def measure(args, scratch: Path) -> list[dict]:
    """Run the configurations; each one's first output is kept in ``scratch``, where the reference's is read
    from (by a later run with --results, too)."""
    rows = []
    outputs = {}
    for name in args.configs:
        print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)
        stem = _stem(scratch, name)
        if args.in_process:
            row, outputs[name] = run_one(name, args)
            torch.save(outputs[name], stem.with_suffix(".pt"))
        else:
            argv = [sys.executable, __file__, "--worker", name, "--scratch", str(scratch)]
            for key in ("device", "shape", "dtype", "size", "text", "steps", "card"):
                argv += [f"--{key}", str(getattr(args, key))]
            done = subprocess.run(argv, env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
            if done.returncode != 0:
                rows.append({"config": name, "error": f"exit status {done.returncode}"})
                continue
            row, outputs[name] = json.loads(stem.with_suffix(".json").read_text()), torch.load(
                stem.with_suffix(".pt"))
        rows.append(row)
    reference_file = _stem(scratch, REFERENCE).with_suffix(".pt")
    if reference_file.exists():
        reference = torch.load(reference_file)
        for row in rows:
            if row["config"] in outputs:
                out = outputs[row["config"]]
                row["rel_err"] = float((out - reference).norm() / reference.norm())
    return rows


def summary(rows: list[dict], card: float) -> list[str]:
    by = {r["config"]: r for r in rows if "error" not in r}
    lines = []
    if "fluxframe:none" in by and "diffusers:none" in by:
        speed = by["diffusers:none"]["step_s"] / by["fluxframe:none"]["step_s"]
        lines.append(f"everything on the device: fluxframe {speed:.2f}x diffusers' speed (target >= 1.2)")
    if "fluxframe:none" in by:
        base = by["fluxframe:none"]["step_s"]
        fits = [r for r in by.values() if r.get("peak_gb") is not None and r["peak_gb"] <= card]
        for r in sorted(fits, key=lambda r: r["step_s"]):
            lines.append(f"peak {r['peak_gb']:.1f} GB <= {card:g} GB: {r['config']} at {r['step_s'] / base:.2f}x "
                         f"fluxframe:none's step time (target <= 2)")
    return lines


def table(rows: list[dict], meta: dict, markdown: bool) -> str:
    base = next((r["step_s"] for r in rows if r["config"] == REFERENCE and "error" not in r), None)
    head = ["configuration", "weights on GPU", "peak", "first step", "step", "x fluxframe:none", "rel. err"]
    def gb(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f} GB"

    body = []
    for r in rows:
        if "error" in r:
            body.append([r["config"], r["error"], "", "", "", "", ""])
            continue
        body.append([r["config"], gb(r.get("weights_gb")), gb(r.get("peak_gb")), f"{r['first_s']:.3f} s",
                     f"{r['step_s']:.3f} s", f"{r['step_s'] / base:.2f}" if base else "—",
                     f"{r['rel_err']:.1e}" if "rel_err" in r else "—"])
    lines = [f"{meta['device_name']}, torch {meta['torch']}, {meta['date']}: FLUX.2 {meta['shape']} DiT "
             f"({meta['params_b']:.2f} B parameters, random weights), {meta['dtype']}, {meta['size']}² "
             f"({meta['image_tokens']} image + {meta['text']} text tokens), median of {meta['steps'] - 1} steps "
             f"after the first", f"command: `{meta['command']}`", ""]
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    else:
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [head, *body]]
    return "\n".join(lines + [""] + summary(rows, meta["card"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS, metavar="CONFIG")
    parser.add_argument("--shape", default="dev", choices=[*SHAPES, "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (tokens: (size/16)²)")
    parser.add_argument("--text", type=int, default=512, help="text tokens")
    parser.add_argument("--steps", type=int, default=5, help="forwards per configuration, the first timed apart")
    parser.add_argument("--card", type=float, default=24, help="GB: the card the resident configuration fills")
    parser.add_argument("--in-process", action="store_true", help="no subprocess per configuration (CPU smoke runs)")
    parser.add_argument("--results", type=Path, help="JSON file: rows merged into it (by configuration)")
    parser.add_argument("--report-only", action="store_true", help="print the table of --results, run nothing")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark is for a GPU (use --device cpu --shape tiny for a smoke run)")
    config = shape_config(args.shape)
    meta = {"device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU",
            "torch": torch.__version__, "date": datetime.date.today().isoformat(), "shape": args.shape,
            "params_b": dit_bytes(config)["params"] / 1e9, "dtype": args.dtype, "size": args.size,
            "image_tokens": (args.size // 16) ** 2, "text": args.text, "steps": args.steps, "card": args.card,
            "command": " ".join(["python", *sys.argv])}
    previous = json.loads(args.results.read_text()) if args.results and args.results.exists() else {"rows": []}
    rows = previous["rows"]
    if not args.report_only:
        if args.results:  # outputs kept beside the results, so a later subset is compared with the same reference
            scratch = args.results.with_name(args.results.name + ".outputs")
            scratch.mkdir(exist_ok=True)
            fresh = measure(args, scratch)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                fresh = measure(args, Path(tmp))
        names = {r["config"] for r in fresh}
        rows = [r for r in rows if r["config"] not in names] + fresh
        if args.results:
            args.results.write_text(json.dumps({"meta": previous.get("meta", meta), "rows": rows}, indent=1))
    meta = previous.get("meta", meta) if args.report_only else meta
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows, "summary": summary(rows, args.card)}, indent=1))
    else:
        print(table(rows, meta, args.markdown))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
