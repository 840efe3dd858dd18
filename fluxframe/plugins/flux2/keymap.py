"""Key names of the FLUX.2 DiT in the diffusers layout, mapped onto fluxframe's own (the original layout).

The table is written once; ``from_diffusers`` reads a diffusers checkpoint through it and
``to_diffusers`` writes one, so the two directions cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .transformer import TransformerConfig

# How one fluxframe tensor relates to its diffusers tensors.
SAME, CAT, SWAP = "same", "cat", "swap"  # one-to-one | q, k, v concatenated on dim 0 | (scale, shift) halves swapped


def rules(config: TransformerConfig) -> Iterator[tuple[str, tuple[str, ...], str]]:
    yield "img_in.weight", ("x_embedder.weight",), SAME
    yield "txt_in.weight", ("context_embedder.weight",), SAME
    for ours, theirs in (("time_in", "timestep_embedder"), ("guidance_in", "guidance_embedder")):
        if ours == "guidance_in" and not config.guidance_embeds:
            continue
        yield f"{ours}.in_layer.weight", (f"time_guidance_embed.{theirs}.linear_1.weight",), SAME
        yield f"{ours}.out_layer.weight", (f"time_guidance_embed.{theirs}.linear_2.weight",), SAME
    for name in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
        yield f"{name}.lin.weight", (f"{name}.linear.weight",), SAME

    for n in range(config.num_layers):
        ours, theirs = f"double_blocks.{n}", f"transformer_blocks.{n}"
        for stream, q, k, v, out, qn, kn, ff in (
            ("img", "to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k", "ff"),
            ("txt", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_added_q", "norm_added_k", "ff_context"),
        ):
            yield f"{ours}.{stream}_attn.qkv.weight", tuple(f"{theirs}.attn.{p}.weight" for p in (q, k, v)), CAT
            yield f"{ours}.{stream}_attn.proj.weight", (f"{theirs}.attn.{out}.weight",), SAME
            yield f"{ours}.{stream}_attn.norm.query_norm.scale", (f"{theirs}.attn.{qn}.weight",), SAME
            yield f"{ours}.{stream}_attn.norm.key_norm.scale", (f"{theirs}.attn.{kn}.weight",), SAME
            yield f"{ours}.{stream}_mlp.0.weight", (f"{theirs}.{ff}.linear_in.weight",), SAME
            yield f"{ours}.{stream}_mlp.2.weight", (f"{theirs}.{ff}.linear_out.weight",), SAME

    for n in range(config.num_single_layers):
        ours, theirs = f"single_blocks.{n}", f"single_transformer_blocks.{n}.attn"
        yield f"{ours}.linear1.weight", (f"{theirs}.to_qkv_mlp_proj.weight",), SAME
        yield f"{ours}.linear2.weight", (f"{theirs}.to_out.weight",), SAME
        yield f"{ours}.norm.query_norm.scale", (f"{theirs}.norm_q.weight",), SAME
        yield f"{ours}.norm.key_norm.scale", (f"{theirs}.norm_k.weight",), SAME

    yield "final_layer.adaLN_modulation.1.weight", ("norm_out.linear.weight",), SWAP
    yield "final_layer.linear.weight", ("proj_out.weight",), SAME


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


def _swap_one(tensors: list[torch.Tensor]) -> torch.Tensor:
    return _swap_halves(tensors[0])


_COMBINE: dict[str, Callable[[list[torch.Tensor]], torch.Tensor]] = {CAT: _cat, SWAP: _swap_one}


def from_diffusers(config: TransformerConfig) -> dict[str, str | tuple[tuple[str, ...], Callable]]:
    """fluxframe key -> diffusers key, or (diffusers keys, combine) where tensors must be merged."""
    return {
        ours: theirs[0] if kind == SAME else (theirs, _COMBINE[kind]) for ours, theirs, kind in rules(config)
    }


def to_diffusers(state_dict: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
    """A fluxframe state dict rewritten with diffusers' key names and tensor layout."""
    out = {}
    for ours, theirs, kind in rules(config):
        tensor = state_dict[ours]
        if kind == CAT:
            out.update(zip(theirs, tensor.chunk(len(theirs), dim=0)))
        elif kind == SWAP:
            out[theirs[0]] = _swap_halves(tensor)
        else:
            out[theirs[0]] = tensor
    return out
