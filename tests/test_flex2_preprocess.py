"""Control preprocessors: OpenCV line maps from a photo, and depth/pose estimators as ONNX files from the config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flex2_helpers import build_flux_folder, write_reduce_mean_onnx
from PIL import Image

from fluxframe import api
from fluxframe.conditioning.preprocess import PREPROCESSORS, OnnxEstimator, line
from fluxframe.core.images import from_pil
from fluxframe.errors import ConfigError

W, H = 64, 48


def photo():
    array = np.zeros((H, W, 3), dtype=np.uint8)
    array[10:30, 20:50] = (200, 180, 40)
    return Image.fromarray(array)


def test_line_map_is_canny_white_on_black():
    import cv2

    out = line()(photo())
    assert out.mode == "RGB" and out.size == (W, H)
    edges = np.asarray(out)[..., 0]
    expected = cv2.Canny(cv2.cvtColor(np.asarray(photo()), cv2.COLOR_RGB2GRAY), 100, 200)
    assert np.array_equal(edges, expected)
    assert edges[10, 20:50].max() == 255 and edges[20, 30] == 0 and edges[40, 5] == 0
    with pytest.raises(ValueError, match="line_low"):
        line(300, 100)


def test_onnx_estimator_follows_its_contract(tmp_path):
    write_reduce_mean_onnx(tmp_path / "depth.onnx")
    estimator = OnnxEstimator(tmp_path / "depth.onnx", kind="depth", size=32, mean=(0, 0, 0), std=(1, 1, 1))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8))
    out = estimator(image)
    assert out.mode == "RGB" and out.size == image.size
    x = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32).mean(-1) / 255.0
    x = (x - x.min()) / (x.max() - x.min())
    expected = Image.fromarray((x * 255 + 0.5).clip(0, 255).astype(np.uint8))
    expected = expected.resize(image.size, Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(out)[..., 0], np.asarray(expected))
    # a fixed input size in the model is honoured
    write_reduce_mean_onnx(tmp_path / "fixed.onnx", input_shape=(1, 3, 24, 40), output_shape=(1, 1, 24, 40))
    assert OnnxEstimator(tmp_path / "fixed.onnx", kind="pose")(image).size == image.size


def test_depth_from_config_feeds_the_control_channels(tmp_path_factory, host):
    folder = build_flux_folder(tmp_path_factory.mktemp("flex2-depth"), in_channels=196)
    root = tmp_path_factory.mktemp("depth")
    write_reduce_mean_onnx(root / "depth.onnx")
    photo().save(root / "photo.png")
    config = api.parse_config({
        "model": {"family": "flex2", "path": str(folder), "dtype": "float32", "device": "cpu"},
        "sampler": {"steps": 1, "width": W, "height": H},
        "conditioners": [{"name": "control", "depth_model": str(root / "depth.onnx"), "strength": 0.5}],
    })
    pipeline = api.load(config, host=host)
    model = pipeline.stages.model
    seen = []
    original = model.transformer.forward
    model.transformer.forward = lambda img, *a, **k: (seen.append(img.clone()), original(img, *a, **k))[1]
    try:
        pipeline.generate(api.GenerationRequest(prompt="x", seed=0, conditioning={
            "control": {"image": root / "photo.png", "kind": "depth"}}), write=False)
    finally:
        del model.transformer.forward
    from fluxframe.plugins.flex2.family import pack

    depth = OnnxEstimator(root / "depth.onnx", kind="depth")(photo())
    expected = pack(model.encode_latents(from_pil(depth))) * 0.5
    assert torch.allclose(seen[0][..., 132:], expected, atol=1e-6)


def test_missing_estimator_file_names_the_option(tmp_path, host):
    """Relative model paths resolve against the config file's folder, as every path in a config does."""
    from fluxframe.core.pipeline import build_conditioners

    (tmp_path / "deploy.toml").write_text(f'[model]\nfamily = "flex2"\npath = "{tmp_path}"\n'
                                          '[[conditioners]]\nname = "control"\npose_model = "nowhere.onnx"\n')
    config = api.load_config(tmp_path / "deploy.toml")
    with pytest.raises(ConfigError, match=f"control: pose_model '{tmp_path / 'nowhere.onnx'}' does not exist") as err:
        build_conditioners(config, host)
    assert err.value.key == "conditioners.0.pose_model"
    (tmp_path / "nowhere.onnx").write_bytes(b"")  # found beside the config, whatever the working directory
    assert build_conditioners(config, host)["control"].models["pose"] == tmp_path / "nowhere.onnx"


def test_kinds():
    assert set(PREPROCESSORS) == {"map", "line", "depth", "pose"}
