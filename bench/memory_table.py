"""Which memory configuration fits which GPU: device-resident weight bytes per configuration, computed.

The DiT's bytes come from fluxframe's own FLUX.2 DiT built on the meta device at the published shapes (dev,
klein 4B, klein 9B; see ../shared/REFERENCE.md), so they are exact for those shapes: bf16 weights, the block
linears at int8 (1 byte per weight + a float32 scale per output row) or nf4 (half a byte + a float32 scale
per 64 inputs) as ``quantize`` stores them, and for ``group-offload`` the non-block weights plus two block
groups (the running one and the prefetched one). The text encoders are counted at their nominal sizes
(Mistral Small 3.x 24B for dev, Qwen3 4B / 8B for klein) in bf16; the autoencoder at 84 M parameters.

For ``group-offload`` it also gives the DiT bytes copied to the GPU per step, and rows with ``resident_blocks``
set to the most blocks that fit a card of ``--card`` GB. The copy time beside them assumes ``--link`` GB/s.

This is arithmetic, not a measurement: activations come on top (about 1-3 GB at 1024² in bf16, estimated from
the tensor sizes of one block), and so does the CUDA context (~0.5 GB). A configuration "fits" a card when its
weights plus 3 GB stay under the card's memory.

    .venv/bin/python bench/memory_table.py [--markdown] [--card 24] [--link 25]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fluxframe.plugins.flux2.transformer import Flux2Transformer, TransformerConfig  # noqa: E402

GB = 1e9
SHAPES = {  # hidden, double, single, text width, guidance embedder; text encoder parameters (nominal)
    "dev": (TransformerConfig(), 24e9),
    "klein 4B": (TransformerConfig(num_layers=5, num_single_layers=20, num_attention_heads=24,
                                   joint_attention_dim=7680, guidance_embeds=False), 4e9),
    "klein 9B": (TransformerConfig(num_layers=8, num_single_layers=24, num_attention_heads=32,
                                   joint_attention_dim=12288, guidance_embeds=False), 8e9),
}
VAE_PARAMS = 84e6
ACTIVATIONS = 3 * GB
CARDS = (80, 48, 24, 16)


def _linear_bytes(layer: nn.Linear, fmt: str) -> float:
    out, inp = layer.weight.shape
    if fmt == "bf16":
        return 2 * out * inp
    if fmt == "int8":
        return out * inp + 4 * out
    groups = -(-inp // 64)
    return out * groups * (32 + 4)  # nf4: 64 inputs in 32 bytes, one float32 scale per group


def dit_bytes(config: TransformerConfig) -> dict:
    """Bytes of the DiT's non-block weights ("rest", kept in bf16) and of each block, per storage format."""
    with torch.device("meta"):
        model = Flux2Transformer(config)
    blocks = [*model.double_blocks, *model.single_blocks]
    block_params = {id(p) for b in blocks for p in b.parameters()}
    out = {"params": sum(p.numel() for p in model.parameters()),
           "rest": sum(2 * p.numel() for p in model.parameters() if id(p) not in block_params)}
    for fmt in ("bf16", "int8", "nf4"):
        sizes = []
        for block in blocks:
            linears = [m for m in block.modules() if type(m) is nn.Linear]
            other = sum(2 * p.numel() for p in block.parameters()) - sum(2 * m.weight.numel() for m in linears)
            sizes.append(other + sum(_linear_bytes(m, fmt) for m in linears))
        out[f"{fmt} blocks"] = sizes
        out[fmt] = out["rest"] + sum(sizes)
    return out


def streaming(dit: dict, fmt: str, budget: float | None = None) -> tuple[float, float, int]:
    """group-offload (one block per group) of the DiT stored in ``fmt``: (bytes on the GPU at once, bytes copied
    per forward, resident blocks). Without a budget no block is resident; with one, ``resident_blocks`` is the
    most first blocks that keep the DiT's bytes on the GPU within it."""
    sizes = dit[f"{fmt} blocks"]

    def on_gpu(resident: int) -> float:
        streamed = sizes[resident:]
        return dit["rest"] + sum(sizes[:resident]) + (sum(sorted(streamed)[-2:]) if streamed else 0)

    resident = 0
    while budget is not None and resident < len(sizes) and on_gpu(resident + 1) <= budget:
        resident += 1
    return on_gpu(resident), sum(sizes[resident:]), resident


def rows_for(model: str, dit: dict, card: float) -> list[tuple[str, float, float]]:
    """(configuration, weight bytes on the GPU, DiT bytes copied to the GPU per step); ``dit`` is
    ``dit_bytes`` of the model's shape."""
    text_params = SHAPES[model][1]
    text, vae = 2 * text_params, 2 * VAE_PARAMS
    rows = [
        ("none", text + dit["bf16"] + vae, 0),
        ("model-offload", max(text, dit["bf16"], vae), 0),
        ("split encoding + none", dit["bf16"] + vae, 0),
        ("quantize int8 + model-offload", max(text, dit["int8"], vae), 0),
        ("split encoding + quantize int8", dit["int8"] + vae, 0),
        ("split encoding + quantize nf4", dit["nf4"] + vae, 0),
    ]
    for fmt, name in (("bf16", "group-offload"), ("int8", "quantize int8 + group-offload")):
        gpu, copied, _ = streaming(dit, fmt)
        if fmt == "bf16":
            rows.append(("group-offload + model-offload", max(text, gpu, vae), copied))
        rows.append((f"split encoding + {name}", gpu + vae, copied))
        gpu, copied, resident = streaming(dit, fmt, card * GB - ACTIVATIONS - vae)
        if 0 < resident < len(dit[f"{fmt} blocks"]):
            rows.append((f"split encoding + {name}, resident_blocks = {resident}", gpu + vae, copied))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--card", type=float, default=24, help="GB: the card the resident_blocks rows fill")
    parser.add_argument("--link", type=float, default=25,
                        help="GB/s host-to-device, an assumption for the copy-time column (not measured)")
    args = parser.parse_args()
    for model, (config, text_params) in SHAPES.items():
        dit = dit_bytes(config)
        print(f"\n{model}: DiT {dit['params'] / 1e9:.1f} B parameters = {dit['bf16'] / GB:.1f} GB bf16, "
              f"{dit['int8'] / GB:.1f} GB int8, {dit['nf4'] / GB:.1f} GB nf4; text encoder {text_params / 1e9:.0f} B "
              f"(nominal) = {2 * text_params / GB:.0f} GB bf16")
        head = (f"| configuration | weights on the GPU | copied per step (at {args.link:g} GB/s) | "
                + " | ".join(f"{c} GB" for c in CARDS) + " |")
        if args.markdown:
            print(head)
            print("|---|---|---|" + "---|" * len(CARDS))
        for name, size, copied in rows_for(model, dit, args.card):
            fits = ["yes" if size + ACTIVATIONS <= c * GB else "no" for c in CARDS]
            per_step = f"{copied / GB:.1f} GB ({copied / GB / args.link:.2f} s)" if copied else "—"
            if args.markdown:
                print(f"| {name} | {size / GB:.1f} GB | {per_step} | " + " | ".join(fits) + " |")
            else:
                print(f"  {name:66} {size / GB:6.1f} GB  {per_step:18} " + "  ".join(f"{c}:{f:3}" for c, f in
                                                                                    zip(CARDS, fits)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
