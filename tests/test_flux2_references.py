"""FLUX.2 multi-reference editing: same image as diffusers' Flux2Pipeline with 1, 2 and 3 references of
different sizes and aspect ratios, and every bad input a clear RequestError before any model work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fluxframe import api
from fluxframe.conditioning.reference import ReferenceConditioner, prepare_reference
from fluxframe.errors import RequestError


def _image(width, height, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    # smooth gradients plus noise: something the autoencoder does not flatten to a constant
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _config(folder):
    return api.parse_config({
        "model": {"family": "flux2", "path": str(folder), "dtype": "float32", "device": "cpu"},
        "sampler": {"steps": 2, "guidance": 3.5, "width": 64, "height": 48},
    })


@pytest.fixture(scope="module")
def pipelines(diffusers_flux2_folder):
    from diffusers import Flux2Pipeline

    import fluxframe.conditioning as conditioning
    from fluxframe.core.plugins import PluginHost
    from fluxframe.plugins import flux2, memory, samplers

    host = PluginHost(load_entry_points=False)
    for name, module in (("flux2", flux2), ("memory", memory), ("samplers", samplers),
                         ("conditioning", conditioning)):
        host.add(module, name=name, source="fluxframe (test)", builtin=True)
    ours = api.load(_config(diffusers_flux2_folder), host=host)
    ref = Flux2Pipeline.from_pretrained(diffusers_flux2_folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


# 1, 2 and 3 references: cropped (odd sizes), over the area cap (resized), portrait, landscape, palette
REFERENCES = [
    [(72, 100, "RGB")],
    [(130, 66, "RGB"), (64, 64, "P")],
    [(96, 200, "RGB"), (1100, 1000, "RGB"), (83, 77, "RGBA")],
]


@pytest.mark.parametrize("specs", REFERENCES, ids=["1-ref", "2-refs", "3-refs"])
def test_same_image_as_diffusers(pipelines, specs, tmp_path):
    ours, ref = pipelines
    images = [_image(w, h, seed=i, mode=mode) for i, (w, h, mode) in enumerate(specs)]
    paths = []
    for i, image in enumerate(images):  # paths for ours (as the CLI passes them), PIL images for diffusers
        paths.append(tmp_path / f"ref{i}.png")
        image.save(paths[-1])
    prompt, seed, width, height, steps = "put the cat on the table", 5, 64, 48, 2
    result = ours.generate(api.GenerationRequest(
        prompt=prompt, seed=seed, width=width, height=height, steps=steps,
        conditioning={"reference": {"images": paths}}), write=False)

    kwargs = dict(prompt=prompt, width=width, height=height, num_inference_steps=steps, guidance_scale=3.5,
                  image=[im.convert("RGB") for im in images])  # diffusers resizes before converting; we after
    latents = ref(**kwargs, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    image = ref(**kwargs, generator=torch.Generator("cpu").manual_seed(seed)).images[0]

    error = ((result.latents - latents).norm() / latents.norm()).item()
    print(f"{len(specs)} reference(s): relative latent error {error:.2e}")
    assert error < 1e-5
    a, b = np.asarray(result.image, dtype=np.int16), np.asarray(image, dtype=np.int16)
    assert a.shape == b.shape == (height, width, 3)
    assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.999

    # the references matter: without them the image is a different one
    plain = ours.generate(api.GenerationRequest(prompt=prompt, seed=seed, width=width, height=height, steps=steps),
                          write=False)
    assert not torch.allclose(plain.latents, result.latents)


def test_reference_ids_and_tokens(pipelines):
    ours, _ = pipelines
    from fluxframe.core.types import Conditioning

    cond = Conditioning()
    images = [_image(80, 64, 0), _image(64, 112, 1)]
    ReferenceConditioner().prepare(ours.stages.model, None, {"images": images}, cond)
    assert [t.shape for t, _ in cond.extra_tokens] == [(1, 20, 128), (1, 28, 128)]
    ids = cond.extra_tokens[1][1]
    assert ids.dtype == torch.long and ids.shape == (28, 4)
    assert ids[:, 0].unique().tolist() == [20] and ids[:, 3].unique().tolist() == [0]
    assert ids[:, 1].max() == 6 and ids[:, 2].max() == 3  # (row, col) from 0 within the reference
    assert cond.info["reference"]["images"] == [[80, 64], [64, 112]]


def test_preprocessing_matches_diffusers():
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    processor = Flux2ImageProcessor(vae_scale_factor=16)
    for w, h in ((83, 77), (1500, 900), (64, 500), (2048, 2048)):
        src = _image(w, h, seed=w)
        img = src
        if w * h > 1024 * 1024:
            img = processor._resize_to_target_area(img, 1024 * 1024)
        ww, hh = img.width // 16 * 16, img.height // 16 * 16
        theirs = processor.preprocess(img, height=hh, width=ww, resize_mode="crop")
        from fluxframe.core.images import from_pil

        ours = from_pil(prepare_reference(src, 16))
        assert ours.shape == theirs.shape and torch.equal(ours, theirs)


# -- bad input: each a RequestError naming the field, raised before any model work --------------------------


@pytest.fixture(scope="module")
def light(diffusers_flux2_folder):
    return ReferenceConditioner()


def test_too_many_references(light):
    with pytest.raises(RequestError, match=r"conditioning\.reference\.images: 11 reference images.*at most 10"):
        light.input_images({"images": [_image(64, 64, i) for i in range(11)]})
    with pytest.raises(RequestError, match="at most 3"):
        ReferenceConditioner(max_references=3).input_images({"images": [_image(64, 64, i) for i in range(4)]})


def test_not_an_image(light, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    with pytest.raises(RequestError, match=r"images\[1\].*notes.png: not a readable image"):
        light.input_images({"images": [_image(64, 64, 0), text]})
    with pytest.raises(RequestError, match=r"images\[0\].*no such file"):
        light.input_images({"images": [tmp_path / "missing.png"]})
    with pytest.raises(RequestError, match=r"images\[0\].*must be an image file path or a PIL image, got int"):
        light.input_images({"images": [3]})
    with pytest.raises(RequestError, match=r"conditioning\.reference\.image.*unknown input"):
        light.input_images({"image": [text]})


@pytest.mark.parametrize("size,message", [((1, 1), "1×1; both sides must be at least 64"),
                                          ((20000, 20), "20000×20; both sides must be at least 64"),
                                          ((1000, 100), "1000×100; the aspect ratio must be at most 8:1")])
def test_degenerate_sizes(light, size, message):
    with pytest.raises(RequestError, match=message):
        light.input_images({"images": [Image.new("RGB", size)]})


def test_large_reference_is_resized_and_logged(light, caplog):
    with caplog.at_level("INFO", logger="fluxframe.conditioning.reference"):
        (image,) = light.input_images({"images": [Image.new("RGB", (3000, 1500))]})
    assert image.size == (1440, 720) and image.mode == "RGB"  # 1448×724 under the cap, cropped to /16
    assert "resized to 1448×724" in caplog.text


def test_bad_requests_through_the_pipeline(pipelines, tmp_path):
    ours, _ = pipelines
    text = tmp_path / "x.txt"
    text.write_text("no")
    for images in ([text], [Image.new("RGB", (1, 1))], [_image(64, 64, i) for i in range(11)]):
        with pytest.raises(RequestError, match="conditioning.reference"):
            ours.generate(api.GenerationRequest(prompt="p", seed=1, conditioning={"reference": {"images": images}}),
                          write=False)


def test_bad_option_is_a_config_error(diffusers_flux2_folder, host):
    from fluxframe.errors import ConfigError

    config = api.parse_config({**_config(diffusers_flux2_folder).model_dump(include={"model", "sampler"}),
                               "conditioners": [{"name": "reference", "max_references": 11}]})
    with pytest.raises(ConfigError, match="conditioners.0.*max_references"):
        api.check_config(config, host=host)
