"""``vae-tiling``: the autoencoder's encoder and decoder run on overlapping tiles, blended linearly.

Tiles are laid out on the latent grid the encoder produces and the decoder takes (1/8 of the image size for
both FLUX.2 and Flux.1 autoencoders; FLUX.2 patchifies 2x2 after that). Every tile has the same size
(``tile_size`` latent pixels, the last one in a row or column pulled back to end at the border) and neighbours
overlap by at least ``overlap`` latent pixels. In an overlap the two tiles' outputs are mixed with weights
that ramp linearly from one to the other. An input no larger than one tile runs the plain, untiled code, so
the result is bit-identical to no tiling; a larger one differs a little, because the autoencoders' mid-block
attention and group norms see one tile instead of the whole image.

Only the wrapped ``encoder``/``decoder`` modules change; quantisation convolutions, latent normalisation and
posterior sampling still run once over the whole tensor, exactly as without tiling.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fluxframe.core.interfaces import MemoryStrategy


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of size ``tile`` covering [0, length), neighbours overlapping by at least ``overlap``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp_weights(starts: list[int], tile: int, length: int, scale: int) -> list[Tensor]:
    """Per-tile 1-D blend weights (output units): a linear ramp across each overlap with a neighbour."""
    size = min(tile, length) * scale
    out = []
    for i, start in enumerate(starts):
        w = torch.ones(size, dtype=torch.float32)
        if i > 0:  # overlap with the previous tile: rises
            n = (starts[i - 1] + tile - start) * scale
            w[:n] = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        if i + 1 < len(starts):  # overlap with the next tile: falls
            n = (start + tile - starts[i + 1]) * scale
            w[size - n :] *= 1.0 - (torch.arange(n, dtype=torch.float32) + 0.5) / n
        out.append(w)
    return out


def tiled(fn: Callable[[Tensor], Tensor], x: Tensor, *, tile: int, overlap: int, in_scale: int,
          out_scale: int) -> Tensor:
    """Run ``fn`` over overlapping spatial tiles of ``x`` (B, C, H, W) and blend the outputs.

    ``tile`` and ``overlap`` count latent pixels; one latent pixel is ``in_scale`` pixels of ``x`` and
    ``out_scale`` pixels of the output (decoding: 1 and 8; encoding: 8 and 1)."""
    h, w = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)
    wr, wc = _ramp_weights(rows, tile, h, out_scale), _ramp_weights(cols, tile, w, out_scale)
    th, tw = min(tile, h), min(tile, w)
    out = total = None
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            part = fn(x[..., r * in_scale : (r + th) * in_scale, c * in_scale : (c + tw) * in_scale])
            if out is None:  # blended in float32 (float64 for float64 tiles)
                acc = torch.promote_types(part.dtype, torch.float32)
                out = torch.zeros((*part.shape[:-2], h * out_scale, w * out_scale), dtype=acc, device=part.device)
                total = torch.zeros((h * out_scale, w * out_scale), dtype=acc, device=part.device)
            weight = (wr[i][:, None] * wc[j][None, :]).to(part.device, out.dtype)
            rs, cs = slice(r * out_scale, (r + th) * out_scale), slice(c * out_scale, (c + tw) * out_scale)
            out[..., rs, cs] += part.to(out.dtype) * weight
            total[rs, cs] += weight
    return (out / total).to(part.dtype)


def _scale(coder: nn.Module) -> int:
    """How many pixels one latent pixel spans for this encoder/decoder (``plugins.common.autoencoder.Coder``):
    2 per resampling level."""
    levels = getattr(coder, getattr(coder, "_levels", ""), None)
    if levels is None:
        raise ValueError(f"vae-tiling does not know the autoencoder part {type(coder).__name__}")
    return 2 ** sum(1 for level in levels if getattr(level, level._samplers) is not None)


class VaeTiling(MemoryStrategy):
    """Tiled encode/decode for the ``vae`` component; places nothing, so it composes with any placement."""

    name = "vae-tiling"
    placement = False

    def __init__(self, tile_size: int = 128, overlap: int = 32):
        for key, value in (("tile_size", tile_size), ("overlap", overlap)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key}: expected a non-negative integer, got {value!r}")
        if tile_size < 8:
            raise ValueError(f"tile_size: at least 8 latent pixels, got {tile_size}")
        if 2 * overlap > tile_size:
            raise ValueError(f"overlap: at most half of tile_size ({tile_size // 2}), got {overlap}")
        self.tile_size, self.overlap = tile_size, overlap
        self.stats = {"tiles": 0}

    def handles(self, component):
        return component == "vae"

    def place(self, component, module, device):
        if component != "vae":
            return module
        for part, encoding in (("encoder", True), ("decoder", False)):
            coder = getattr(module, part, None)
            if coder is None:
                raise ValueError(f"vae-tiling: the autoencoder {type(module).__name__} has no {part}")
            self._wrap(coder, encoding)
        return module

    def _wrap(self, coder: nn.Module, encoding: bool) -> None:
        if getattr(coder, "_fluxframe_tiled", False):
            return
        scale = _scale(coder)
        forward = coder.forward
        in_scale, out_scale = (scale, 1) if encoding else (1, scale)

        def counted(x: Tensor) -> Tensor:
            self.stats["tiles"] += 1
            return forward(x)

        def tiled_forward(_self, x: Tensor) -> Tensor:
            return tiled(counted, x, tile=self.tile_size, overlap=self.overlap, in_scale=in_scale,
                         out_scale=out_scale)

        coder.forward = types.MethodType(tiled_forward, coder)
        coder._fluxframe_tiled = True
