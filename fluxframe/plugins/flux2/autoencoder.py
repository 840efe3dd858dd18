"""The FLUX.2 autoencoder (diffusers' ``AutoencoderKLFlux2``) in plain PyTorch.

It turns images in [-1, 1] into the normalised, 2x2-patchified latents the FLUX.2 transformer works on
(128 channels at 1/16 resolution by default) and back. Parameter and buffer names match diffusers exactly,
so a diffusers ``vae/`` checkpoint loads 1:1 with ``load_state_dict``. The encoder/decoder stacks and
``AutoencoderConfig`` (diffusers' ``config.json``) are shared with Flux.1's autoencoder (``plugins/common``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fluxframe.plugins.common.autoencoder import AutoencoderConfig, Coder


class Flux2Autoencoder(nn.Module):
    """Images in [-1, 1] <-> normalised patchified latents; state_dict() is diffusers' AutoencoderKLFlux2's."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        lc = config.latent_channels
        self.encoder = Coder(config.in_channels, 2 * lc, config.block_out_channels, config, down=True)
        decoder_channels = config.decoder_block_out_channels or config.block_out_channels
        self.decoder = Coder(lc, config.out_channels, decoder_channels, config, down=False)
        self.quant_conv = nn.Conv2d(2 * lc, 2 * lc, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lc, lc, 1) if config.use_post_quant_conv else None
        # Only the running statistics are used (eval-mode normalisation); the module is kept for its buffer names.
        self.bn = nn.BatchNorm2d(math.prod(config.patch_size) * lc, eps=config.batch_norm_eps,
                                 momentum=config.batch_norm_momentum, affine=False)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1) * self.config.patch_size[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def encode_moments(self, images: Tensor) -> Tensor:
        h = self.encoder(images.to(self.dtype))
        return h if self.quant_conv is None else self.quant_conv(h)

    def encode(self, images: Tensor) -> Tensor:
        f = self.downsample_factor
        if images.ndim != 4 or images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"expected (B, C, H, W) images with H and W multiples of {f}, got {tuple(images.shape)}")
        mean = self.encode_moments(images)[:, : self.config.latent_channels]  # posterior mode; no sampling
        z = patchify(mean, self.config.patch_size[0])
        shift, scale = self._bn_stats()
        return ((z.float() - shift) / scale).to(z.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        shift, scale = self._bn_stats()
        z = unpatchify((latents.float() * scale + shift).to(self.dtype), self.config.patch_size[0])
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _bn_stats(self) -> tuple[Tensor, Tensor]:
        # fp32 so that a bf16-cast model does not take sqrt(var + 1e-4) in bf16.
        mean = self.bn.running_mean.float().view(1, -1, 1, 1)
        std = torch.sqrt(self.bn.running_var.float().view(1, -1, 1, 1) + self.config.batch_norm_eps)
        return mean, std


def patchify(z: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, C*p*p, H/p, W/p), channel order (c, pi, pj) as in diffusers' Flux2 pipeline."""
    b, c, h, w = z.shape
    return z.view(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)


def unpatchify(z: Tensor, p: int) -> Tensor:
    b, cpp, h, w = z.shape
    c = cpp // (p * p)
    return z.reshape(b, c, p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * p, w * p)
