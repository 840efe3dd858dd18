"""The Flex.2 model family (and plain Flux.1): the Flux.1 MM-DiT, the 16-channel Flux.1 autoencoder, T5 + CLIP-L.

Two checkpoint layouts load, told apart by the tensors themselves:

* the diffusers folder: model_index.json, transformer/, vae/, text_encoder/ + tokenizer/ (CLIP-L),
  text_encoder_2/ + tokenizer_2/ (T5), scheduler/;
* the original single file (``double_blocks.N...``, as published for Flex.2 and used by ComfyUI, optionally
  prefixed ``model.diffusion_model.``): ``path`` names the .safetensors file, whose shape (input width 196 or
  64, depth, widths) is read from its header; the autoencoder and text encoders come from the diffusers-layout
  component folders beside it (vae/, text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/).

The transformer's input width decides what the model takes: 196 channels per token for Flex.2
([noise 0–63 | inpaint latent 64–127 | mask 128–131 | control 132–195], see ``model_input``), 64 for Flux.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fluxframe.core.checkpoint import SafetensorsCheckpoint, build_and_load, check_weight_files, resolve_weight_files
from fluxframe.core.checkpoint import fingerprint as checkpoint_fingerprint
from fluxframe.core.interfaces import ChannelConditioned, MemoryStrategy, ModelFamily, ModelLimits
from fluxframe.core.types import Conditioning, Latents, TextConditioning
from fluxframe.errors import CheckpointError, ConfigError, RequestError
from fluxframe.plugins.common.bounds import read_json, text_encoder_config
from fluxframe.plugins.common.loading import DTYPES, resolve_device
from fluxframe.plugins.lora import LoraSupport

from . import keymap
from .autoencoder import Flux1Autoencoder, Flux1AutoencoderConfig
from .transformer import Flux1Config, Flux1Transformer

TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
#: Channel groups a Flex.2 transformer reads after the 64 noise channels, in order, with their widths.
FLEX2_GROUPS = (("inpaint", 64), ("mask", 4), ("control", 64))
FLEX2_CHANNELS = 64 + sum(width for _, width in FLEX2_GROUPS)
# Flux.1's schedule shift: linear in the image sequence length between these points.
BASE_SEQ, MAX_SEQ, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


@dataclass
class Flux1Text(TextConditioning):
    """T5 embeddings with their ids, plus CLIP's pooled vector."""

    pooled: torch.Tensor | None = None


def flux1_mu(image_seq_len: int, base_seq=BASE_SEQ, max_seq=MAX_SEQ, base_shift=BASE_SHIFT, max_shift=MAX_SHIFT):
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return image_seq_len * m + base_shift - m * base_seq


