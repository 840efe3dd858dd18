"""Flex.2's 196-channel model input, tensor by tensor, for every combination of the inpaint and control
conditioners, against an oracle built from diffusers' own AutoencoderKL and latent packing; control strength
and stop; seed independence of the noise; and the errors bad input gets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flex2_helpers import build_flux_folder, rel_err
from PIL import Image

from fluxframe import api
from fluxframe.errors import ConfigError, PluginError, RequestError

W, H = 64, 48  # the tiny VAE downsamples 2×: latents 32×24, tokens 16×12


@pytest.fixture(scope="module")
def flex2_folder(tmp_path_factory):
    return build_flux_folder(tmp_path_factory.mktemp("flex2"), in_channels=196, class_name="Flex2Pipeline")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    mask = np.zeros((96, 128), dtype=np.uint8)  # twice the size, same aspect: resized
    mask[20:70, 30:100] = 255
    control = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    paths = {"image": root / "image.png", "mask": root / "mask.png", "control": root / "control.png"}
    image.save(paths["image"])
    Image.fromarray(mask, "L").save(paths["mask"])
    control.save(paths["control"])
    return paths


def _config(folder, conditioners=()):
    return api.parse_config({
        "model": {"family": "flex2", "path": str(folder), "dtype": "float32", "device": "cpu"},
        "sampler": {"steps": 4, "guidance": 3.5, "width": W, "height": H},
        "conditioners": list(conditioners),
    })


@pytest.fixture(scope="module")
def pipeline(flex2_folder):
    # module-scoped, so not the function-scoped `host`: the installed built-ins only (allow = [] admits no others)
    return api.load(_config(flex2_folder), host=api.PluginHost(allow=[]))


def run(pipeline, conditioning, seed=1, steps=4):
    """The transformer's input at every step."""
    model = pipeline.stages.model
    calls = []
    original = model.transformer.forward

    def spy(img, *args, **kwargs):
        calls.append(img.clone())
        return original(img, *args, **kwargs)

    model.transformer.forward = spy
    try:
        result = pipeline.generate(api.GenerationRequest(prompt="a red circle", seed=seed, steps=steps,
                                                         conditioning=conditioning), write=False)
    finally:
        del model.transformer.forward
    return calls, result


