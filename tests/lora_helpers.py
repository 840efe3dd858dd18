"""Test LoRA files: random PEFT-format (diffusers-named) LoRAs for a loaded FLUX.2 DiT."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from fluxframe.plugins.flux2 import keymap


def write_peft_lora(transformer, layers, path: Path, *, rank: int = 4, scale: float = 0.5, seed: int = 0) -> Path:
    """A LoRA of ``rank`` on each of ``layers`` (diffusers module names) of ``transformer``, seeded, written to
    ``path`` with the ``transformer.`` prefix diffusers' PEFT layout uses."""
    shapes = {k: v.shape for k, v in keymap.to_diffusers(transformer.state_dict(), transformer.config).items()}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in layers:
        out_features, in_features = shapes[f"{name}.weight"]
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=g) * scale
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=g) * scale
    save_file(tensors, str(path))
    return path
