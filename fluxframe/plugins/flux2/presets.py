"""Built-in checkpoints the flux2 family makes itself, so fluxframe runs on a machine with no weights.

``tiny`` is a FLUX.2 (dev-shaped) checkpoint with random weights in the diffusers folder layout, ``tiny-klein``
a step-distilled klein-shaped one (Qwen3 text encoder, no guidance embedder): they load through exactly the code
path of a real checkpoint, and draw noise. It is built once, into
the cache folder ($FLUXFRAME_CACHE, else ~/.cache/fluxframe), atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fluxframe.core.checkpoint import save_sharded
from fluxframe.core.files import atomic_folder

from . import keymap
from .autoencoder import AutoencoderConfig, Flux2Autoencoder
from .transformer import Flux2Transformer, TransformerConfig

TINY_VERSION = "tiny-v1"
PRESETS = ("tiny", "tiny-klein")


def cache_dir() -> Path:
    return Path(os.environ.get("FLUXFRAME_CACHE") or Path.home() / ".cache" / "fluxframe")


def _folder(name: str) -> Path:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}")
    return cache_dir() / "presets" / TINY_VERSION.replace("tiny", name)


def preset_folder(name: str) -> Path:
    folder = _folder(name)
    if not (folder / "model_index.json").exists():
        build_tiny(folder, klein=name == "tiny-klein")
    return folder


def tiny_configs(text_hidden: int, *, klein: bool) -> tuple[TransformerConfig, AutoencoderConfig]:
    """The tiny preset's transformer and autoencoder shapes (the transformer's text width follows the text
    encoder's hidden size)."""
    transformer = TransformerConfig(
        num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=3 * text_hidden, axes_dims_rope=(8, 8, 8, 8), guidance_embeds=not klein,
    )
    return transformer, AutoencoderConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)


def preset_configs(name: str) -> tuple[TransformerConfig, AutoencoderConfig]:
    """The preset's transformer and autoencoder configs without building it (what its limits follow from): from
    its folder's config files once built, else from ``tiny_configs`` (which the build writes, so both agree on
    every size but the text width, which the limits do not depend on)."""
    folder = _folder(name)
    if (folder / "model_index.json").exists():
        return TransformerConfig.read(folder / "transformer"), AutoencoderConfig.read(folder / "vae")
    return tiny_configs(1, klein=name == "tiny-klein")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def build_tiny(folder: Path, *, seed: int = 0, klein: bool = False) -> Path:
    """Write the tiny random checkpoint to ``folder`` (built beside it, then renamed into place)."""
    from .tiny import build_tiny_mistral3, build_tiny_qwen3, build_tiny_qwen_tokenizer, build_tiny_tokenizer

    def build(work: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            (build_tiny_qwen_tokenizer if klein else build_tiny_tokenizer)(work / "tokenizer")
            from transformers import AutoConfig, AutoTokenizer

            vocab = len(AutoTokenizer.from_pretrained(work / "tokenizer", local_files_only=True))
            (build_tiny_qwen3 if klein else build_tiny_mistral3)(work / "text_encoder", vocab_size=vocab, seed=seed)

            text_hidden = AutoConfig.from_pretrained(work / "text_encoder").get_text_config().hidden_size
            t_config, v_config = tiny_configs(text_hidden, klein=klein)
            transformer = Flux2Transformer(t_config)
            _write_json(work / "transformer" / "config.json", t_config.to_dict())
            save_sharded(keymap.to_diffusers(transformer.state_dict(), t_config), work / "transformer")

            vae = Flux2Autoencoder(v_config)
            vae.bn.running_mean.normal_(0, 0.1)
            vae.bn.running_var.uniform_(0.5, 1.5)
            _write_json(work / "vae" / "config.json", v_config.to_dict())
            save_sharded(vae.state_dict(), work / "vae")

        _write_json(work / "scheduler" / "scheduler_config.json", {
            "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
            "use_dynamic_shifting": True, "time_shift_type": "exponential",
        })
        _write_json(work / "model_index.json", {
            "_class_name": "Flux2KleinPipeline" if klein else "Flux2Pipeline",
            **({"is_distilled": True} if klein else {}),
            "_fluxframe_preset": f"{TINY_VERSION}: random weights, seed {seed}",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3ForCausalLM" if klein else "Mistral3ForConditionalGeneration"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "transformer": ["diffusers", "Flux2Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLFlux2"],
        })

    return atomic_folder(folder, build)  # a concurrent builder that won the race keeps its folder