def flux1_sigmas(steps: int, image_seq_len: int, **shift) -> torch.Tensor:
    """linspace(1, 1/N, N) shifted by exp(mu) / (exp(mu) + 1/s − 1), then a final 0, in fp32."""
    base = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    e = math.exp(flux1_mu(image_seq_len, **shift))
    return torch.cat([torch.from_numpy((e / (e + (1.0 / base - 1.0))).astype(np.float32)), torch.zeros(1)])


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, 2h, 2w) -> (B, h·w, 4C), channel-major: c·4 + pi·2 + pj."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h·w, 4C) -> (B, C, 2h, 2w)."""
    b, _, cpp = tokens.shape
    h, w = grid
    return tokens.view(b, h, w, cpp // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, cpp // 4, 2 * h, 2 * w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """(0, row, col) for each token of an h×w grid, row-major."""
    return torch.cartesian_prod(torch.tensor([0]), torch.arange(h), torch.arange(w))


def text_ids(length: int) -> torch.Tensor:
    return torch.zeros(length, 3, dtype=torch.long)


def _layout(ckpt: SafetensorsCheckpoint) -> str | None:
    """The single-file key prefix, or None for the diffusers layout (or a CheckpointError for neither)."""
    prefix = keymap.single_file_prefix(ckpt.keys())
    if prefix is not None:
        return prefix
    if "x_embedder.weight" in ckpt and "proj_out.weight" in ckpt:
        return None
    raise CheckpointError("neither a diffusers FluxTransformer2DModel nor an original Flux.1 single file "
                          "(no x_embedder.weight, no img_in.weight)", file=str(ckpt.path))


def transformer_config(source: Path, ckpt: SafetensorsCheckpoint) -> tuple[Flux1Config, str | None]:
    """(config, single-file key prefix or None) of an opened transformer checkpoint, from its config.json or
    its header, whichever layout the keys say it is; within sane bounds and of a width the family runs."""
    prefix = _layout(ckpt)
    if prefix is None:
        folder = source if source.is_dir() else source.parent
        config = Flux1Config.from_dict(read_json(folder / "config.json"), source=str(folder / "config.json"))
    else:
        config = keymap.config_from_shapes(ckpt, prefix, source=str(source))
    if config.in_channels not in (64, FLEX2_CHANNELS):
        raise CheckpointError(f"the transformer takes {config.in_channels} input channels; the flex2 family "
                              f"runs 196 (Flex.2) or 64 (Flux.1)", file=str(source), key="in_channels")
    return config, prefix


def load_transformer(source: Path, dtype, device, memory: MemoryStrategy | None = None) -> Flux1Transformer:
    """From a diffusers transformer/ folder or a single file, whichever the keys say it is; ``memory``'s
    while_loading hook (quantize) runs as it loads."""
    with SafetensorsCheckpoint.open(source) as ckpt:
        config, prefix = transformer_config(source, ckpt)
        key_map = keymap.from_diffusers(config)
        if prefix is not None:
            key_map = {k: prefix + k for k in key_map}
        return build_and_load(lambda: Flux1Transformer(config), ckpt, what="transformer", memory=memory,
                              key_map=key_map, dtype=dtype, device=device)


def autoencoder_config(folder: Path) -> Flux1AutoencoderConfig:
    return Flux1AutoencoderConfig.from_dict(read_json(folder / "config.json"), source=str(folder / "config.json"))


def check_pair(transformer: Flux1Config, vae: Flux1AutoencoderConfig, folder: Path) -> None:
    if vae.blocks.latent_channels * 4 != transformer.output_channels:
        raise CheckpointError(f"the autoencoder has {vae.blocks.latent_channels} latent channels, the transformer "
                              f"predicts {transformer.output_channels} (= 4 × 16 for Flux.1)",
                              file=str(folder / "vae" / "config.json"), key="latent_channels")


def model_limits(vae: Flux1AutoencoderConfig) -> ModelLimits:
    """Tokens are 2×2 patches of latent pixels, each 2^(levels - 1) pixels wide."""
    downsample = 2 ** (len(vae.blocks.block_out_channels) - 1)
    return ModelLimits(latent_channels=4 * vae.blocks.latent_channels, pixel_multiple=2 * downsample)


def load_autoencoder(folder: Path, dtype, device) -> Flux1Autoencoder:
    config = autoencoder_config(folder)
    with SafetensorsCheckpoint.open(folder) as ckpt:
        return build_and_load(lambda: Flux1Autoencoder(config), ckpt, what="vae", dtype=dtype, device=device)


def locate(path: Path) -> tuple[Path, Path]:
    """(transformer source, folder of the other components) for a checkpoint path; checks files exist."""
    if not path.exists():
        raise CheckpointError("checkpoint path does not exist", file=str(path))
    if path.is_file():
        transformer, folder = path, path.parent
        resolve_weight_files(path)  # refuses pickles
    else:
        transformer, folder = path / "transformer", path
        index = folder / "model_index.json"
        if not index.is_file():
            raise CheckpointError("model_index.json is missing: not a diffusers-layout folder (for the original "
                                  "single-file layout, give the .safetensors file as the path)", file=str(index))
        read_json(index)
        if not transformer.is_dir():
            raise CheckpointError("component folder transformer/ is missing", file=str(transformer))
        resolve_weight_files(transformer)
    for component in ("vae", *TEXT_COMPONENTS):
        if not (folder / component).is_dir():
            raise CheckpointError(f"component folder {component}/ is missing"
                                  + (" (a single-file checkpoint needs it beside the file)" if path.is_file() else ""),
                                  file=str(folder / component))
    resolve_weight_files(folder / "vae")
    return transformer, folder


def fingerprint(transformer: Path, folder: Path) -> str:
    """The checkpoint id (see fluxframe.core.checkpoint.fingerprint)."""
    return checkpoint_fingerprint(transformer, *(folder / c for c in ("vae", "text_encoder", "text_encoder_2")))


class Flex2(LoraSupport, ModelFamily, ChannelConditioned):
    """Flex.2 (196 input channels: inpainting and universal control built in) or plain Flux.1 (64)."""

    name = "flex2"
    default_steps = 28
    default_guidance = 3.5
    batched = True
    takes_step_cache = True

    def __init__(self, transformer: Flux1Transformer, vae: Flux1Autoencoder, *, folder: Path, source: Path,
                 device: torch.device, dtype: torch.dtype, memory: MemoryStrategy):
        self.transformer, self.vae = transformer, vae
        self.folder, self.source = folder, source
        self.device, self.dtype, self.memory = device, dtype, memory
        self._text_encoder = None
        self._checkpoint_id: str | None = None
        self.shift = self._schedule_config(folder / "scheduler" / "scheduler_config.json")
        self.limits = model_limits(vae.config)

    @staticmethod
    def _schedule_config(file: Path) -> dict:
        defaults = dict(base_seq=BASE_SEQ, max_seq=MAX_SEQ, base_shift=BASE_SHIFT, max_shift=MAX_SHIFT)
        if not file.is_file():
            return defaults
        data = read_json(file)
        names = dict(base_seq="base_image_seq_len", max_seq="max_image_seq_len", base_shift="base_shift",
                     max_shift="max_shift")
        return {k: data.get(names[k], v) if data.get(names[k]) is not None else v for k, v in defaults.items()}

    @property
    def takes_conditioning(self) -> bool:
        """True for Flex.2 checkpoints (inpaint, mask and control channels), False for plain Flux.1."""
        return self.transformer.config.in_channels == FLEX2_CHANNELS

    @staticmethod
    def _locate(config) -> tuple[Path, Path]:
        if config.model.preset is not None:
            raise ConfigError("the flex2 family has no presets; give `path`", path=config.source, key="model.preset")
        return locate(config.model_path)

    @classmethod
    def check(cls, config) -> list[str]:
        """Without reading weights: the files exist, every config.json (or the single file's header) is within
        sane bounds, the autoencoder fits the transformer, and every weight file is as long as its header says
        (opening the transformer's checkpoint reads its headers)."""
        source, folder = cls._locate(config)
        with SafetensorsCheckpoint.open(source) as ckpt:
            t_config, _ = transformer_config(source, ckpt)
        check_pair(t_config, autoencoder_config(folder / "vae"), folder)
        check_weight_files(folder / "vae")
        for component in ("text_encoder", "text_encoder_2"):
            text_encoder_config(folder / component)
            check_weight_files(folder / component)
        return []

    @classmethod
    def limits_for(cls, config) -> ModelLimits:
        """The ``limits`` the loaded model will have: they follow from the autoencoder's config.json alone."""
        _, folder = cls._locate(config)
        return model_limits(autoencoder_config(folder / "vae"))

    @classmethod
    def load(cls, config, memory):
        source, folder = cls._locate(config)
        device, dtype = resolve_device(config.model.device), DTYPES[config.model.dtype]
        transformer = load_transformer(source, dtype, memory.load_device("transformer", device), memory)
        transformer = memory.place("transformer", transformer, device)
        vae = memory.place("vae", load_autoencoder(folder / "vae", dtype, memory.load_device("vae", device)), device)
        check_pair(transformer.config, vae.config, folder)
        model = cls(transformer, vae, folder=folder, source=source, device=device, dtype=dtype, memory=memory)
        if config.model.compile:
            from fluxframe.plugins.common.compile import compile_blocks

            model.compiled = compile_blocks(model.transformer, device)
        return model

    def lora_rules(self):
        return keymap.rules(self.transformer.config)

    @property
    def checkpoint_id(self) -> str:
        if self._checkpoint_id is None:
            self._checkpoint_id = fingerprint(self.source, self.folder)
        return self._checkpoint_id

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from .text_encoder import Flux1PromptEncoder

            encoder = Flux1PromptEncoder.from_folder(self.folder, dtype=self.dtype,
                                                     device=self.memory.load_device("text_encoder", self.device))
            cfg = self.transformer.config
            for what, got, want, key in (("T5", encoder.embed_dim, cfg.joint_attention_dim, "joint_attention_dim"),
                                         ("CLIP", encoder.pooled_dim, cfg.pooled_projection_dim,
                                          "pooled_projection_dim")):
                if got != want:
                    raise CheckpointError(f"the {what} text encoder gives {got}-wide embeddings, the transformer "
                                          f"expects {want}", file=str(self.source), key=key)
            self._text_encoder = self.memory.place("text_encoder", encoder, self.device)
        return self._text_encoder

    def encode_prompts(self, prompts: list[str]) -> Flux1Text:
        encoder = self.text_encoder
        with self.memory.using("text_encoder", encoder, self.device):
            embeds, pooled = encoder.encode(prompts)
        return Flux1Text(embeds=embeds.to(self.device, self.dtype), ids=text_ids(embeds.shape[1]),
                         pooled=pooled.to(self.device, self.dtype))

    @property
    def channel_groups(self) -> dict[str, int]:
        return dict(FLEX2_GROUPS) if self.takes_conditioning else {}

    def token_grid(self, width: int, height: int) -> tuple[int, int]:
        return height // self.limits.pixel_multiple, width // self.limits.pixel_multiple

    def initial_noise(self, seed: int, width: int, height: int) -> Latents:
        # As diffusers' FluxPipeline draws it: its own CPU generator, (1, 16, 2h, 2w), then packed 2×2.
        # Nothing else draws from this generator, so the noise never depends on the conditioning given.
        grid = self.token_grid(width, height)
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn((1, self.vae.latent_channels, 2 * grid[0], 2 * grid[1]), generator=generator,
                            dtype=self.dtype)
        return Latents(tokens=pack(noise).to(self.device), ids=image_ids(*grid), grid=grid)

    def sigmas(self, steps: int, image_tokens: int) -> torch.Tensor:
        return flux1_sigmas(steps, image_tokens, **self.shift)

    def model_input(self, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The transformer's input tokens: the noisy latents, then for Flex.2 the inpaint latent (zeros if
        none), the mask (ones if none) and the control latent (zeros if none)."""
        groups = conditioning.channels
        unknown = sorted(set(groups) - {name for name, _ in FLEX2_GROUPS})
        if unknown:
            raise RequestError(f"the flex2 family has no channel group {unknown[0]!r} (it takes "
                               f"{', '.join(n for n, _ in FLEX2_GROUPS)})", field=f"conditioning.{unknown[0]}")
        if not self.takes_conditioning:
            if groups:
                raise RequestError(f"this checkpoint is a plain Flux.1 model ({self.transformer.config.in_channels} "
                                   f"input channels): it cannot use {', '.join(sorted(groups))} conditioning",
                                   field=f"conditioning.{sorted(groups)[0]}")
            return latents
        b, n, _ = latents.shape
        parts = [latents]
        for name, width in FLEX2_GROUPS:
            part = groups.get(name)
            if part is None:
                part = latents.new_full((b, n, width), 1.0 if name == "mask" else 0.0)
            elif tuple(part.shape[1:]) != (n, width):
                raise RequestError(f"{name} channels are {tuple(part.shape)}, expected (B, {n}, {width})",
                                   field=f"conditioning.{name}")
            parts.append(part.to(latents.device, latents.dtype).expand(b, n, width))
        return torch.cat(parts, dim=-1)

    def predict(self, latents, latent_ids, sigma, text, conditioning: Conditioning, guidance, cache=None):
        tokens = self.model_input(latents.to(self.dtype), conditioning)
        batch = tokens.shape[0]
        t = torch.full((batch,), float(sigma), device=self.device, dtype=torch.float32)
        g = torch.full((batch,), float(guidance), device=self.device, dtype=torch.float32)
        pooled = getattr(text, "pooled", None)
        if pooled is None:
            raise RequestError("the flex2 family needs CLIP pooled embeddings with the prompt embeddings",
                               field="prompt")
        with self.memory.using("transformer", self.transformer, self.device):
            return self.transformer(tokens, latent_ids.to(self.device), text.embeds, text.ids.to(self.device),
                                    pooled.expand(batch, -1), t,
                                    g if self.transformer.guidance_in is not None else None,
                                    **({} if cache is None else {"cache": cache}))

    def encode_latents(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalised latents (B, 16, H/8, W/8), unpacked (conditioners mask
        them at latent resolution). ``generator`` samples the posterior; without one, its mean is used."""
        with self.memory.using("vae", self.vae, self.device):
            return self.vae.encode(images.to(self.device, self.dtype), generator)

    def encode_tokens(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return pack(self.encode_latents(images, generator))

    def mask_tokens(self, mask: torch.Tensor, width: int, height: int, *, per_channel: bool = False) -> torch.Tensor:
        # A token is 2×2 latent pixels: the mask goes to latent resolution, then packs as the latents do.
        rows, cols = self.token_grid(width, height)
        m = F.interpolate(mask, size=(2 * rows, 2 * cols), mode="bilinear", align_corners=False)
        m = m.to(self.device, self.dtype)
        return pack(m.expand(-1, self.vae.latent_channels, -1, -1) if per_channel else m)

    def encode_image(self, images: torch.Tensor) -> Latents:
        latents = self.encode_latents(images)
        grid = (latents.shape[-2] // 2, latents.shape[-1] // 2)
        return Latents(tokens=pack(latents), ids=image_ids(*grid), grid=grid)

    def decode(self, latents: Latents) -> torch.Tensor:
        with self.memory.using("vae", self.vae, self.device):
            return self.vae.decode(unpack(latents.tokens.to(self.dtype), latents.grid))
