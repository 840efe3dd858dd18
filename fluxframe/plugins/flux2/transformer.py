"""The FLUX.2 diffusion transformer (the "DiT"), in plain PyTorch.

Parameters carry the names of the original single-file checkpoints published by the FLUX.2
authors (``double_blocks.N.img_attn.qkv`` ...), so that layout loads as it is; the diffusers
folder layout is mapped onto these names by ``keymap.py``. Fused q/k/v projections and one
RoPE table per forward keep the number of kernel launches low.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fluxframe.errors import CheckpointError
from fluxframe.plugins.common import bounds
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


@dataclass(frozen=True)
class TransformerConfig(DiTShape):
    """Shape of a FLUX.2 DiT. Field names follow diffusers' ``transformer/config.json``."""

    in_channels: int = 128
    out_channels: int | None = None
    num_layers: int = 8
    num_single_layers: int = 48
    attention_head_dim: int = 128
    num_attention_heads: int = 48
    joint_attention_dim: int = 15360
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: int = 2000
    eps: float = 1e-6
    guidance_embeds: bool = True
    patch_size: int = 1

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config.json") -> TransformerConfig:
        config = config_from_dict(cls, d, source=source, what="FLUX.2")
        if sum(config.axes_dims_rope) != config.attention_head_dim:
            raise CheckpointError(
                f"RoPE axes {config.axes_dims_rope} do not add up to the head dim {config.attention_head_dim}",
                file=source,
                key="axes_dims_rope",
            )
        return config

    @classmethod
    def read(cls, folder: Path) -> TransformerConfig:
        """From a diffusers ``transformer/`` folder's config.json (size-capped, checked as ``from_dict`` checks)."""
        return cls.from_dict(bounds.read_json(folder / "config.json"), source=str(folder / "config.json"))

    def to_dict(self) -> dict:
        d = {"_class_name": "Flux2Transformer2DModel"}
        for f in fields(self):
            value = getattr(self, f.name)
            d[f.name] = list(value) if isinstance(value, tuple) else value
        return d


class SelfAttention(nn.Module):
    """The projections of one stream of a double block; attention itself is joint (see DoubleBlock)."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // heads, eps)
        self.proj = nn.Linear(dim, dim, bias=False)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


class SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return F.silu(a).mul_(b)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 2 * hidden, bias=False), SwiGLU(), nn.Linear(hidden, dim, bias=False))


class DoubleBlock(nn.Module):
    """Separate weights for image and text tokens, one joint attention over [text, image]."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.eps = eps
        self.img_attn = SelfAttention(dim, heads, eps)
        self.img_mlp = _mlp(dim, hidden)
        self.txt_attn = SelfAttention(dim, heads, eps)
        self.txt_mlp = _mlp(dim, hidden)

    def forward(self, img, txt, img_mod, txt_mod, rope, attn_mask=None):
        (i_shift1, i_scale1, i_gate1), (i_shift2, i_scale2, i_gate2) = img_mod
        (t_shift1, t_scale1, t_gate1), (t_shift2, t_scale2, t_gate2) = txt_mod
        iq, ik, iv = self.img_attn.qkv_heads(modulate(img, i_shift1, i_scale1, self.eps))
        tq, tk, tv = self.txt_attn.qkv_heads(modulate(txt, t_shift1, t_scale1, self.eps))
        attn = attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), rope,
                         attn_mask=attn_mask)
        txt_attn, img_attn = attn.split([txt.shape[1], img.shape[1]], dim=1)

        img = torch.addcmul(img, i_gate1, self.img_attn.proj(img_attn))
        img = torch.addcmul(img, i_gate2, self.img_mlp(modulate(img, i_shift2, i_scale2, self.eps)))
        txt = torch.addcmul(txt, t_gate1, self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, t_gate2, self.txt_mlp(modulate(txt, t_shift2, t_scale2, self.eps)))
        return clip_fp16(img), clip_fp16(txt)


class SingleBlock(nn.Module):
    """One stream over [text, image]; attention and MLP in parallel from one fused projection."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.heads = heads
        self.eps = eps
        self.mlp_hidden = int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, 3 * dim + 2 * self.mlp_hidden, bias=False)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim, bias=False)
        self.norm = QKNorm(dim // heads, eps)
        self.mlp_act = SwiGLU()

    def forward(self, x, mod, rope, skip: int = 0, attn_mask=None):
        """skip > 0 returns only tokens skip: onwards (the last block, whose text outputs nobody reads):
        the skipped tokens still serve as keys and values, but get no queries, MLP or output projection.

        linear1 and linear2 run as two GEMMs each over row/column slices of their weights, which saves
        the MLP on skipped tokens and the concatenation of [attention, MLP] before linear2."""
        shift, scale, gate = mod
        dim = self.linear2.out_features
        w1, w2 = getattr(self.linear1, "weight", None), getattr(self.linear2, "weight", None)
        h = modulate(x, shift, scale, self.eps)
        if w1 is not None:
            qkv, mlp = F.linear(h, w1[: 3 * dim]), F.linear(h[:, skip:], w1[3 * dim :])
        else:  # a layer with no plain weight to slice (a LoRA side path): the module as a whole
            qkv, mlp = self.linear1(h).split([3 * dim, 2 * self.mlp_hidden], dim=-1)
            mlp = mlp[:, skip:]
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q_rope = tuple(r[skip:] for r in rope) if skip else None
        attn = attention(self.norm.query_norm(q[:, :, skip:]), self.norm.key_norm(k), v, rope, q_rope, attn_mask)
        if w2 is not None:
            out = F.linear(attn, w2[:, :dim])
            out.view(-1, dim).addmm_(self.mlp_act(mlp).flatten(0, -2), w2[:, dim:].t())
        else:
            out = self.linear2(torch.cat([attn, self.mlp_act(mlp)], dim=-1))
        return clip_fp16(torch.addcmul(x[:, skip:], gate, out))


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, dim, bias=False)
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """(shift, scale, gate) sets computed once per forward and shared by every block of a kind."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.sets = sets
        self.lin = nn.Linear(dim, 3 * sets * dim, bias=False)

    def forward(self, vec: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(3 * self.sets, dim=-1)
        return [tuple(chunks[3 * i : 3 * i + 3]) for i in range(self.sets)]


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=False))
        self.linear = nn.Linear(dim, out_channels, bias=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, eps: float) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale, eps))


