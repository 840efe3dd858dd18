"""FLUX.2 klein against diffusers' Flux2KleinPipeline (distilled, and base with true CFG), the family's defaults,
and the errors for negative prompts a model cannot use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxframe import api
from fluxframe.errors import CheckpointError, RequestError

PROMPT = "a small red square on a blue background"


def config(folder, **sampler):
    return api.parse_config({"model": {"path": str(folder), "dtype": "float32", "device": "cpu"},
                             "sampler": {"width": 64, "height": 48, **sampler}})


def reference(folder, seed, **kwargs):
    """diffusers' final latent tokens and image."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    seen = {}

    def keep(_pipe, _i, _t, tensors):
        seen["latents"] = tensors["latents"]
        return {}

    image = pipe(width=64, height=48, generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=keep,
                 **kwargs).images[0]
    return seen["latents"], image, pipe


def assert_same(result, latents, image):
    err = ((result.latents - latents).norm() / latents.norm()).item()
    assert err < 1e-5, err
    ours, theirs = np.asarray(result.image, dtype=np.int16), np.asarray(image, dtype=np.int16)
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1


def test_distilled_same_image_as_diffusers_at_its_defaults(klein_folders, host):
    pipeline = api.load(config(klein_folders["distilled"]), host=host)
    result = pipeline.generate(api.GenerationRequest(prompt=PROMPT, seed=3), write=False)
    assert (result.steps, result.guidance) == (4, 1.0)  # the family's defaults for a step-distilled klein
    assert pipeline.stages.model._text_encoder.identity["class"] == "Qwen3ForCausalLM"
    latents, image, _ = reference(klein_folders["distilled"], 3, prompt=PROMPT, num_inference_steps=4,
                                  guidance_scale=1.0)
    assert_same(result, latents, image)


def test_base_true_cfg_same_image_as_diffusers(klein_folders, host):
    pipeline = api.load(config(klein_folders["base"], steps=3), host=host)
    model = pipeline.stages.model
    assert model.default_steps == 50 and model.true_cfg(4.0) and not model.true_cfg(1.0)
    result = pipeline.generate(api.GenerationRequest(prompt=PROMPT, seed=5), write=False)
    assert (result.steps, result.guidance) == (3, 4.0)
    latents, image, pipe = reference(klein_folders["base"], 5, prompt=PROMPT, num_inference_steps=3,
                                     guidance_scale=4.0)
    assert_same(result, latents, image)

    # a negative prompt replaces the empty one; diffusers takes it as negative_prompt_embeds
    negative = "blurry, green"
    result = pipeline.generate(api.GenerationRequest(prompt=PROMPT, negative_prompt=negative, seed=5), write=False)
    neg = pipe._get_qwen3_prompt_embeds(pipe.text_encoder, pipe.tokenizer, [negative], dtype=torch.float32,
                                        device="cpu")
    latents, image, _ = reference(klein_folders["base"], 5, prompt=PROMPT, num_inference_steps=3,
                                  guidance_scale=4.0, negative_prompt_embeds=neg)
    assert_same(result, latents, image)


def test_negative_prompt_refused_where_no_true_guidance_runs(klein_folders, diffusers_flux2_folder, host):
    for folder, guidance in ((klein_folders["distilled"], None), (diffusers_flux2_folder, None),
                             (klein_folders["base"], 1.0)):
        pipeline = api.load(config(folder, steps=1), host=host)
        with pytest.raises(RequestError, match="negative_prompt") as info:
            pipeline.generate(api.GenerationRequest(prompt="x", negative_prompt="blur", guidance=guidance),
                              write=False)
        assert info.value.field == "negative_prompt"
        assert pipeline.stages.model._text_encoder is None  # refused before any work


def test_unknown_text_encoder_type_is_named(klein_folders, tmp_path, host):
    import json
    import shutil

    folder = shutil.copytree(klein_folders["distilled"], tmp_path / "k")
    cfg = folder / "text_encoder" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "model_type": "llama"}))
    pipeline = api.load(config(folder, steps=1), host=host)
    with pytest.raises(CheckpointError, match="model_type") as info:
        pipeline.generate(api.GenerationRequest(prompt="x", seed=0), write=False)
    assert info.value.key == "model_type" and "text_encoder" in str(info.value)


def test_tiny_klein_preset_runs_at_klein_defaults(host):
    cfg = api.parse_config({"model": {"preset": "tiny-klein", "dtype": "float32", "device": "cpu"},
                            "sampler": {"width": 32, "height": 32}})
    assert any("random weights" in w for w in api.check_config(cfg, host=host))
    result = api.load(cfg, host=host).generate(api.GenerationRequest(prompt="a cat", seed=0), write=False)
    assert (result.steps, result.guidance) == (4, 1.0) and result.image.size == (32, 32)
