"""The Flux.1-architecture diffusion transformer that Flex.2 (and every Flux.1 checkpoint) uses, in plain PyTorch.

Compared with the FLUX.2 DiT (both are built from ``fluxframe.plugins.common.dit``): every linear layer has a
bias, each block computes its own modulation, the MLPs are GELU-tanh, a CLIP pooled vector joins the timestep
embedding, and positions have three RoPE axes (t, row, col). Parameters carry the names of the original
single-file checkpoints (``double_blocks.N.img_attn.qkv`` ...); ``keymap.py`` maps the diffusers layout onto them.
The input width is configurable: 64 for plain Flux.1, 196 for Flex.2 (noise | inpaint | mask | control).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from fluxframe.errors import CheckpointError
from fluxframe.plugins.common.dit import (
    DiTShape,
    QKNorm,
    attention,
    clip_fp16,
    config_from_dict,
    modulate,
    rope_table,
    timestep_embedding,
)

EPS = 1e-6


@dataclass(frozen=True)
class Flux1Config(DiTShape):
    """Shape of a Flux.1-architecture DiT. Field names follow diffusers' ``transformer/config.json``."""

    in_channels: int = 196
    out_channels: int | None = 64
    num_layers: int = 8
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    patch_size: int = 1
    mlp_ratio: float = 4.0
    rope_theta: int = 10000

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config.json") -> Flux1Config:
        config = config_from_dict(cls, d, source=source, what="Flux.1/Flex.2")
        if sum(config.axes_dims_rope) != config.attention_head_dim or len(config.axes_dims_rope) != 3:
            raise CheckpointError(f"RoPE axes {config.axes_dims_rope} must be three that add up to the head dim "
                                  f"{config.attention_head_dim}", file=source, key="axes_dims_rope")
        return config

    def to_dict(self) -> dict:
        d = {"_class_name": "FluxTransformer2DModel"}
        for f in fields(self):
            if f.name in ("mlp_ratio", "rope_theta"):  # fixed in diffusers' class
                continue
            value = getattr(self, f.name)
            d[f.name] = list(value) if isinstance(value, tuple) else value
        return d


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // heads, EPS)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


class Modulation(nn.Module):
    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.sets = sets
        self.lin = nn.Linear(dim, 3 * sets * dim)

    def forward(self, vec):
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(3 * self.sets, dim=-1)
        return [tuple(chunks[3 * i: 3 * i + 3]) for i in range(self.sets)]


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.img_mod, self.txt_mod = Modulation(dim, 2), Modulation(dim, 2)
        self.img_attn, self.txt_attn = SelfAttention(dim, heads), SelfAttention(dim, heads)
        self.img_mlp, self.txt_mlp = _mlp(dim, hidden), _mlp(dim, hidden)

    def forward(self, img, txt, vec, rope):
        (i_shift1, i_scale1, i_gate1), (i_shift2, i_scale2, i_gate2) = self.img_mod(vec)
        (t_shift1, t_scale1, t_gate1), (t_shift2, t_scale2, t_gate2) = self.txt_mod(vec)
        iq, ik, iv = self.img_attn.qkv_heads(modulate(img, i_shift1, i_scale1, EPS))
        tq, tk, tv = self.txt_attn.qkv_heads(modulate(txt, t_shift1, t_scale1, EPS))
        attn = attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), rope)
        txt_attn, img_attn = attn.split([txt.shape[1], img.shape[1]], dim=1)
        img = torch.addcmul(img, i_gate1, self.img_attn.proj(img_attn))
        img = torch.addcmul(img, i_gate2, self.img_mlp(modulate(img, i_shift2, i_scale2, EPS)))
        txt = torch.addcmul(txt, t_gate1, self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, t_gate2, self.txt_mlp(modulate(txt, t_shift2, t_scale2, EPS)))
        return clip_fp16(img), clip_fp16(txt)