class Flux2Transformer(nn.Module):
    """Predicts the flow-matching velocity of image tokens given text tokens and a timestep."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        dim, heads = config.hidden_size, config.num_attention_heads
        self.img_in = nn.Linear(config.in_channels, dim, bias=False)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim, bias=False)
        self.time_in = MLPEmbedder(config.timestep_guidance_channels, dim)
        self.guidance_in = MLPEmbedder(config.timestep_guidance_channels, dim) if config.guidance_embeds else None
        self.double_stream_modulation_img = Modulation(dim, 2)
        self.double_stream_modulation_txt = Modulation(dim, 2)
        self.single_stream_modulation = Modulation(dim, 1)
        self.double_blocks = nn.ModuleList(
            DoubleBlock(dim, heads, config.mlp_ratio, config.eps) for _ in range(config.num_layers)
        )
        self.single_blocks = nn.ModuleList(
            SingleBlock(dim, heads, config.mlp_ratio, config.eps) for _ in range(config.num_single_layers)
        )
        self.final_layer = LastLayer(dim, config.output_channels)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype  # img_in's weight, also when a LoRA side path wraps img_in

    @property
    def eager_blocks(self) -> tuple[nn.Module, ...]:
        """Blocks regional compilation leaves eager: the last single block, called once a step with the text-token
        skip (see fluxframe.plugins.common.compile)."""
        return (self.single_blocks[-1],) if len(self.single_blocks) else ()

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        guidance: torch.Tensor | None = None,
        attn_bias: torch.Tensor | None = None,
        cache: Any = None,
        stream: str = "positive",
    ) -> torch.Tensor:
        """img (B, N, in_channels), txt (B, L, joint_attention_dim), ids (N, 4) / (L, 4),
        timesteps and guidance (B,) as sigmas in [0, 1] and guidance scales. Returns (B, N, out).
        ``attn_bias`` (L + N,), if given, is added to every attention's logits per key (text keys first, then
        image keys, as the blocks order them); training uses it to let sampled padding keys stand for all.
        ``cache`` (a StepCacheRun): the first double block runs (or, for a cache probing the modulated input, its
        timestep-modulated image input is computed), then the cache decides, per image, whether the other blocks
        (all of them) run or their residual from the last full step of ``stream`` is reused."""
        dtype = self.dtype
        cfg = self.config
        mask = None if attn_bias is None else attn_bias.to(dtype).view(1, 1, 1, -1)
        vec = self.time_in(timestep_embedding(timesteps, cfg.timestep_guidance_channels).to(dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this FLUX.2 transformer is guidance-distilled: pass a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance, cfg.timestep_guidance_channels).to(dtype))

        img = self.img_in(img.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        rope = rope_table(torch.cat([txt_ids, img_ids], dim=0), cfg.axes_dims_rope, cfg.rope_theta)

        img_mod = self.double_stream_modulation_img(vec)
        txt_mod = self.double_stream_modulation_txt(vec)
        (single_mod,) = self.single_stream_modulation(vec)
        if cache is None:
            hidden = self._blocks(img, txt, img_mod, txt_mod, single_mod, rope, mask)
        elif not self.double_blocks:  # nothing to probe with: every step runs in full
            hidden = cache.run(stream, None, img, lambda rows: self._blocks(img, txt, img_mod, txt_mod, single_mod,
                                                                           rope, mask))
        else:
            if getattr(cache, "probe", "first-block") == "modulated-input":  # TeaCache: no block runs to decide
                first, start, probe = 0, img, modulate(img, *img_mod[0][:2], cfg.eps)
            else:
                first, (start, txt) = 1, self.double_blocks[0](img, txt, img_mod, txt_mod, rope, mask)
                probe = start - img

            def rest(rows):
                def take(t):
                    return t if rows is None or t.shape[0] == 1 else t[rows]

                mods = [[tuple(take(t) for t in group) for group in kind] for kind in (img_mod, txt_mod)]
                return self._blocks(take(start), take(txt), *mods, tuple(take(t) for t in single_mod), rope, mask,
                                    first=first)

            hidden = cache.run(stream, probe, start, rest)
        return self.final_layer(hidden, vec, cfg.eps)

    def _blocks(self, img, txt, img_mod, txt_mod, single_mod, rope, mask, first: int = 0) -> torch.Tensor:
        """The double blocks from ``first`` on, then every single block: the image tokens' hidden states."""
        for block in self.double_blocks[first:]:
            img, txt = block(img, txt, img_mod, txt_mod, rope, mask)
        x = torch.cat([txt, img], dim=1)
        for i, block in enumerate(self.single_blocks):
            last = i == len(self.single_blocks) - 1
            x = block(x, single_mod, rope, skip=txt.shape[1] if last else 0, attn_mask=mask)
        return x if self.single_blocks else x[:, txt.shape[1] :]
