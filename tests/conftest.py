"""Shared fixtures: tiny random FLUX.2 checkpoints made offline, and an isolated plugin host."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Presets build into a per-session folder, never into the user's cache."""
    old = os.environ.get("FLUXFRAME_CACHE")
    os.environ["FLUXFRAME_CACHE"] = str(tmp_path_factory.mktemp("fluxframe-cache"))
    yield
    if old is None:
        os.environ.pop("FLUXFRAME_CACHE", None)
    else:
        os.environ["FLUXFRAME_CACHE"] = old


def tiny_diffusers_transformer(**overrides):
    from diffusers import Flux2Transformer2DModel

    config = dict(in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=96, axes_dims_rope=(4, 4, 4, 4),
                  timestep_guidance_channels=256, guidance_embeds=True)
    config.update(overrides)
    model = Flux2Transformer2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():  # default inits leave some layers near zero; make every weight matter
            p.normal_(0, 0.5 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.2).add_(1.0 if p.ndim == 1 else 0.0)
    return model


def tiny_diffusers_vae(**overrides):
    from diffusers import AutoencoderKLFlux2

    config = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=32)
    config.update(overrides)
    vae = AutoencoderKLFlux2(**config).eval()
    with torch.no_grad():
        vae.bn.running_mean.normal_(0, 0.2)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


@pytest.fixture(scope="session")
def tiny_text_encoder_dirs(tmp_path_factory):
    """(text_encoder_dir, tokenizer_dir) of a tiny random Mistral-3 with a BPE tokenizer trained offline."""
    from transformers import AutoTokenizer

    from fluxframe.plugins.flux2.tiny import build_tiny_mistral3, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny-mistral3")
    build_tiny_tokenizer(root / "tokenizer")
    vocab = len(AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True))
    build_tiny_mistral3(root / "text_encoder", vocab_size=vocab, seed=0)
    return root / "text_encoder", root / "tokenizer"


@pytest.fixture(scope="session")
def diffusers_flux2_folder(tmp_path_factory, tiny_text_encoder_dirs):
    """A complete tiny FLUX.2 checkpoint written by diffusers' own save_pretrained (the oracle's layout)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import AutoTokenizer, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    te_dir, tok_dir = tiny_text_encoder_dirs
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential"),
        vae=tiny_diffusers_vae(),
        text_encoder=Mistral3ForConditionalGeneration.from_pretrained(te_dir),
        tokenizer=AutoTokenizer.from_pretrained(tok_dir),
        transformer=tiny_diffusers_transformer(),
    )
    folder = tmp_path_factory.mktemp("flux2-diffusers") / "FLUX.2-tiny"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture
def host():
    """A plugin host with only the built-ins, registered in code (installed third-party plugins never leak in)."""
    import fluxframe.conditioning as conditioning
    import fluxframe.demo as demo
    import fluxframe.provenance as provenance
    import fluxframe.safety as safety
    from fluxframe.core.plugins import PluginHost
    from fluxframe.plugins import flex2, flux2, memory, samplers

    h = PluginHost(load_entry_points=False)
    for name, module in (("flux2", flux2), ("flex2", flex2), ("memory", memory), ("samplers", samplers),
                         ("safety", safety), ("provenance", provenance), ("conditioning", conditioning),
                         ("demo", demo)):
        h.add(module, name=name, source="fluxframe (test)", builtin=True)
    return h


@pytest.fixture(scope="session")
def tiny_qwen3_dirs(tmp_path_factory):
    """(text_encoder_dir, tokenizer_dir) of a tiny random Qwen3 with a Qwen-like tokenizer."""
    from transformers import AutoTokenizer

    from fluxframe.plugins.flux2.tiny import build_tiny_qwen3, build_tiny_qwen_tokenizer

    root = tmp_path_factory.mktemp("tiny-qwen3")
    build_tiny_qwen_tokenizer(root / "tokenizer")
    build_tiny_qwen3(root / "text_encoder", vocab_size=len(AutoTokenizer.from_pretrained(root / "tokenizer")))
    return root / "text_encoder", root / "tokenizer"


@pytest.fixture(scope="session")
def klein_folders(tmp_path_factory, tiny_qwen3_dirs):
    """{"distilled": folder, "base": folder}: the same tiny weights saved by Flux2KleinPipeline.save_pretrained."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    torch.manual_seed(0)
    te_dir, tok_dir = tiny_qwen3_dirs
    parts = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential"),
        vae=tiny_diffusers_vae(), text_encoder=Qwen3ForCausalLM.from_pretrained(te_dir),
        tokenizer=AutoTokenizer.from_pretrained(tok_dir), transformer=tiny_diffusers_transformer(guidance_embeds=False),
    )
    root = tmp_path_factory.mktemp("klein")
    out = {}
    for kind in ("distilled", "base"):
        Flux2KleinPipeline(**parts, is_distilled=kind == "distilled").save_pretrained(root / kind)
        out[kind] = root / kind
    return out
