"""The FLUX.2 model family: loads a checkpoint folder (diffusers layout) and runs its parts.

The folder holds model_index.json, transformer/, vae/, text_encoder/, tokenizer/ and scheduler/.
Weights stream from memory-mapped safetensors into modules built on the meta device, so a
checkpoint is never held twice. The text encoder loads on first use.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from fluxframe.core.checkpoint import SafetensorsCheckpoint, load_into, resolve_weight_files
from fluxframe.core.interfaces import MemoryStrategy, ModelFamily, ModelLimits
from fluxframe.core.types import Conditioning, Latents, TextConditioning
from fluxframe.errors import CheckpointError, ConfigError

from . import keymap
from .autoencoder import AutoencoderConfig, Flux2Autoencoder
from .transformer import Flux2Transformer, TransformerConfig

PIPELINE_CLASSES = {"Flux2Pipeline"}
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The schedule shift FLUX.2 was tuned with: linear in sequence length, interpolated in steps."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + m_200 - 200.0 * a)


def flux2_sigmas(steps: int, image_seq_len: int) -> torch.Tensor:
    """linspace(1, 1/N, N) shifted by exp(mu) / (exp(mu) + 1/s - 1), then a final 0; fp32 like the reference."""
    base = torch.from_numpy(np.linspace(1.0, 1.0 / steps, steps).astype(np.float32))
    shift = math.exp(empirical_mu(image_seq_len, steps))
    return torch.cat([shift / (shift + (1.0 / base - 1.0)), torch.zeros(1)])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine", key="model.device")
    return device


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError("is missing", file=str(path)) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"is not valid JSON: {exc}", file=str(path)) from None
    if not isinstance(data, dict):
        raise CheckpointError("must hold a JSON object", file=str(path))
    return data


def check_folder(folder: Path) -> dict:
    """Check a diffusers-layout FLUX.2 folder without reading weights; returns model_index.json."""
    if not folder.exists():
        raise CheckpointError("checkpoint folder does not exist", file=str(folder))
    if not folder.is_dir():
        raise CheckpointError("expected a checkpoint folder (diffusers layout)", file=str(folder))
    index = _read_json(folder / "model_index.json")
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise CheckpointError(
            f"_class_name is {cls!r}; the flux2 family loads {sorted(PIPELINE_CLASSES)}",
            file=str(folder / "model_index.json"), key="_class_name",
        )
    for component in COMPONENTS:
        if not (folder / component).is_dir():
            raise CheckpointError(f"component folder {component}/ is missing", file=str(folder / component))
    for component in ("transformer", "vae"):
        resolve_weight_files(folder / component)
    return index


def fingerprint(folder: Path) -> str:
    """A stable identity of a checkpoint: sha256 over component configs and weight-file headers and sizes.

    Hashing every byte of a 60 GB checkpoint on each start is not affordable; the safetensors
    header pins every tensor's name, dtype, shape and offset, and the size pins the data length.
    """
    digest = hashlib.sha256()
    for component in ("transformer", "vae", "text_encoder"):
        sub = folder / component
        if (sub / "config.json").exists():
            digest.update((sub / "config.json").read_bytes())
        for file in resolve_weight_files(sub):
            with open(file, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                digest.update(fh.read(min(n, 100_000_000)))
            digest.update(str(file.stat().st_size).encode())
    return "sha256:" + digest.hexdigest()


def load_transformer(folder: Path, dtype: torch.dtype, device: torch.device) -> Flux2Transformer:
    config = TransformerConfig.from_dict(_read_json(folder / "config.json"), source=str(folder / "config.json"))
    with torch.device("meta"):
        model = Flux2Transformer(config)
    with SafetensorsCheckpoint.open(folder) as ckpt:
        load_into(model, ckpt, key_map=keymap.from_diffusers(config), dtype=dtype, device=device, what="transformer")
    return model.eval().requires_grad_(False)


def load_autoencoder(folder: Path, dtype: torch.dtype, device: torch.device) -> Flux2Autoencoder:
    config = AutoencoderConfig.from_dict(_read_json(folder / "config.json"), source=str(folder / "config.json"))
    with torch.device("meta"):
        model = Flux2Autoencoder(config)
    with SafetensorsCheckpoint.open(folder) as ckpt:
        load_into(model, ckpt, dtype=dtype, device=device, what="vae")
    return model.eval().requires_grad_(False)


def text_ids(length: int) -> torch.Tensor:
    """(0, 0, 0, l) for each text token l."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids


def image_ids(h: int, w: int, t: int = 0) -> torch.Tensor:
    """(t, row, col, 0) for each token of an h×w grid, row-major."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.tensor([0]))


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h·w, C)."""
    return latents.flatten(2).transpose(1, 2)


