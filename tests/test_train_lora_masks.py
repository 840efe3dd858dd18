"""``fluxframe train-lora --loss-masks``: each latent token's error weighted by its share of the item's mask (at
least ``--unmasked-weight``), the masks' hash in the record, bad masks refused by name; and ``fluxframe demo-data
--masks``, which writes the shape regions the outline LoRA's training weighs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from test_train_lora import KeywordPlugin, config, make_data, written

from fluxframe.demo import train_lora
from fluxframe.errors import TrainingError
from fluxframe.plugins.flux2.family import image_ids

OPTIONS = dict(rank=2, steps=3, lr=5e-3, batch_size=2, resolution=32, seed=5)


@pytest.fixture
def lora_host(host):
    host.add(KeywordPlugin(), name="keyword-plugin")
    return host


def masks(data, box=(0, 0, 16, 16), size=32, folder="masks"):  # the top-left quarter
    out = data / folder
    out.mkdir(exist_ok=True)
    for image in data.glob("*.png"):
        mask = Image.new("L", (size, size), 0)
        if box:
            mask.paste(255, box)
        mask.save(out / image.name)
    return out


def test_token_weights_are_the_masks_share_of_each_token_raised_to_the_floor():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 32))  # the top-left quarter
    mask.paste(128, (48, 48, 64, 64))  # a quarter of the bottom-right token's... all of it, at half grey
    weights = train_lora.token_weights(mask, 64, image_ids(4, 4), 0.1).reshape(4, 4)
    expected = torch.full((4, 4), 0.1)
    expected[:2, :2] = 1.0
    expected[3, 3] = 0.1 + 0.9 * 128 / 255
    assert torch.allclose(weights, expected, atol=1e-6)
    # a token half covered counts half; resized with its image (64 px mask, 32 px training resolution)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 8, 16))  # the left half of the first 16x16 token
    assert train_lora.token_weights(mask, 64, image_ids(4, 4), 0.0)[0] == pytest.approx(0.5, abs=1e-6)
    assert train_lora.token_weights(mask, 32, image_ids(2, 2), 0.0)[0] == pytest.approx(0.125, abs=0.02)


def test_masked_mse_is_a_weighted_mean_of_the_tokens_errors():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 6, 5, generator=gen), torch.randn(2, 6, 5, generator=gen)
    assert torch.equal(train_lora.masked_mse(pred, target, None), F.mse_loss(pred, target))
    assert torch.allclose(train_lora.masked_mse(pred, target, torch.ones(2, 6)), F.mse_loss(pred, target))
    chosen = torch.zeros(2, 6)
    chosen[0, 1] = chosen[1, 4] = 1.0  # only those two tokens count
    expected = ((pred[0, 1] - target[0, 1]).pow(2).mean() + (pred[1, 4] - target[1, 4]).pow(2).mean()) / 2
    assert torch.allclose(train_lora.masked_mse(pred, target, chosen), expected)
    assert torch.allclose(train_lora.masked_mse(pred, target, 3 * chosen), expected)  # the scale does not matter


def test_training_with_masks(diffusers_flux2_folder, lora_host, tmp_path):
    """White masks train what no masks train (to float tolerance); the corner masks weigh the loss otherwise (Adam's
    first steps follow the gradients' signs, so the files themselves differ little after 3 steps) and the record
    names the masks' hash and weight; the CLI passes the options through."""
    from fluxframe.cli import main

    data = make_data(tmp_path / "data", colours=("red", "blue"))
    cfg = config(diffusers_flux2_folder, tmp_path)
    files, losses = {}, {}
    for name, mask_dir in (("plain", None), ("white", masks(data, box=(0, 0, 32, 32), folder="white")),
                           ("corner", masks(data))):
        out = tmp_path / name / "style.safetensors"
        train_lora.train(cfg, data, out, host=lora_host, loss_masks=mask_dir, **OPTIONS)
        files[name] = load_file(out)
        losses[name] = np.array(json.loads((out.parent / "style.training.json").read_text())["losses"])
    plain, white, corner = files["plain"], files["white"], files["corner"]
    assert all(torch.allclose(plain[k], white[k], rtol=1e-4, atol=1e-6) for k in plain)
    assert np.allclose(losses["plain"], losses["white"], rtol=1e-4)
    assert np.abs(losses["corner"] / losses["plain"] - 1).max() > 0.01  # the same draws, another weighting
    assert not all(torch.equal(plain[k], corner[k]) for k in plain)
    record = json.loads((tmp_path / "corner" / "style.training.json").read_text())
    assert record["loss_masks"]["unmasked_weight"] == 0.1 and record["loss_masks"]["sha256"].startswith("sha256:")
    assert json.loads((tmp_path / "plain" / "style.training.json").read_text())["loss_masks"] is None
    assert record["loss_masks"] != json.loads((tmp_path / "white" / "style.training.json").read_text())["loss_masks"]

    toml = tmp_path / "deploy.toml"
    toml.write_text(f'[model]\nfamily = "flux2"\npath = "{diffusers_flux2_folder}"\ndtype = "float32"\n'
                    f'device = "cpu"\n\n[sampler]\nsteps = 2\nwidth = 32\nheight = 32\n')
    out = tmp_path / "cli" / "style.safetensors"
    assert main(["train-lora", "--config", str(toml), "--data", str(data), "--out", str(out), "--rank", "2",
                 "--steps", "1", "--resolution", "32", "--loss-masks", str(data / "masks"),
                 "--unmasked-weight", "0.25"], host=lora_host) == 0
    assert json.loads((out.parent / "style.training.json").read_text())["loss_masks"]["unmasked_weight"] == 0.25


@pytest.mark.parametrize("case", ["missing", "size", "huge", "unreadable", "not a folder", "weight", "all black"])
def test_bad_masks_are_one_line_naming_the_file_and_write_nothing(diffusers_flux2_folder, lora_host, tmp_path, case,
                                                                  monkeypatch):
    data = make_data(tmp_path / "data", colours=("red", "blue"))
    mask_dir, options, named = masks(data), {}, None
    if case == "missing":
        (mask_dir / "blue.png").unlink()
        named = "blue.png"
    elif case == "size":
        Image.new("L", (16, 16), 255).save(mask_dir / "red.png")
        named = str(mask_dir / "red.png")
    elif case == "huge":  # refused from its header, before it is decoded
        monkeypatch.setattr(train_lora, "MAX_IMAGE_PIXELS", 40 * 40)
        Image.new("L", (64, 64), 255).save(mask_dir / "red.png")
        named = f"{mask_dir / 'red.png'}: too large"
    elif case == "unreadable":
        (mask_dir / "red.png").write_bytes(b"not an image")
        named = str(mask_dir / "red.png")
    elif case == "not a folder":
        mask_dir, named = data / "red.png", "--loss-masks"
    elif case == "weight":
        options, named = {"unmasked_weight": 1.5}, "--unmasked-weight"
    else:
        Image.new("L", (32, 32), 0).save(mask_dir / "blue.png")
        options, named = {"unmasked_weight": 0.0}, "blue.png"
    out = tmp_path / "out" / "style.safetensors"
    out.parent.mkdir()
    with pytest.raises(TrainingError) as err:
        train_lora.train(config(diffusers_flux2_folder, tmp_path), data, out, host=lora_host, loss_masks=mask_dir,
                         rank=2, steps=2, resolution=32, **options)
    assert named in str(err.value) and "\n" not in str(err.value)
    assert written(out.parent) == []


def test_demo_data_masks_cover_each_shape_and_a_margin(tmp_path):
    from fluxframe.cli import main
    from fluxframe.demo import shapes

    out = tmp_path / "outline"
    assert main(["demo-data", "--out", str(out), "--count", "4", "--masks"]) == 0
    assert written(out / "masks") == ["0000.png", "0001.png", "0002.png", "0003.png"]
    scenes = shapes.outline_scenes(4, 0)
    for i, scene in enumerate(scenes):
        image = np.asarray(Image.open(out / f"{i:04d}.png").convert("RGB"), np.int16)
        mask = np.asarray(Image.open(out / "masks" / f"{i:04d}.png"))
        drawn = np.abs(image - np.array(shapes.COLOURS[scene.background])).sum(-1) > 30  # the stroke's pixels
        assert drawn.any() and (mask[drawn] == 255).all()  # every drawn pixel inside the mask
        filled = np.asarray(shapes.render(dataclasses.replace(scene, style="filled")).convert("RGB"), np.int16)
        inside = np.abs(filled - np.array(shapes.COLOURS[scene.background])).sum(-1) > 30
        assert (mask[inside] == 255).all()  # the hole too
        assert 1.0 < (mask > 0).sum() / inside.sum() < 4  # and a margin, not the whole picture
        assert (mask > 0).mean() < 0.25
        assert mask[0, 0] == 0
