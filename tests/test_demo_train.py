"""The demo's training code, end to end on a tiny config: it writes a diffusers-layout folder that fluxframe then
loads and runs through its ordinary API -- the same path as a real FLUX.2 klein base checkpoint, nothing demo-specific."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np

from fluxframe import api
from fluxframe.demo import shapes
from fluxframe.demo.train import TINY, TrainConfig, train


def test_tiny_training_run_writes_a_checkpoint_fluxframe_loads(tmp_path):
    out = tmp_path / "shapes-tiny"
    cfg = replace(TrainConfig(), **{**TINY, "max_scenes": 8})
    train(out, seed=3, work=tmp_path / "work", config=cfg, threads=None)

    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is False
    assert {p.name for p in out.iterdir()} >= {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"}
    record = json.loads((out / "training.json").read_text())
    assert record["seed"] == 3 and record["dataset_version"] == shapes.DATASET_VERSION
    assert record["status"] == "complete" and record["stats"]["transformer"]["step"] == sum(TINY["dit_steps"])
    assert not list(tmp_path.glob(".shapes-tiny.*"))  # the folder was built beside and renamed into place

    config = api.parse_config({"model": {"path": str(out), "dtype": "float32", "device": "cpu"},
                               "sampler": {"width": 64, "height": 64, "steps": 2, "guidance": 3.0}})
    pipeline = api.load(config)
    model = pipeline.stages.model
    assert model.true_cfg(3.0) and model.limits.pixel_multiple == 32  # klein base: true CFG; 5-level autoencoder
    result = pipeline.generate(api.GenerationRequest(prompt="a small red star at the top, on a blue background",
                                                     seed=0), write=False)
    pixels = np.asarray(result.image)
    assert pixels.shape == (64, 64, 3) and result.steps == 2 and result.guidance == 3.0

    # resumable: running again with the state in place redoes no stage
    train(out, seed=3, work=tmp_path / "work", config=cfg, threads=None)
    assert json.loads((out / "training.json").read_text())["stats"]["transformer"]["step"] == sum(TINY["dit_steps"])