@pytest.fixture(scope="module")
def oracle(flex2_folder, pictures):
    """What the inpaint, mask and control channels must hold, computed with diffusers' parts."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, FluxPipeline

    vae = AutoencoderKL.from_pretrained(flex2_folder / "vae").eval()

    def latent(path):
        x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
        with torch.no_grad():
            z = vae.encode(x.permute(2, 0, 1)[None]).latent_dist.mode()
        return (z - vae.config.shift_factor) * vae.config.scaling_factor

    def pack(z):
        return FluxPipeline._pack_latents(z, 1, z.shape[1], z.shape[2], z.shape[3])

    m = torch.from_numpy(np.asarray(Image.open(pictures["mask"]), dtype=np.float32) / 255.0)[None, None]
    m = F.interpolate(m, size=(H // 2, W // 2), mode="bilinear", align_corners=False)
    return {"inpaint": pack(latent(pictures["image"]) * (1 - m)), "mask": pack(m),
            "control": pack(latent(pictures["control"])), "noise": pipeline_noise(flex2_folder)}


def pipeline_noise(folder):
    from diffusers import FluxPipeline

    z = torch.randn((1, 16, H // 2, W // 2), generator=torch.Generator("cpu").manual_seed(1))
    return FluxPipeline._pack_latents(z, 1, 16, H // 2, W // 2)


def split(x):
    return {"noise": x[..., :64], "inpaint": x[..., 64:128], "mask": x[..., 128:132], "control": x[..., 132:]}


def expect(x, oracle, *, inpaint: bool, control: float):
    parts = split(x)
    assert x.shape == (1, (H // 4) * (W // 4), 196)
    if inpaint:
        assert rel_err(parts["inpaint"], oracle["inpaint"]) < 1e-5
        assert rel_err(parts["mask"], oracle["mask"]) < 1e-6
    else:
        assert torch.equal(parts["inpaint"], torch.zeros_like(parts["inpaint"]))
        assert torch.equal(parts["mask"], torch.ones_like(parts["mask"]))
    if control:
        assert rel_err(parts["control"], control * oracle["control"]) < 1e-5
    else:
        assert torch.equal(parts["control"], torch.zeros_like(parts["control"]))


CASES = {
    "none": (False, 0.0),
    "inpaint": (True, 0.0),
    "control": (False, 1.0),
    "both": (True, 0.7),
}


@pytest.mark.parametrize("case", CASES)
def test_model_input_tensor_by_tensor(pipeline, pictures, oracle, case):
    inpaint, strength = CASES[case]
    conditioning = {}
    if inpaint:
        conditioning["inpaint"] = {"image": pictures["image"], "mask": pictures["mask"]}
    if strength:
        conditioning["control"] = {"image": pictures["control"], "strength": strength, "stop": 0.5}
    calls, _ = run(pipeline, conditioning)
    assert len(calls) == 4
    # the first step sees the seed's noise, drawn exactly as diffusers' FluxPipeline draws it
    assert torch.equal(split(calls[0])["noise"], oracle["noise"])
    for step, x in enumerate(calls):
        # control stop 0.5 of 4 steps: steps 0 and 1 see the control, steps 2 and 3 see zeros
        expect(x, oracle, inpaint=inpaint, control=strength if step < 2 else 0.0)


def test_strength_zero_is_exactly_no_control(pipeline, pictures):
    plain, _ = run(pipeline, {})
    zero, _ = run(pipeline, {"control": {"image": pictures["control"], "strength": 0}})
    assert all(torch.equal(a, b) for a, b in zip(plain, zero, strict=True))


@pytest.mark.parametrize("stop,steps_with_control", [(0.0, []), (1.0, [0, 1, 2, 3]), (0.3, [0]), (0.74, [0, 1])])
def test_control_stop(pipeline, pictures, stop, steps_with_control):
    calls, _ = run(pipeline, {"control": {"image": pictures["control"], "stop": stop}})
    on = [i for i, x in enumerate(calls) if split(x)["control"].abs().sum() > 0]
    assert on == steps_with_control


def test_noise_does_not_depend_on_conditioning(pipeline, pictures):
    """Same seed, same initial noise, whatever is given — even when the VAE samples its posterior."""
    from fluxframe.conditioning.control import ControlConditioner
    from fluxframe.conditioning.inpaint import InpaintConditioner

    sampled = api.Pipeline(pipeline.config, dataclasses.replace(pipeline.stages, conditioners={
        "inpaint": InpaintConditioner(posterior="sample"), "control": ControlConditioner(posterior="sample")}),
        pipeline.host)
    both = {"inpaint": {"image": pictures["image"], "mask": pictures["mask"]},
            "control": {"image": pictures["control"]}}
    first = [split(run(sampled, c, seed=9, steps=1)[0][0])["noise"] for c in ({}, {"control": both["control"]}, both)]
    assert torch.equal(first[0], first[1]) and torch.equal(first[0], first[2])
    a, b = run(sampled, both, seed=9, steps=1)[0][0], run(sampled, both, seed=9, steps=1)[0][0]
    assert torch.equal(a, b)  # sampling is seeded: the run repeats exactly
    mode = run(pipeline, both, seed=9, steps=1)[0][0]
    assert not torch.equal(split(a)["inpaint"], split(mode)["inpaint"])  # it did sample
    assert torch.equal(split(a)["noise"], split(mode)["noise"])


def test_inpaint_changes_only_the_masked_region_of_the_input(pipeline, pictures):
    calls, result = run(pipeline, {"inpaint": {"image": pictures["image"], "mask": pictures["mask"]}}, steps=1)
    mask = split(calls[0])["mask"]
    assert mask.min() >= 0 and mask.max() <= 1 and 0 < mask.mean() < 1
    kept = split(calls[0])["inpaint"][mask.amax(-1) == 0]
    assert kept.abs().sum() > 0  # unmasked tokens carry the image
    assert torch.equal(split(calls[0])["inpaint"][mask.amin(-1) == 1], torch.zeros(0, 64).new_zeros(
        int((mask.amin(-1) == 1).sum()), 64))


# -- bad input ---------------------------------------------------------------------------------------------------


def test_mask_of_another_aspect_ratio(pipeline, pictures, tmp_path):
    Image.new("L", (50, 50), 255).save(tmp_path / "square.png")
    with pytest.raises(RequestError, match="same aspect ratio") as err:
        run(pipeline, {"inpaint": {"image": pictures["image"], "mask": tmp_path / "square.png"}}, steps=1)
    assert err.value.field == "conditioning.inpaint.mask"


def test_colour_mask_is_converted_and_said_so(pipeline, pictures, tmp_path):
    Image.open(pictures["mask"]).convert("RGB").save(tmp_path / "rgb.png")
    grey, _ = run(pipeline, {"inpaint": {"image": pictures["image"], "mask": pictures["mask"]}}, steps=1)
    rgb, result = run(pipeline, {"inpaint": {"image": pictures["image"], "mask": tmp_path / "rgb.png"}}, steps=1)
    assert torch.equal(grey[0], rgb[0])
    assert any("conditioning.inpaint.mask" in n and "RGB mask was converted" in n for n in result.notes)


def test_control_image_of_another_size_is_resized(pipeline, pictures, tmp_path):
    Image.open(pictures["control"]).resize((128, 128)).save(tmp_path / "big.png")
    _, result = run(pipeline, {"control": {"image": tmp_path / "big.png"}}, steps=1)
    assert any("128×128 resized to the output size 64×48 (aspect ratio changed)" in n for n in result.notes)


@pytest.mark.parametrize("value", [-0.1, 1.5, "half"])
def test_stop_outside_0_1(pipeline, pictures, flex2_folder, host, value):
    with pytest.raises(RequestError, match="control: stop must be") as err:
        run(pipeline, {"control": {"image": pictures["control"], "stop": value}}, steps=1)
    assert err.value.field == "conditioning.control.stop"
    with pytest.raises(ConfigError, match="control: stop must be") as err:
        api.check_config(_config(flex2_folder, [{"name": "control", "stop": value}]), host=host)
    assert err.value.key == "conditioners.0.stop"


def test_half_an_inpaint_and_unknown_inputs(pipeline, pictures):
    with pytest.raises(RequestError, match="the image was given without the mask"):
        run(pipeline, {"inpaint": {"image": pictures["image"]}}, steps=1)
    with pytest.raises(RequestError, match="unknown input 'strenght'") as err:
        run(pipeline, {"control": {"image": pictures["control"], "strenght": 1}}, steps=1)
    assert err.value.field == "conditioning.control.strenght"
    with pytest.raises(RequestError, match="kind must be one of map, line, depth, pose"):
        run(pipeline, {"control": {"image": pictures["control"], "kind": "canny"}}, steps=1)
    with pytest.raises(RequestError, match="depth_model") as err:
        run(pipeline, {"control": {"image": pictures["control"], "kind": "depth"}}, steps=1)
    assert err.value.field == "conditioning.control.depth_model"


def test_unregistered_conditioner(pipeline, flex2_folder, host):
    with pytest.raises(PluginError, match="no conditioner named 'sketch' is registered.*control.*inpaint"):
        run(pipeline, {"sketch": {"image": "x.png"}}, steps=1)
    with pytest.raises(PluginError, match="'sketch'"):
        api.check_config(_config(flex2_folder, [{"name": "sketch"}]), host=host)


def test_flex2_conditioners_refused_on_flux2(diffusers_flux2_folder, host):
    config = api.parse_config({"model": {"family": "flux2", "path": str(diffusers_flux2_folder), "dtype": "float32",
                                         "device": "cpu"}, "conditioners": [{"name": "control"}]})
    with pytest.raises(ConfigError, match="conditioner 'control' works with model families flex2, not with 'flux2'") \
            as err:
        api.check_config(config, host=host)
    assert err.value.key == "conditioners.0"


def test_plain_flux1_refuses_inpaint(tmp_path_factory, pictures, host):
    folder = build_flux_folder(tmp_path_factory.mktemp("flux1-cond"), in_channels=64)
    pipe = api.load(_config(folder), host=host)
    with pytest.raises(RequestError, match="inpaint conditioner fills the inpaint, mask channels, which this flex2 "
                                           "checkpoint does not take \\(its channel groups: none\\)") as err:
        run(pipe, {"inpaint": {"image": pictures["image"], "mask": pictures["mask"]}}, steps=1)
    assert err.value.field == "conditioning.inpaint"
    from fluxframe.core.types import Conditioning

    # the family refuses channels set behind the conditioners' back too
    with pytest.raises(RequestError, match="plain Flux.1 model \\(64 input channels\\): it cannot use mask"):
        pipe.stages.model.model_input(torch.zeros(1, 192, 64), Conditioning(channels={"mask": torch.ones(1, 192, 4)}))