def unpack(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h·w, C) -> (B, C, h, w)."""
    return tokens.transpose(1, 2).unflatten(2, grid)


class Flux2(ModelFamily):
    """FLUX.2 dev: Mistral-3 text encoder, guidance-distilled DiT, 32-channel autoencoder."""

    name = "flux2"
    default_steps = 50
    default_guidance = 4.0

    def __init__(self, folder: Path, transformer: Flux2Transformer, vae: Flux2Autoencoder, *, device: torch.device,
                 dtype: torch.dtype, memory: MemoryStrategy):
        self.folder = folder
        self.transformer = transformer
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.memory = memory
        self._text_encoder = None
        self._checkpoint_id: str | None = None
        downsample = 2 ** (len(vae.config.block_out_channels) - 1) * vae.config.patch_size[0]
        self.limits = ModelLimits(
            latent_channels=transformer.config.in_channels, pixel_multiple=downsample, max_references=10
        )

    @classmethod
    def folder_for(cls, config) -> Path:
        if config.model.preset is not None:
            from .presets import preset_folder

            return preset_folder(config.model.preset)
        return config.model_path

    @classmethod
    def check(cls, config) -> list[str]:
        if config.model.preset is not None:
            from .presets import PRESETS

            if config.model.preset not in PRESETS:
                raise ConfigError(f"unknown preset {config.model.preset!r} (known: {', '.join(PRESETS)})",
                                  path=config.source, key="model.preset")
            return [f"preset {config.model.preset!r}: random weights, for trying fluxframe out (images are noise)"]
        check_folder(config.model_path)
        return []

    @classmethod
    def load(cls, config, memory):
        folder = cls.folder_for(config)
        check_folder(folder)
        device = resolve_device(config.model.device)
        dtype = DTYPES[config.model.dtype]
        transformer = memory.place("transformer", load_transformer(folder / "transformer", dtype, device), device)
        vae = memory.place("vae", load_autoencoder(folder / "vae", dtype, device), device)
        return cls(folder, transformer, vae, device=device, dtype=dtype, memory=memory)

    @property
    def checkpoint_id(self) -> str:
        if self._checkpoint_id is None:
            self._checkpoint_id = fingerprint(self.folder)
        return self._checkpoint_id

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from .text_encoder import MistralPromptEncoder

            encoder = MistralPromptEncoder.from_pretrained(
                self.folder / "text_encoder", self.folder / "tokenizer", dtype=self.dtype, device=self.device
            )
            if encoder.embed_dim != self.transformer.config.joint_attention_dim:
                raise CheckpointError(
                    f"the text encoder gives {encoder.embed_dim}-wide embeddings, the transformer expects "
                    f"{self.transformer.config.joint_attention_dim}",
                    file=str(self.folder / "transformer" / "config.json"), key="joint_attention_dim",
                )
            self._text_encoder = self.memory.place("text_encoder", encoder, self.device)
        return self._text_encoder

    def encode_prompts(self, prompts: list[str]) -> TextConditioning:
        encoder = self.text_encoder
        self.memory.before_use("text_encoder", encoder, self.device)
        try:
            embeds = encoder.encode(prompts)
        finally:
            self.memory.after_use("text_encoder", encoder, self.device)
        return TextConditioning(embeds=embeds.to(self.device, self.dtype), ids=text_ids(embeds.shape[1]))

    def initial_noise(self, seed: int, width: int, height: int) -> Latents:
        # Drawn exactly as diffusers' Flux2Pipeline draws it: a CPU generator, shape (1, 128, H/16, W/16).
        grid = (height // self.limits.pixel_multiple, width // self.limits.pixel_multiple)
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn((1, self.limits.latent_channels, *grid), generator=generator, dtype=self.dtype)
        return Latents(tokens=pack(noise).to(self.device), ids=image_ids(*grid), grid=grid)

    def sigmas(self, steps: int, image_tokens: int) -> torch.Tensor:
        return flux2_sigmas(steps, image_tokens)

    def predict(self, latents, latent_ids, sigma, text, conditioning: Conditioning, guidance):
        tokens, ids = latents.to(self.dtype), latent_ids
        if conditioning.extra_tokens:
            tokens = torch.cat([tokens, *(t.to(tokens) for t, _ in conditioning.extra_tokens)], dim=1)
            ids = torch.cat([ids, *(i for _, i in conditioning.extra_tokens)], dim=0)
        batch = tokens.shape[0]
        t = torch.full((batch,), float(sigma), device=self.device, dtype=torch.float32)
        g = torch.full((batch,), float(guidance), device=self.device, dtype=torch.float32)
        self.memory.before_use("transformer", self.transformer, self.device)
        try:
            out = self.transformer(tokens, ids.to(self.device), text.embeds, text.ids.to(self.device), t,
                                   g if self.transformer.guidance_in is not None else None)
        finally:
            self.memory.after_use("transformer", self.transformer, self.device)
        return out[:, : latents.shape[1]]

    def encode_image(self, images: torch.Tensor) -> Latents:
        self.memory.before_use("vae", self.vae, self.device)
        try:
            latents = self.vae.encode(images.to(self.device, self.dtype))
        finally:
            self.memory.after_use("vae", self.vae, self.device)
        grid = tuple(latents.shape[-2:])
        return Latents(tokens=pack(latents), ids=image_ids(*grid), grid=grid)

    def decode(self, latents: Latents) -> torch.Tensor:
        self.memory.before_use("vae", self.vae, self.device)
        try:
            return self.vae.decode(unpack(latents.tokens.to(self.dtype), latents.grid))
        finally:
            self.memory.after_use("vae", self.vae, self.device)
