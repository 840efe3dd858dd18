"""The FLUX.2 model family: loads a checkpoint folder (diffusers layout) and runs its parts.

One family for every FLUX.2 checkpoint; the checkpoint's own files say which it is. dev (Flux2Pipeline): Mistral-3
text encoder, guidance embedded in the DiT, 50 steps at 4.0. klein (Flux2KleinPipeline): Qwen3 text encoder, no
guidance embedder; model_index.json `is_distilled` true is the step-distilled model (4 steps, guidance 1, no CFG),
false the base model (50 steps, true classifier-free guidance against a negative prompt, "" by default, at 4.0).

The folder holds model_index.json, transformer/, vae/, text_encoder/, tokenizer/ and scheduler/.
Weights are read tensor by tensor from safetensors into modules built on the meta device, so a
checkpoint is never held twice. The text encoder loads on first use.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from fluxframe.core.checkpoint import SafetensorsCheckpoint, build_and_load, check_weight_files, resolve_weight_files
from fluxframe.core.checkpoint import fingerprint as checkpoint_fingerprint
from fluxframe.core.interfaces import MemoryStrategy, ModelFamily, ModelLimits
from fluxframe.core.types import Conditioning, Latents, TextConditioning
from fluxframe.errors import CheckpointError, ConfigError
from fluxframe.plugins.common import bounds
from fluxframe.plugins.common.loading import DTYPES, resolve_device
from fluxframe.plugins.lora import LoraSupport

from . import keymap, single_file
from .autoencoder import AutoencoderConfig, Flux2Autoencoder
from .transformer import Flux2Transformer, TransformerConfig

PIPELINE_CLASSES = {"Flux2Pipeline", "Flux2KleinPipeline"}
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")


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


def check_folder(folder: Path) -> dict:
    """Check a diffusers-layout FLUX.2 folder without reading weights; returns model_index.json."""
    if not folder.exists():
        raise CheckpointError("checkpoint folder does not exist", file=str(folder))
    if not folder.is_dir():
        raise CheckpointError("expected a checkpoint folder (diffusers layout)", file=str(folder))
    index = bounds.read_json(folder / "model_index.json")
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


def check_files(folder: Path) -> None:
    """What ``check_folder`` leaves to loading, still without reading weights: every config.json within sane
    bounds, and every weight file (transformer, vae, text encoder; shards of an index too) as long as its
    header says, so a truncated download is refused by `config check`, not after minutes of loading."""
    TransformerConfig.read(folder / "transformer")
    AutoencoderConfig.read(folder / "vae")
    bounds.text_encoder_config(folder / "text_encoder")
    for component in ("transformer", "vae", "text_encoder"):
        check_weight_files(folder / component)


def model_limits(transformer: TransformerConfig, vae: AutoencoderConfig) -> ModelLimits:
    """The limits of a model of these shapes: one latent pixel is 2^(levels - 1) pixels, patchified by
    ``patch_size``; the transformer takes ``in_channels`` per token. Up to 10 reference images."""
    downsample = 2 ** (len(vae.block_out_channels) - 1) * vae.patch_size[0]
    return ModelLimits(latent_channels=transformer.in_channels, pixel_multiple=downsample, max_references=10)


def fingerprint(folder: Path) -> str:
    """The checkpoint id of a diffusers-layout folder (see fluxframe.core.checkpoint.fingerprint)."""
    return checkpoint_fingerprint(*(folder / c for c in ("transformer", "vae", "text_encoder")))


def prompt_encoder_class(folder: Path):
    """The prompt encoder the checkpoint's text_encoder/config.json asks for (by its model_type)."""
    from .qwen3_encoder import Qwen3PromptEncoder
    from .text_encoder import MistralPromptEncoder

    config_file = folder / "text_encoder" / "config.json"
    kind = bounds.text_encoder_config(folder / "text_encoder").get("model_type")
    classes = {"mistral3": MistralPromptEncoder, "qwen3": Qwen3PromptEncoder}
    if kind not in classes:
        raise CheckpointError(f"model_type {kind!r} is not a FLUX.2 text encoder (known: {', '.join(classes)})",
                              file=str(config_file), key="model_type")
    return classes[kind]


def prompt_encoder_identity(folder: Path) -> dict:
    """The encoder's identity from its config alone (no weights read), as the loaded encoder reports it."""
    from transformers import AutoConfig

    from .text_encoder import encoder_identity

    cls = prompt_encoder_class(folder)
    config = AutoConfig.from_pretrained(folder / "text_encoder", local_files_only=True)
    model_class = "Mistral3ForConditionalGeneration" if cls.__name__ == "MistralPromptEncoder" else "Qwen3ForCausalLM"
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return encoder_identity(model_class, text_config, cls.hidden_layers)


def is_base_model(folder: Path, guidance_embeds: bool) -> bool:
    """A klein base model: no guidance embedder and model_index.json `is_distilled` false (diffusers' default)."""
    index = folder / "model_index.json"
    return not guidance_embeds and not (index.is_file() and bounds.read_json(index).get("is_distilled", False))


