"""DiT step time of each memory strategy (and of LoRA fused vs side path) relative to ``none``, on CPU.

One FLUX.2-architecture DiT with random weights (default: hidden 1024, 2 double + 4 single blocks, 1024 image
tokens + 128 text tokens, fp32) is copied once per configuration, placed by the strategy exactly as the model
family does (``place`` at load, ``using`` around each forward), and timed in interleaved rounds: every round
runs one forward of every configuration, so machine noise hits all of them alike; the ratio is the median of
per-round ratios to ``none``. Each configuration's output is compared with ``none``'s (relative L2) as a check
that it ran the same model.

On the CPU, the offloading strategies copy weights between two CPU tensors (the same code that streams to a
GPU, minus the side stream and pinned memory), so their ratio here is the cost of the bookkeeping and copies,
not a prediction of GPU behaviour.

    .venv/bin/python bench/memory_steps.py [--hidden 1024] [--rounds 5] [--threads 2] [--clock cpu] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fluxframe.core.interfaces import ComposedStrategy  # noqa: E402
from fluxframe.plugins.flux2 import keymap  # noqa: E402
from fluxframe.plugins.flux2.family import image_ids, text_ids  # noqa: E402
from fluxframe.plugins.flux2.transformer import Flux2Transformer, TransformerConfig  # noqa: E402
from fluxframe.plugins.lora import LoraSpec, apply_loras, lora_targets  # noqa: E402
from fluxframe.plugins.memory import GroupOffload, KeepOnDevice, ModelOffload, Quantize  # noqa: E402


def strategies() -> dict[str, object]:
    return {
        "none": KeepOnDevice(),
        "model-offload": ModelOffload(),
        "group-offload": GroupOffload(blocks_per_group=1),
        "quantize int8": Quantize("int8"),
        "quantize fp8": Quantize("fp8"),
        "quantize nf4": Quantize("nf4"),
        "quantize int8 + group-offload": ComposedStrategy([Quantize("int8"), GroupOffload(blocks_per_group=1)]),
    }


def write_lora(model: Flux2Transformer, rank: int, folder: Path) -> Path:
    """A LoRA of ``rank`` on every linear layer of every block (original names, ai-toolkit style)."""
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "blocks." in name:
            tensors[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.01
            tensors[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.01
    path = folder / f"rank{rank}.safetensors"
    save_file(tensors, str(path))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (heads of 128)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--single-layers", type=int, default=4)
    parser.add_argument("--grid", type=int, default=32, help="image tokens per side")
    parser.add_argument("--text", type=int, default=128, help="text tokens")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall clock, or this process's CPU time (steadier on a busy machine with --threads 1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")

    config = TransformerConfig(num_layers=args.layers, num_single_layers=args.single_layers,
                               num_attention_heads=args.hidden // 128, joint_attention_dim=1536)
    torch.manual_seed(0)
    base = Flux2Transformer(config).eval()
    g = torch.Generator().manual_seed(2)
    inputs = (torch.randn(1, args.grid ** 2, config.in_channels, generator=g), image_ids(args.grid, args.grid),
              torch.randn(1, args.text, config.joint_attention_dim, generator=g), text_ids(args.text),
              torch.tensor([0.6]), torch.tensor([4.0]))

    runs: dict[str, tuple[object, torch.nn.Module]] = {}
    for name, strategy in strategies().items():
        runs[name] = (strategy, strategy.place("transformer", copy.deepcopy(base), device))
    with tempfile.TemporaryDirectory() as tmp:
        lora = write_lora(base, args.rank, Path(tmp))
        targets = lora_targets(keymap.rules(config), base, config.hidden_size)
        for mode in ("fuse", "side"):
            model = copy.deepcopy(base)
            apply_loras(model, targets, [LoraSpec(lora, 1.0, mode)], device=device)
            runs[f"LoRA rank {args.rank} {mode}"] = (KeepOnDevice(), model)
        model = Quantize("int8").place("transformer", copy.deepcopy(base), device)
        apply_loras(model, targets, [LoraSpec(lora, 1.0)], device=device)
        runs[f"quantize int8 + LoRA rank {args.rank} (side)"] = (KeepOnDevice(), model)

    def forward(strategy, model):
        with torch.inference_mode(), strategy.using("transformer", model, device):
            return model(*inputs)

    outputs = {name: forward(*run) for name, run in runs.items()}  # warm-up, and the outputs to compare
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = clock()
            forward(*run)
            times[name].append(clock() - start)

    reference = outputs["none"]
    lora_reference = outputs[f"LoRA rank {args.rank} fuse"]
    rows = []
    for name in runs:
        ratios = [t / n for t, n in zip(times[name], times["none"])]
        against = lora_reference if "LoRA" in name else reference
        rows.append({"configuration": name, "median_s": statistics.median(times[name]),
                     "ratio_to_none": statistics.median(ratios),
                     "rel_diff": ((outputs[name] - against).norm() / against.norm()).item(),
                     "compared_with": "LoRA fuse" if "LoRA" in name else "none"})
    result = {"config": {"hidden": args.hidden, "double": args.layers, "single": args.single_layers,
                         "image_tokens": args.grid ** 2, "text_tokens": args.text, "dtype": "float32",
                         "threads": args.threads, "rounds": args.rounds, "clock": args.clock,
                         "params_M": round(sum(p.numel() for p in base.parameters()) / 1e6, 1)},
              "load_average": os.getloadavg(), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    c = result["config"]
    print(f"FLUX.2 DiT, {c['params_M']} M params (hidden {c['hidden']}, {c['double']} double + {c['single']} single), "
          f"{c['image_tokens']} + {c['text_tokens']} tokens, fp32, {c['threads']} threads, {c['rounds']} rounds, "
          f"{c['clock']} clock, "
          f"load average {result['load_average'][0]:.1f}")
    print(f"{'configuration':44} {'median s':>9} {'x none':>7} {'rel. diff':>10}  (against)")
    for r in rows:
        print(f"{r['configuration']:44} {r['median_s']:9.3f} {r['ratio_to_none']:7.2f} {r['rel_diff']:10.1e}  "
              f"({r['compared_with']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
