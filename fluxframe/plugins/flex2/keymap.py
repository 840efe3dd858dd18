"""Key names of the Flux.1-architecture DiT in the diffusers layout, mapped onto fluxframe's (the original
single-file layout, ``double_blocks.N...``), and the reading of a single file's shape from its header.

One table serves both directions (``from_diffusers`` to load, ``to_diffusers`` to write).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fluxframe.errors import CheckpointError
from fluxframe.plugins.common.dit import check_sizes

from .transformer import Flux1Config

SAME, CAT, SWAP = "same", "cat", "swap"
SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")


def _linear(ours: str, theirs: str | tuple[str, ...], kind: str = SAME) -> Iterator[tuple[str, tuple[str, ...], str]]:
    theirs = (theirs,) if isinstance(theirs, str) else theirs
    for p in ("weight", "bias"):
        yield f"{ours}.{p}", tuple(f"{t}.{p}" for t in theirs), kind


def rules(config: Flux1Config) -> Iterator[tuple[str, tuple[str, ...], str]]:
    yield from _linear("img_in", "x_embedder")
    yield from _linear("txt_in", "context_embedder")
    embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    if config.guidance_embeds:
        embedders.append(("guidance_in", "guidance_embedder"))
    for ours, theirs in embedders:
        yield from _linear(f"{ours}.in_layer", f"time_text_embed.{theirs}.linear_1")
        yield from _linear(f"{ours}.out_layer", f"time_text_embed.{theirs}.linear_2")
    for n in range(config.num_layers):
        ours, theirs = f"double_blocks.{n}", f"transformer_blocks.{n}"
        for stream, norm1, q, k, v, out, qn, kn, ff in (
            ("img", "norm1", "to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k", "ff"),
            ("txt", "norm1_context", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_added_q",
             "norm_added_k", "ff_context"),
        ):
            yield from _linear(f"{ours}.{stream}_mod.lin", f"{theirs}.{norm1}.linear")
            yield from _linear(f"{ours}.{stream}_attn.qkv", tuple(f"{theirs}.attn.{p}" for p in (q, k, v)), CAT)
            yield from _linear(f"{ours}.{stream}_attn.proj", f"{theirs}.attn.{out}")
            yield f"{ours}.{stream}_attn.norm.query_norm.scale", (f"{theirs}.attn.{qn}.weight",), SAME
            yield f"{ours}.{stream}_attn.norm.key_norm.scale", (f"{theirs}.attn.{kn}.weight",), SAME
            yield from _linear(f"{ours}.{stream}_mlp.0", f"{theirs}.{ff}.net.0.proj")
            yield from _linear(f"{ours}.{stream}_mlp.2", f"{theirs}.{ff}.net.2")
    for n in range(config.num_single_layers):
        ours, theirs = f"single_blocks.{n}", f"single_transformer_blocks.{n}"
        yield from _linear(f"{ours}.modulation.lin", f"{theirs}.norm.linear")
        yield from _linear(f"{ours}.linear1", tuple(f"{theirs}.{p}" for p in
                                                    ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")), CAT)
        yield from _linear(f"{ours}.linear2", f"{theirs}.proj_out")
        yield f"{ours}.norm.query_norm.scale", (f"{theirs}.attn.norm_q.weight",), SAME
        yield f"{ours}.norm.key_norm.scale", (f"{theirs}.attn.norm_k.weight",), SAME
    yield from _linear("final_layer.adaLN_modulation.1", "norm_out.linear", SWAP)
    yield from _linear("final_layer.linear", "proj_out")


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _cat(tensors):
    return torch.cat(tensors, dim=0)


def _swap_one(tensors):
    return _swap_halves(tensors[0])


_COMBINE = {CAT: _cat, SWAP: _swap_one}


def from_diffusers(config: Flux1Config) -> dict:
    """fluxframe key -> diffusers key, or (diffusers keys, combine) where tensors are merged."""
    return {ours: theirs[0] if kind == SAME else (theirs, _COMBINE[kind]) for ours, theirs, kind in rules(config)}


def to_diffusers(state_dict: dict[str, torch.Tensor], config: Flux1Config) -> dict[str, torch.Tensor]:
    """A fluxframe (single-file layout) state dict rewritten with diffusers' names and layout."""
    out = {}
    for ours, theirs, kind in rules(config):
        tensor = state_dict[ours]
        if kind == CAT:
            sizes = [config.hidden_size] * 3
            if len(theirs) == 4:
                sizes.append(tensor.shape[0] - 3 * config.hidden_size)
            out.update(zip(theirs, tensor.split(sizes, dim=0)))
        elif kind == SWAP:
            out[theirs[0]] = _swap_halves(tensor)
        else:
            out[theirs[0]] = tensor
    return out


