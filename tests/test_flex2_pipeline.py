"""The whole flex2 run against diffusers' FluxPipeline on a tiny plain Flux.1 (64-channel) checkpoint: same folder,
prompt, seed, size, steps and guidance give the same latents and image. Also the text encoders and schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flex2_helpers import build_flux_folder, rel_err

from fluxframe import api
from fluxframe.errors import CheckpointError


@pytest.fixture(scope="module")
def flux1_folder(tmp_path_factory):
    return build_flux_folder(tmp_path_factory.mktemp("flux1"), in_channels=64)


def _config(folder, **sampler):
    return api.parse_config({
        "model": {"family": "flex2", "path": str(folder), "dtype": "float32", "device": "cpu"},
        "sampler": {"steps": 3, "guidance": 3.5, "width": 64, "height": 48, **sampler},
    })


@pytest.mark.parametrize("seed,width,height,steps", [(0, 64, 48, 3), (7, 32, 80, 2)])
def test_same_image_as_diffusers_flux_pipeline(flux1_folder, host, seed, width, height, steps):
    from diffusers import FluxPipeline

    prompt = "a small red square on a blue background"
    pipeline = api.load(_config(flux1_folder), host=host)
    result = pipeline.generate(
        api.GenerationRequest(prompt=prompt, seed=seed, width=width, height=height, steps=steps), write=False)

    ref = FluxPipeline.from_pretrained(flux1_folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=prompt, width=width, height=height, num_inference_steps=steps, guidance_scale=3.5)
    latents = ref(**kwargs, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    image = ref(**kwargs, generator=torch.Generator("cpu").manual_seed(seed)).images[0]

    assert result.latents.shape == latents.shape
    assert rel_err(result.latents, latents) < 1e-5
    ours, theirs = np.asarray(result.image, dtype=np.int16), np.asarray(image, dtype=np.int16)
    assert ours.shape == theirs.shape == (height, width, 3)
    assert np.abs(ours - theirs).max() <= 1
    assert (ours == theirs).mean() > 0.999


def test_prompt_encoding_matches_diffusers(flux1_folder, host):
    from diffusers import FluxPipeline

    model = api.load(_config(flux1_folder), host=host).stages.model
    prompts = ["a lighthouse on rocky cliffs", "x"]
    text = model.encode_prompts(prompts)
    ref = FluxPipeline.from_pretrained(flux1_folder, torch_dtype=torch.float32)
    embeds, pooled, ids = ref.encode_prompt(prompts, prompt_2=None, max_sequence_length=512)
    assert text.embeds.shape == embeds.shape == (2, 512, 32)
    assert rel_err(text.embeds, embeds) < 1e-5 and rel_err(text.pooled, pooled) < 1e-5
    assert torch.equal(text.ids, ids.long())


def test_schedule_matches_diffusers(flux1_folder, host):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    model = api.load(_config(flux1_folder), host=host).stages.model
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(flux1_folder / "scheduler")
    for steps, seq in ((28, 4096), (4, 192), (50, 1024)):
        mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        assert torch.allclose(model.sigmas(steps, seq), scheduler.sigmas.float(), atol=1e-6)


def test_missing_component_is_named(tmp_path, flux1_folder, host):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(flux1_folder, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(CheckpointError, match="text_encoder_2/ is missing"):
        api.check_config(_config(broken), host=host)


def test_single_file_beside_components_loads(tmp_path, flux1_folder, host):
    """The original layout: one file for the transformer, other components in folders beside it."""
    import shutil

    from safetensors.torch import save_file

    from fluxframe.plugins.flex2 import keymap

    base = api.load(_config(flux1_folder), host=host)
    root = tmp_path / "single"
    root.mkdir()
    for component in ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        shutil.copytree(flux1_folder / component, root / component)
    state = {k: v.contiguous() for k, v in base.stages.model.transformer.state_dict().items()}
    save_file(state, str(root / "flux1-tiny.safetensors"), {"axes_dims_rope": "4,6,6"})
    assert keymap.single_file_prefix(state) == ""
    single = api.load(_config(root / "flux1-tiny.safetensors"), host=host)
    request = api.GenerationRequest(prompt="a red circle", seed=3, steps=2)
    a = base.generate(request, write=False).latents
    b = single.generate(api.GenerationRequest(prompt="a red circle", seed=3, steps=2), write=False).latents
    assert torch.equal(a, b)
