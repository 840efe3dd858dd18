"""The parts FLUX.2's and Flux.1's diffusion transformers share, in plain PyTorch: RoPE tables and their
application, the sinusoidal timestep embedding, per-head QK RMSNorm, adaLN modulation, joint attention, and the
reading of a transformer config.json within sane bounds. Both families' DiTs are built from these, so the two
compute them exactly alike.
"""

from __future__ import annotations

import math
from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn

from fluxframe.errors import CheckpointError

from . import bounds


class DiTShape:
    """The sizes every DiT config derives from its fields (``num_attention_heads``, ``attention_head_dim``,
    ``in_channels``, ``out_channels``)."""

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels


def config_from_dict(cls, d: dict, *, source: str, what: str):
    """A transformer config dataclass from a diffusers config.json: "_" keys skipped, lists made tuples,
    an unknown key a CheckpointError naming it (a setting we ignored could change the math), every value
    of the right type and within sane bounds (``check_sizes``)."""
    known = {f.name for f in fields(cls)}
    values = {}
    for key, value in d.items():
        if key.startswith("_"):
            continue
        if key not in known:
            raise CheckpointError(f"unknown {what} transformer setting; is this a {what} checkpoint?",
                                  file=source, key=key)
        values[key] = tuple(value) if isinstance(value, list) else value
    config = check_sizes(cls(**values), source)
    if config.patch_size != 1:
        raise CheckpointError("only patch_size 1 is supported", file=source, key="patch_size")
    return config


def check_sizes(config, source: str, names: dict[str, str] | None = None):
    """``config`` (a FLUX.2 or Flux.1 transformer config) if every field has its type and sane bounds (see
    common/bounds.py), else a CheckpointError naming ``source`` and the field, or ``names[field]`` where the sizes
    were read from something else (a single file's tensors). Nothing is built before this passes."""
    names = names or {}
    for f in fields(config):
        value, key = getattr(config, f.name), names.get(f.name, f.name)
        if f.name in ("num_layers", "num_single_layers"):  # no blocks of one kind is a valid (if odd) DiT
            bounds.integer(value, file=source, key=key, maximum=bounds.MAX_BLOCKS, minimum=0)
        elif f.name == "num_attention_heads":
            bounds.integer(value, file=source, key=key, maximum=bounds.MAX_HEADS)
        elif f.name == "rope_theta":
            bounds.number(value, file=source, key=key)
        elif f.name == "mlp_ratio":
            bounds.number(value, file=source, key=key, maximum=bounds.MAX_MLP_RATIO)
        elif f.name == "eps":
            bounds.number(value, file=source, key=key, maximum=1.0, below=True)
        elif f.type == "bool":
            if not isinstance(value, bool):
                raise CheckpointError(f"expected true or false, got {bounds.short(value)}", file=source, key=key)
        elif f.type.startswith("tuple"):
            bounds.integers(value, file=source, key=key, maximum=bounds.MAX_WIDTH, max_len=bounds.MAX_AXES)
        elif f.type == "int" or value is not None:  # "int | None": null means "as in_channels"
            bounds.integer(value, file=source, key=key, maximum=bounds.MAX_WIDTH)
    hidden = config.num_attention_heads * config.attention_head_dim
    if hidden > bounds.MAX_WIDTH:
        raise CheckpointError(f"{config.num_attention_heads} heads of {config.attention_head_dim} make a hidden size "
                              f"of {hidden}, more than {bounds.MAX_WIDTH}", file=source,
                              key=names.get("num_attention_heads", "num_attention_heads"))
    # Per block, about (4 + 3 * mlp_ratio) * hidden^2 weights; a double block has two streams.
    deepest = "num_layers" if 2 * config.num_layers >= config.num_single_layers else "num_single_layers"
    count = (2 * config.num_layers + config.num_single_layers) * (4 + 3 * config.mlp_ratio) * hidden * hidden
    bounds.parameters(count, file=source, key=names.get(deepest, deepest), what="transformer")
    return config


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t·1000, cosine half first, computed in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_table(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> tuple[torch.Tensor, ...]:
    """The rotations for 4-axis position ids (S, 4): a complex64 table cos + i·sin, (S, head_dim/2),
    or on MPS, which lacks complex kernels, the pair (cos, sin).

    Angles are computed in float64 where the device has it: positions reach the thousands and
    fp32 angles would drift from the reference implementation.
    """
    dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    angles = []
    for axis, dim in enumerate(axes_dims):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype, device=ids.device) / dim))
        angles.append(ids[:, axis].to(dtype)[:, None] * inv_freq[None])
    angles = torch.cat(angles, dim=-1)
    if ids.device.type == "mps":
        return angles.cos().float(), angles.sin().float()
    return (torch.polar(torch.ones_like(angles), angles).to(torch.complex64),)


def apply_rope(x: torch.Tensor, *table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1) of x (B, H, S, D) by the angles, in fp32: one complex
    multiply (a single pass over x), or the real-valued form where the table is (cos, sin)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if len(table) == 1:
        return torch.view_as_real(torch.view_as_complex(pairs) * table[0]).flatten(-2).to(x.dtype)
    cos, sin = table
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys, with learned scales."""

    def __init__(self, head_dim: int, eps: float):
        super().__init__()
        self.query_norm = _RMSScale(head_dim, eps)
        self.key_norm = _RMSScale(head_dim, eps)


class _RMSScale(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.scale, self.eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """adaLN: layer-normalised x (no affine), scaled by 1 + scale and shifted."""
    return torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=eps), 1 + scale)


def attention(q, k, v, rope, q_rope=None, attn_mask=None) -> torch.Tensor:
    """Joint attention of heads (B, H, S, D) with RoPE (``q_rope``: the queries' own rows of the table, where they
    are fewer than the keys); ``attn_mask`` is added to the logits (or masks them, if bool). Returns (B, S, H·D)."""
    q, k = apply_rope(q, *(q_rope or rope)), apply_rope(k, *rope)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return out.transpose(1, 2).flatten(2)


def clip_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp16 activations clipped to its finite range, as the reference does after each block."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x
