"""Loading a FLUX.2 folder: sharded weights, and every broken-checkpoint case surfacing as a CheckpointError
that names the file and key, through the same path a user takes (api.load)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fluxframe import api
from fluxframe.core.checkpoint import SafetensorsCheckpoint, save_sharded
from fluxframe.errors import CheckpointError


def _config(folder):
    return api.parse_config({"model": {"path": str(folder), "dtype": "float32", "device": "cpu"},
                             "sampler": {"steps": 2, "width": 32, "height": 32}})


@pytest.fixture
def folder(tmp_path, diffusers_flux2_folder):
    """A private copy of the diffusers-made checkpoint, free to break."""
    copy = tmp_path / "ckpt"
    shutil.copytree(diffusers_flux2_folder, copy)
    return copy


def _rewrite_transformer(folder, change=lambda state: None, **save_options):
    """Read the transformer's weights, change them, and write them back (sharded if asked)."""
    sub = folder / "transformer"
    with SafetensorsCheckpoint.open(sub) as ckpt:
        state = {k: ckpt.get(k).clone() for k in ckpt.keys()}
    change(state)
    for f in sub.glob("*.safetensors*"):
        f.unlink()
    return save_sharded(state, sub, **save_options)


def _generate(folder, host):
    return api.load(_config(folder), host=host).generate(api.GenerationRequest(prompt="p", seed=3), write=False)


def test_sharded_transformer_gives_the_same_image(folder, host, diffusers_flux2_folder):
    files = _rewrite_transformer(folder, max_shard_bytes=60_000)
    assert len(files) > 2 and (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    sharded = _generate(folder, host)
    single = _generate(diffusers_flux2_folder, host)
    assert torch.equal(sharded.latents, single.latents)


def test_key_missing_from_the_checkpoint(folder, host):
    _rewrite_transformer(folder, lambda s: s.pop("proj_out.weight"))
    with pytest.raises(CheckpointError) as info:
        api.load(_config(folder), host=host)
    assert "transformer" in str(info.value) and "proj_out.weight" in str(info.value)


def test_extra_key_in_the_checkpoint(folder, host):
    _rewrite_transformer(folder, lambda s: s.update({"lora_A.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match="lora_A.weight"):
        api.load(_config(folder), host=host)


def test_shape_mismatch(folder, host):
    _rewrite_transformer(folder, lambda s: s.update({"x_embedder.weight": s["x_embedder.weight"][:, :64]}))
    with pytest.raises(CheckpointError) as info:
        api.load(_config(folder), host=host)
    assert "x_embedder.weight" in str(info.value) and "shape" in str(info.value)


def test_truncated_weights(folder, host):
    (weights,) = (folder / "vae").glob("*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        api.load(_config(folder), host=host)
    assert str(weights) in str(info.value)


def test_missing_shard(folder, host):
    files = _rewrite_transformer(folder, max_shard_bytes=60_000)
    files[1].unlink()
    with pytest.raises(CheckpointError) as info:
        api.load(_config(folder), host=host)
    assert files[1].name in str(info.value)


def test_pickled_checkpoint_is_refused(folder, host):
    for f in (folder / "vae").glob("*.safetensors"):
        f.unlink()
    torch.save({"w": torch.zeros(1)}, folder / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.bin.*pickle"):
        api.load(_config(folder), host=host)


def test_not_a_flux2_folder(folder, host):
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(CheckpointError, match="model_index.json.*StableDiffusionPipeline"):
        api.load(_config(folder), host=host)
    (folder / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="model_index.json.*missing"):
        api.load(_config(folder), host=host)


def test_path_that_does_not_exist(tmp_path, host):
    with pytest.raises(CheckpointError, match="does not exist"):
        api.load(_config(tmp_path / "nope"), host=host)


def test_transformer_config_that_is_not_flux2(folder, host):
    cfg = folder / "transformer" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "sample_size": 64}))
    with pytest.raises(CheckpointError) as info:
        api.load(_config(folder), host=host)
    assert str(cfg) in str(info.value) and "sample_size" in str(info.value)