def load_transformer(folder: Path, dtype: torch.dtype, device: torch.device,
                     memory: MemoryStrategy | None = None) -> Flux2Transformer:
    """The DiT of a diffusers transformer/ folder; ``memory``'s while_loading hook (quantize) runs as it loads."""
    config = TransformerConfig.read(folder)
    with SafetensorsCheckpoint.open(folder) as ckpt:
        return build_and_load(lambda: Flux2Transformer(config), ckpt, what="transformer", memory=memory,
                              key_map=keymap.from_diffusers(config), dtype=dtype, device=device)


def load_autoencoder(folder: Path, dtype: torch.dtype, device: torch.device) -> Flux2Autoencoder:
    config = AutoencoderConfig.read(folder)
    with SafetensorsCheckpoint.open(folder) as ckpt:
        return build_and_load(lambda: Flux2Autoencoder(config), ckpt, what="vae", dtype=dtype, device=device)


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


class Flux2(LoraSupport, ModelFamily):
    """FLUX.2 dev and klein: Mistral-3 or Qwen3 text encoder, FLUX.2 DiT, 32-channel autoencoder."""

    upsample_max_tokens = 512
    upsample_temperature = 0.15  # diffusers' recommendation; 0 decodes greedily

    name = "flux2"
    default_steps = 50
    default_guidance = 4.0
    batched = True
    takes_step_cache = True

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
        self.embedded_guidance = transformer.guidance_in is not None
        self.base = is_base_model(folder, self.embedded_guidance)
        if not self.embedded_guidance and not self.base:  # klein distilled
            self.default_steps, self.default_guidance = 4, 1.0
        self.limits = model_limits(transformer.config, vae.config)

    @classmethod
    def folder_for(cls, config) -> Path:
        if config.model.preset is not None:
            from .presets import preset_folder

            return preset_folder(config.model.preset)
        return config.model_path

    @staticmethod
    def _preset(config) -> str:
        from .presets import PRESETS

        if config.model.preset not in PRESETS:
            raise ConfigError(f"unknown preset {config.model.preset!r} (known: {', '.join(PRESETS)})",
                              path=config.source, key="model.preset")
        return config.model.preset

    @classmethod
    def check(cls, config) -> list[str]:
        if config.model.preset is not None:
            return [f"preset {cls._preset(config)!r}: random weights, for trying fluxframe out (images are noise)"]
        if single_file.is_single_file(config):
            return single_file.check(config)
        check_folder(config.model_path)
        check_files(config.model_path)
        return []

    @classmethod
    def limits_for(cls, config) -> ModelLimits:
        """The ``limits`` the loaded model will have, from config files and headers alone: a preset's own
        definition (or its folder, once built), a single file's tensor shapes, a folder's config.json files."""
        if config.model.preset is not None:
            from .presets import preset_configs

            return model_limits(*preset_configs(cls._preset(config)))
        if single_file.is_single_file(config):
            return model_limits(*single_file.configs(config))
        check_folder(config.model_path)
        return model_limits(TransformerConfig.read(config.model_path / "transformer"),
                            AutoencoderConfig.read(config.model_path / "vae"))

    @classmethod
    def load(cls, config, memory):
        if config.model.path is not None and single_file.is_single_file(config):
            model = single_file.load(cls, config, memory)
        else:
            model = cls._load_folder(config, memory)
        if config.model.compile:
            from fluxframe.plugins.common.compile import compile_blocks

            model.compiled = compile_blocks(model.transformer, model.device)
        return model

    @classmethod
    def _load_folder(cls, config, memory):
        folder = cls.folder_for(config)
        check_folder(folder)
        device = resolve_device(config.model.device)
        dtype = DTYPES[config.model.dtype]
        transformer = load_transformer(folder / "transformer", dtype, memory.load_device("transformer", device),
                                       memory)
        transformer = memory.place("transformer", transformer, device)
        vae = memory.place("vae", load_autoencoder(folder / "vae", dtype, memory.load_device("vae", device)), device)
        return cls(folder, transformer, vae, device=device, dtype=dtype, memory=memory)

    def lora_rules(self):
        return keymap.rules(self.transformer.config)

    @property
    def checkpoint_id(self) -> str:
        if self._checkpoint_id is None:
            self._checkpoint_id = fingerprint(self.folder)
        return self._checkpoint_id

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            encoder = prompt_encoder_class(self.folder).from_pretrained(
                self.folder / "text_encoder", self.folder / "tokenizer", dtype=self.dtype,
                device=self.memory.load_device("text_encoder", self.device),
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
        with self.memory.using("text_encoder", encoder, self.device):
            embeds = encoder.encode(prompts)
        return TextConditioning(embeds=embeds.to(self.device, self.dtype), ids=text_ids(embeds.shape[1]))

    def true_cfg(self, guidance: float) -> bool:
        return self.base and guidance > 1.0

    def upsample_prompt(self, prompt: str, seed: int) -> str:
        from .text_encoder import UPSAMPLING_SYSTEM_MESSAGE

        encoder = self.text_encoder
        with self.memory.using("text_encoder", encoder, self.device):
            return encoder.upsample(prompt, UPSAMPLING_SYSTEM_MESSAGE, max_new_tokens=self.upsample_max_tokens,
                                    temperature=self.upsample_temperature, seed=seed)

    def load_prompt_embeds(self, source):
        from fluxframe.core import embeddings

        tensors, meta = embeddings.load(source, prompt_encoder_identity(self.folder),
                                        self.transformer.config.joint_attention_dim)

        def conditioning(t):
            return TextConditioning(embeds=t.to(self.device, self.dtype), ids=text_ids(t.shape[1]))

        text = conditioning(tensors["prompt_embeds"])
        if "negative_prompt_embeds" in tensors:
            text.negative = conditioning(tensors["negative_prompt_embeds"])
        return text, meta.get("prompt"), meta.get("negative_prompt")

    @classmethod
    def encode_to_file(cls, config, prompt: str, output: Path, negative_prompt: str | None = None) -> Path:
        """Load only the text encoder; write the prompt's embeddings (and the negative prompt's, "" by default,
        for a base model, which needs them for true guidance)."""
        from fluxframe.core import embeddings
        from fluxframe.errors import RequestError

        if config.model.path is not None and single_file.is_single_file(config):
            folder, guidance_embeds = config.resolve(config.model.text_encoder), True
        else:
            folder = cls.folder_for(config)
            check_folder(folder)
            guidance_embeds = bounds.read_json(folder / "transformer" / "config.json").get("guidance_embeds", True)
        base = is_base_model(folder, guidance_embeds)
        if negative_prompt and not base:
            raise RequestError("this checkpoint is guidance-distilled: it runs no classifier-free guidance, so a "
                               "negative prompt would be ignored", field="negative_prompt")
        device = resolve_device(config.model.device)
        encoder = prompt_encoder_class(folder).from_pretrained(folder / "text_encoder", folder / "tokenizer",
                                                               dtype=DTYPES[config.model.dtype], device=device)
        with torch.inference_mode():
            embeds = encoder.encode([prompt])
            negative = encoder.encode([negative_prompt or ""]) if base else None
        return embeddings.save(output, encoder.identity, prompt, embeds, negative_prompt, negative)

    def initial_noise(self, seed: int, width: int, height: int) -> Latents:
        # Drawn exactly as diffusers' Flux2Pipeline draws it: a CPU generator, shape (1, 128, H/16, W/16).
        grid = (height // self.limits.pixel_multiple, width // self.limits.pixel_multiple)
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn((1, self.limits.latent_channels, *grid), generator=generator, dtype=self.dtype)
        return Latents(tokens=pack(noise).to(self.device), ids=image_ids(*grid), grid=grid)

    def sigmas(self, steps: int, image_tokens: int) -> torch.Tensor:
        return flux2_sigmas(steps, image_tokens)

    def predict(self, latents, latent_ids, sigma, text, conditioning: Conditioning, guidance, cache=None):
        tokens, ids = latents.to(self.dtype), latent_ids
        if conditioning.extra_tokens:
            tokens = torch.cat([tokens, *(t.to(tokens) for t, _ in conditioning.extra_tokens)], dim=1)
            ids = torch.cat([ids, *(i for _, i in conditioning.extra_tokens)], dim=0)
        batch = tokens.shape[0]
        t = torch.full((batch,), float(sigma), device=self.device, dtype=torch.float32)
        g = torch.full((batch,), float(guidance), device=self.device, dtype=torch.float32)
        # With a step cache, each pass keeps its own (the positive and negative passes change differently).
        passes = ({}, {}) if cache is None else ({"cache": cache, "stream": "positive"},
                                                 {"cache": cache, "stream": "negative"})
        with self.memory.using("transformer", self.transformer, self.device):
            out = self.transformer(tokens, ids.to(self.device), text.embeds, text.ids.to(self.device), t,
                                   g if self.embedded_guidance else None, **passes[0])
            if text.negative is not None:  # true CFG, two passes as Flux2KleinPipeline runs it
                neg = self.transformer(tokens, ids.to(self.device), text.negative.embeds,
                                       text.negative.ids.to(self.device), t, None, **passes[1])
                out = neg + guidance * (out - neg)
        return out[:, : latents.shape[1]]

    def encode_image(self, images: torch.Tensor) -> Latents:
        with self.memory.using("vae", self.vae, self.device):
            latents = self.vae.encode(images.to(self.device, self.dtype))
        grid = tuple(latents.shape[-2:])
        return Latents(tokens=pack(latents), ids=image_ids(*grid), grid=grid)

    def decode(self, latents: Latents) -> torch.Tensor:
        with self.memory.using("vae", self.vae, self.device):
            return self.vae.decode(unpack(latents.tokens.to(self.dtype), latents.grid))
