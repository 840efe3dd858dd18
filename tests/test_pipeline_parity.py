"""The whole run against diffusers' Flux2Pipeline: same folder, seed, size, steps, guidance -> same image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxframe import api


def _config(folder, **sampler):
    return api.parse_config({
        "model": {"family": "flux2", "path": str(folder), "dtype": "float32", "device": "cpu"},
        "sampler": {"steps": 3, "guidance": 3.5, "width": 64, "height": 48, **sampler},
    })


@pytest.mark.parametrize("seed,width,height,steps", [(0, 64, 48, 3), (7, 32, 80, 2)])
def test_same_image_as_diffusers(diffusers_flux2_folder, host, seed, width, height, steps):
    from diffusers import Flux2Pipeline

    prompt = "a small red square on a blue background"
    pipeline = api.load(_config(diffusers_flux2_folder), host=host)
    result = pipeline.generate(
        api.GenerationRequest(prompt=prompt, seed=seed, width=width, height=height, steps=steps), write=False
    )

    ref = Flux2Pipeline.from_pretrained(diffusers_flux2_folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=prompt, width=width, height=height, num_inference_steps=steps, guidance_scale=3.5)
    latents = ref(**kwargs, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    image = ref(**kwargs, generator=torch.Generator("cpu").manual_seed(seed)).images[0]

    assert ((result.latents - latents).norm() / latents.norm()).item() < 1e-5
    ours, theirs = np.asarray(result.image, dtype=np.int16), np.asarray(image, dtype=np.int16)
    assert ours.shape == theirs.shape == (height, width, 3)
    # uint8 rounding can flip a value sitting on .5; anything beyond one level is a real difference
    assert np.abs(ours - theirs).max() <= 1
    assert (ours == theirs).mean() > 0.999


def test_output_written_atomically(diffusers_flux2_folder, host, tmp_path):
    pipeline = api.load(_config(diffusers_flux2_folder), host=host)
    out = tmp_path / "sub" / "img.png"
    result = pipeline.generate(api.GenerationRequest(prompt="x", seed=1, steps=1, output=out))
    assert result.path == out and out.exists()
    assert [p.name for p in out.parent.iterdir()] == ["img.png"]  # no temporary file left behind
    from PIL import Image

    assert Image.open(out).size == (64, 48)
