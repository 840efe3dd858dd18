"""LoRAs from the config (``[[lora]]``) and the command line (``--lora PATH[:WEIGHT]``), end to end on the tiny
preset: they change the image, weight 0 changes nothing, the audit log records them, and bad entries are
errors naming the entry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lora_helpers import write_peft_lora
from safetensors.torch import save_file

from fluxframe import api
from fluxframe.cli import main
from fluxframe.errors import CheckpointError, ConfigError

TINY = {"model": {"preset": "tiny", "dtype": "float32", "device": "cpu"},
        "sampler": {"steps": 2, "width": 64, "height": 32, "seed": 4}}
LAYERS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_k_proj",
          "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.1.attn.to_out"]


@pytest.fixture(scope="module")
def base():
    """The tiny pipeline without LoRA and its image."""
    pipeline = api.load(api.parse_config(TINY))
    return pipeline, np.asarray(pipeline.generate(api.GenerationRequest(prompt="a cat"), write=False).image)


@pytest.fixture(scope="module")
def lora_file(base, tmp_path_factory):
    """A PEFT-format LoRA (diffusers names) for the tiny preset's DiT."""
    return write_peft_lora(base[0].stages.model.transformer, LAYERS,
                           tmp_path_factory.mktemp("lora") / "style.safetensors")


def _image(data, **request):
    pipeline = api.load(api.parse_config(data))
    return pipeline, np.asarray(pipeline.generate(api.GenerationRequest(prompt="a cat", **request),
                                                  write=False).image)


def test_config_lora_changes_the_image_and_weight_zero_does_not(base, lora_file):
    _, plain = base
    pipeline, styled = _image({**TINY, "lora": [{"path": str(lora_file)}]})
    assert np.abs(styled.astype(int) - plain).mean() > 5
    assert pipeline.stages.model.describe()["loras"][0]["layers"] == len(LAYERS)
    _, zero = _image({**TINY, "lora": [{"path": str(lora_file), "weight": 0}]})
    assert np.array_equal(zero, plain)


def test_remove_restores_the_pipeline_exactly(base, lora_file):
    pipeline, plain = base
    pipeline.stages.model.apply_loras([{"path": lora_file, "weight": 0.7}])
    styled = np.asarray(pipeline.generate(api.GenerationRequest(prompt="a cat"), write=False).image)
    pipeline.stages.model.apply_loras([])
    again = np.asarray(pipeline.generate(api.GenerationRequest(prompt="a cat"), write=False).image)
    assert not np.array_equal(styled, plain) and np.array_equal(again, plain)


def test_cli_lora_flag_equals_the_config_entry(tmp_path, lora_file, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text('[model]\npreset = "tiny"\ndtype = "float32"\ndevice = "cpu"\n'
                      '[sampler]\nsteps = 2\nwidth = 64\nheight = 32\nseed = 4\n'
                      f'[safety]\naudit_log = "{tmp_path / "audit.jsonl"}"\nrequire = []\n')
    out = tmp_path / "cli.png"
    assert main(["generate", "--config", str(config), "--prompt", "a cat", "--lora", f"{lora_file}:0.5",
                 "--output", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    _, expected = _image({**TINY, "lora": [{"path": str(lora_file), "weight": 0.5}]})
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out)), expected)
    record = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert record["loras"] == [{"file": lora_file.name, "sha256": record["loras"][0]["sha256"], "weight": 0.5}]
    assert record["loras"][0]["sha256"].startswith("sha256:")


@pytest.mark.parametrize("entry, words", [
    ({"path": "missing.safetensors"}, "lora.0.path"),
    ({"path": "x.safetensors", "weight": "strong"}, "lora.0.weight"),
    ({"path": "x.safetensors", "weight": float("inf")}, "finite"),
    ({"path": "x.safetensors", "mode": "merge"}, "lora.0.mode"),
    ({"path": "x.safetensors", "scale": 1}, "lora.0.scale"),
])
def test_bad_entries_name_the_entry(tmp_path, entry, words):
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        config = api.parse_config({**TINY, "lora": [entry]}, base_dir=tmp_path)
        api.check_config(config)


def test_a_lora_that_does_not_fit_stops_the_load(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 3072),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 2)}, str(path))
    with pytest.raises(CheckpointError, match="does not fit layer 'double_blocks_0_img_attn_qkv'"):
        api.load(api.parse_config({**TINY, "lora": [{"path": str(path)}]}))


def test_cli_bad_lora_weight_is_a_usage_error(tmp_path, lora_file, capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--config", "c.toml", "--prompt", "x", "--lora", f"{lora_file}:strong"])
    assert info.value.code == 2
    assert "the weight 'strong' is not a number" in capsys.readouterr().err