def single_file_prefix(keys) -> str | None:
    """The prefix the original layout's keys carry in this file (ComfyUI files add one), or None."""
    keys = set(keys)
    for prefix in SINGLE_FILE_PREFIXES:
        if f"{prefix}img_in.weight" in keys and f"{prefix}double_blocks.0.img_attn.qkv.weight" in keys:
            return prefix
    return None


def default_axes(head_dim: int) -> tuple[int, int, int]:
    """Flux.1's split of the head dim over (t, row, col): 16/56/56 of 128, i.e. 1/8, 7/16, 7/16 (rounded even)."""
    t = max(2, head_dim // 8 // 2 * 2)
    row = (head_dim - t) // 2 // 2 * 2
    return t, row, head_dim - t - row


def config_from_shapes(ckpt, prefix: str, *, source: str) -> Flux1Config:
    """Read a single file's transformer shape from its header: widths from the tensor shapes, depths from
    the block count, the head dim from the q-norm scale. RoPE axes come from the file's metadata
    (``axes_dims_rope``, comma-separated) when present, else Flux.1's 1/8 : 7/16 : 7/16 split. The header
    can claim anything, so the result is held to the same sane bounds as a config.json before it is used."""
    def shape(key, ndim):
        got = ckpt.shape(prefix + key)
        if len(got) != ndim or not all(d >= 1 for d in got):
            raise CheckpointError(f"shape {got} is not a {ndim}-D weight of a Flux.1 transformer", file=source,
                                  key=prefix + key)
        return got

    keys = ckpt.keys()

    def count(block):
        return len({k[len(prefix):].split(".")[1] for k in keys if k.startswith(f"{prefix}{block}.")})

    hidden, in_channels = shape("img_in.weight", 2)
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale", 1)[0]
    if hidden % head_dim:
        raise CheckpointError(f"hidden size {hidden} is not a multiple of the head dim {head_dim}", file=source,
                              key=prefix + "img_in.weight")
    meta = ckpt.metadata().get("axes_dims_rope")
    try:
        axes = tuple(int(a) for a in meta.split(",")) if meta else default_axes(head_dim)
    except ValueError:
        raise CheckpointError(f"metadata axes_dims_rope {meta[:60]!r} is not comma-separated integers",
                              file=source, key="__metadata__") from None
    config = Flux1Config(
        in_channels=in_channels,
        out_channels=shape("final_layer.linear.weight", 2)[0],
        num_layers=count("double_blocks"),
        num_single_layers=count("single_blocks"),
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=shape("txt_in.weight", 2)[1],
        pooled_projection_dim=shape("vector_in.in_layer.weight", 2)[1],
        guidance_embeds=prefix + "guidance_in.in_layer.weight" in ckpt,
        axes_dims_rope=axes,
        mlp_ratio=shape("double_blocks.0.img_mlp.0.weight", 2)[0] / hidden,
    )
    names = {"in_channels": "img_in.weight", "out_channels": "final_layer.linear.weight",
             "num_layers": "double_blocks", "num_single_layers": "single_blocks",
             "attention_head_dim": "double_blocks.0.img_attn.norm.query_norm.scale",
             "num_attention_heads": "img_in.weight", "joint_attention_dim": "txt_in.weight",
             "pooled_projection_dim": "vector_in.in_layer.weight", "mlp_ratio": "double_blocks.0.img_mlp.0.weight"}
    names = {k: prefix + v for k, v in names.items()}
    names["axes_dims_rope"] = "__metadata__" if meta else names["attention_head_dim"]
    return check_sizes(config, source, names)
