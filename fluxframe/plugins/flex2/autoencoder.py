"""The Flux.1 autoencoder (diffusers' ``AutoencoderKL`` as Flux.1 and Flex.2 ship it): 16 latent channels at 1/8
resolution, normalised as (z − shift)·scale. Its encoder and decoder are the stacks the FLUX.2 autoencoder
is built from too (``fluxframe.plugins.common.autoencoder``); parameter names match diffusers, so ``vae/``
loads 1:1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fluxframe.errors import CheckpointError
from fluxframe.plugins.common.autoencoder import AutoencoderConfig, Coder
from fluxframe.plugins.common.bounds import short

SCALE, SHIFT = 0.3611, 0.1159  # Flux.1's latent normalisation


@dataclass(frozen=True)
class Flux1AutoencoderConfig:
    blocks: AutoencoderConfig
    scaling_factor: float = SCALE
    shift_factor: float = SHIFT

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config.json") -> Flux1AutoencoderConfig:
        factors = {}
        for key, default in (("scaling_factor", SCALE), ("shift_factor", SHIFT)):
            value = d.get(key, default)
            if value is None:
                value = 0.0 if key == "shift_factor" else 1.0
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise CheckpointError(f"expected a number, got {short(value)}", file=source, key=key)
            factors[key] = float(value)
        rest = {k: v for k, v in d.items() if k not in ("scaling_factor", "shift_factor")}
        rest.setdefault("use_quant_conv", True)
        rest.setdefault("use_post_quant_conv", True)
        return cls(AutoencoderConfig.from_dict(rest, source=source), **factors)


class Flux1Autoencoder(nn.Module):
    """Images in [-1, 1] <-> normalised latents (B, 16, H/8, W/8); state_dict() is diffusers' AutoencoderKL's."""

    def __init__(self, config: Flux1AutoencoderConfig):
        super().__init__()
        self.config = config
        cfg = config.blocks
        lc = cfg.latent_channels
        self.encoder = Coder(cfg.in_channels, 2 * lc, cfg.block_out_channels, cfg, down=True)
        self.decoder = Coder(lc, cfg.out_channels, cfg.decoder_block_out_channels or cfg.block_out_channels, cfg,
                              down=False)
        self.quant_conv = nn.Conv2d(2 * lc, 2 * lc, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lc, lc, 1) if cfg.use_post_quant_conv else None

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.blocks.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config.blocks.latent_channels

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Normalised latents: the posterior mean, or a sample from the posterior drawn with ``generator``."""
        f = self.downsample_factor
        if images.ndim != 4 or images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"expected (B, C, H, W) images with H and W multiples of {f}, got {tuple(images.shape)}")
        moments = self.encoder(images.to(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if generator is not None:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=generator.device)
            z = mean + std * noise.to(mean.device)
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        z = latents.to(self.dtype) / self.config.scaling_factor + self.config.shift_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