class SingleBlock(nn.Module):
    """Attention and MLP in parallel from one fused projection (q, k, v, mlp-in), one fused output."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.mlp_hidden = int(dim * mlp_ratio)
        self.modulation = Modulation(dim, 1)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(dim // heads, EPS)

    def forward(self, x, vec, rope):
        ((shift, scale, gate),) = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(x, shift, scale, EPS)).split([3 * self.dim, self.mlp_hidden], dim=-1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attn = attention(self.norm.query_norm(q), self.norm.key_norm(k), v, rope)
        out = self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1))
        return clip_fp16(torch.addcmul(x, gate, out))


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, dim)
        self.out_layer = nn.Linear(dim, dim)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_channels)

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale, EPS))


class Flux1Transformer(nn.Module):
    """Predicts the flow-matching velocity of image tokens from text tokens, a pooled text vector and a timestep."""

    def __init__(self, config: Flux1Config):
        super().__init__()
        self.config = config
        dim, heads = config.hidden_size, config.num_attention_heads
        self.img_in = nn.Linear(config.in_channels, dim)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(config.pooled_projection_dim, dim)
        self.guidance_in = MLPEmbedder(256, dim) if config.guidance_embeds else None
        self.double_blocks = nn.ModuleList(DoubleBlock(dim, heads, config.mlp_ratio) for _ in range(config.num_layers))
        self.single_blocks = nn.ModuleList(
            SingleBlock(dim, heads, config.mlp_ratio) for _ in range(config.num_single_layers))
        self.final_layer = LastLayer(dim, config.output_channels)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype  # img_in's weight, also when a LoRA side path wraps img_in

    def forward(self, img, img_ids, txt, txt_ids, pooled, timesteps, guidance=None, cache=None, stream="positive"):
        """img (B, N, in_channels), txt (B, L, joint_attention_dim), pooled (B, pooled_projection_dim),
        ids (N, 3) / (L, 3), timesteps and guidance (B,) as sigmas in [0, 1] and guidance scales.
        ``cache`` (a StepCacheRun): the first double block runs (or, for a cache probing the modulated input, its
        timestep-modulated image input is computed), then the cache decides, per image, whether the other blocks
        (all of them) run or their residual from the last full step of ``stream`` is reused."""
        dtype = self.dtype
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this transformer is guidance-distilled: pass a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        vec = vec + self.vector_in(pooled.to(dtype))
        img, txt = self.img_in(img.to(dtype)), self.txt_in(txt.to(dtype))
        rope = rope_table(torch.cat([txt_ids, img_ids], dim=0), self.config.axes_dims_rope, self.config.rope_theta)
        if cache is None:
            return self.final_layer(self._blocks(img, txt, vec, rope), vec)
        if not self.double_blocks:  # nothing to probe with: every step runs in full
            return self.final_layer(cache.run(stream, None, img, lambda rows: self._blocks(img, txt, vec, rope)), vec)
        if getattr(cache, "probe", "first-block") == "modulated-input":  # TeaCache: no block runs to decide
            img_mod = self.double_blocks[0].img_mod  # Flex.2's modulation lives in the block (FLUX.2's does not)
            if any(p.device != vec.device for p in img_mod.parameters()):
                raise RuntimeError("teacache reads the first double block's modulation before any block runs, but "
                                   "an offloading strategy keeps that block off the device: keep it resident "
                                   "(group-offload resident_blocks = 1) or use method = \"first-block\"")
            ((shift, scale, _), _) = img_mod(vec)
            first, start, probe = 0, img, modulate(img, shift, scale, EPS)
        else:
            first, (start, txt) = 1, self.double_blocks[0](img, txt, vec, rope)
            probe = start - img

        def rest(rows):
            def take(t):
                return t if rows is None or t.shape[0] == 1 else t[rows]

            return self._blocks(take(start), take(txt), take(vec), rope, first=first)

        return self.final_layer(cache.run(stream, probe, start, rest), vec)

    def _blocks(self, img, txt, vec, rope, first: int = 0):
        """The double blocks from ``first`` on, then the single blocks: the image tokens' hidden states."""
        for block in self.double_blocks[first:]:
            img, txt = block(img, txt, vec, rope)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, vec, rope)
        return x[:, txt.shape[1]:]
