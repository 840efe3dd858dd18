"""LoRA files in the formats people publish them in, read into one form: per layer a down (rank, in) and an up
(out, rank) matrix and an optional alpha.

Recognised key layouts (the module part may use either diffusers' names or the original ones):

- diffusers / PEFT: ``[transformer.|base_model.model.]<module>.lora_A[.default].weight`` and ``lora_B``;
- kohya: ``lora_unet_<module with _ for .>.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``;
- ai-toolkit and other trainers writing original names: ``[diffusion_model.]<module>.lora_A.weight`` /
  ``lora_down`` ..., with or without ``.alpha``.

The scale of a layer is ``weight · alpha / rank`` where the file gives an alpha, else ``weight`` (PEFT files
from diffusers carry no alpha: their updates are stored at scale 1). Anything else in the file (DoRA
magnitudes, bias deltas, full weight diffs) is refused with its key named, rather than silently skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fluxframe.core.checkpoint import SafetensorsCheckpoint
from fluxframe.errors import CheckpointError

PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_",
            "lora_transformer_")
DOWN = (".lora_A.default.weight", ".lora_A.weight", ".lora_down.weight")
UP = (".lora_B.default.weight", ".lora_B.weight", ".lora_up.weight")
ALPHA = (".alpha",)


@dataclass
class LoraLayer:
    """One adapted layer as the file names it (prefix and LoRA suffix removed)."""

    name: str
    key: str  # the file's key of the down matrix, for messages
    down: torch.Tensor  # (rank, in)
    up: torch.Tensor  # (out, rank)
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def scale(self, weight: float) -> float:
        return weight * (self.alpha / self.rank if self.alpha is not None else 1.0)


def _split(key: str) -> tuple[str, str] | None:
    """(module name, role) of a LoRA key, role one of down/up/alpha; None for keys that are none of them."""
    for role, suffixes in (("down", DOWN), ("up", UP), ("alpha", ALPHA)):
        for suffix in suffixes:
            if key.endswith(suffix):
                name = key[: -len(suffix)]
                for prefix in PREFIXES:
                    if name.startswith(prefix):
                        name = name[len(prefix):]
                        break
                return name, role
    return None


def read_lora(path: Path) -> list[LoraLayer]:
    """Every layer of a LoRA safetensors file, in file order; CheckpointError naming the file and key for
    a key that is not a LoRA matrix, a down without its up (or the reverse), or matrices whose ranks differ."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("LoRA file does not exist" if not path.exists() else "not a file", file=str(path))
    parts: dict[str, dict[str, str]] = {}
    with SafetensorsCheckpoint([path]) as ckpt:
        keys = ckpt.keys()
        if not keys:
            raise CheckpointError("the LoRA file holds no tensors", file=str(path))
        for key in keys:
            split = _split(key)
            if split is None:
                raise CheckpointError(
                    "not a LoRA matrix fluxframe can apply (expected lora_A/lora_B, lora_down/lora_up or alpha "
                    "keys; DoRA, bias and full-weight deltas are not supported)", file=str(path), key=key)
            name, role = split
            if role in parts.setdefault(name, {}):
                raise CheckpointError(f"a second {role} matrix for layer {name!r} (also {parts[name][role]!r})",
                                      file=str(path), key=key)
            parts[name][role] = key
        layers = []
        for name, roles in parts.items():
            for needed in ("down", "up"):
                if needed not in roles:
                    other = next(iter(roles.values()))
                    raise CheckpointError(f"layer {name!r} has no {needed} matrix", file=str(path), key=other)
            down, up = ckpt.get(roles["down"]), ckpt.get(roles["up"])
            if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
                raise CheckpointError(
                    f"down {tuple(down.shape)} and up {tuple(up.shape)} are not the two factors of a rank-r "
                    "update of a linear layer (down (r, in), up (out, r))", file=str(path), key=roles["down"])
            if not (down.is_floating_point() and up.is_floating_point()):
                raise CheckpointError(f"LoRA matrices must be floating point, got {down.dtype}", file=str(path),
                                      key=roles["down"])
            alpha = None
            if "alpha" in roles:
                value = ckpt.get(roles["alpha"])
                if value.numel() != 1 or not torch.isfinite(value.float()).all():
                    raise CheckpointError("alpha must be one finite number", file=str(path), key=roles["alpha"])
                alpha = float(value.float().item())
            layers.append(LoraLayer(name=name, key=roles["down"], down=down, up=up, alpha=alpha))
    return layers
