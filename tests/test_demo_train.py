"""The demo's training code, end to end on a tiny config: it writes a diffusers-layout folder that fluxframe then
loads and runs through its ordinary API -- the same path as a real FLUX.2 klein base checkpoint, nothing
demo-specific."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

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


def test_padding_weighted_attention_stands_for_all_the_padding():
    """Phase 1 trains on the prompt plus a sample of the padding positions, each sampled key's logits raised by
    log(padding / sampled). Where every padding position is the same token at the same position, that is exact:
    the DiT's output equals its output over all 512 positions; without the weights it is not (measured here:
    1.0e-7 against 1.7e-2 relative error; 1.9e-7 against 2.6e-2 at the demo model's size)."""
    import math

    import torch

    from fluxframe.demo.train import padding_bias
    from fluxframe.plugins.flux2 import transformer as dit
    from fluxframe.plugins.flux2.family import image_ids, text_ids

    config = dit.TransformerConfig(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                   joint_attention_dim=24, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    torch.manual_seed(0)
    model = dit.Flux2Transformer(config).eval()
    prompt, sampled, total = 7, 4, 512
    x, sigma = torch.randn(2, 16, config.in_channels), torch.rand(2)
    text = torch.cat([torch.randn(2, prompt, 24), torch.randn(2, 1, 24).expand(2, total - prompt, 24)], 1)
    ids = text_ids(total)
    ids[prompt:, 3] = prompt  # one padding token, repeated at one position
    keep = torch.arange(prompt + sampled)
    bias = torch.zeros(len(keep) + 16)
    bias[prompt:len(keep)] = math.log((total - prompt) / sampled)
    assert torch.equal(padding_bias(prompt, sampled, 16), bias)
    with torch.no_grad():
        full = model(x, image_ids(4, 4), text, ids, sigma)
        weighted = model(x, image_ids(4, 4), text[:, keep], ids[keep], sigma, attn_bias=bias)
        unweighted = model(x, image_ids(4, 4), text[:, keep], ids[keep], sigma)
    rel = lambda a: float((a - full).norm() / full.norm())  # noqa: E731
    print(f"\nweighted {rel(weighted):.1e}, unweighted {rel(unweighted):.1e}")
    assert rel(weighted) < 1e-5 < 1e-3 < rel(unweighted), (rel(weighted), rel(unweighted))


def test_low_noise_emphasis_replaces_about_the_fraction_asked_and_only_with_low_sigmas():
    import torch

    from fluxframe.demo.train import emphasise_low_noise

    sigma = torch.full((20000,), 0.9)
    out = emphasise_low_noise(sigma, 0.5, 0.6, torch.Generator().manual_seed(0))
    replaced = out != 0.9
    assert 0.48 < replaced.float().mean() < 0.52
    assert out[replaced].min() >= 1e-3 and out[replaced].max() <= 0.6
    assert 0.28 < out[replaced].mean() < 0.32  # uniform on (0, 0.6]
    again = emphasise_low_noise(sigma, 0.5, 0.6, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(emphasise_low_noise(sigma, 0.0, 0.6, torch.Generator().manual_seed(0)), sigma)


def test_the_low_noise_emphasis_runs_only_in_the_last_share_of_the_transformer_training(tmp_path, monkeypatch):
    from fluxframe.demo import train as train_module

    calls = []
    plain = train_module.emphasise_low_noise

    def recording(sigma, fraction, high, generator):
        calls.append((len(sigma), fraction, high))
        return plain(sigma, fraction, high, generator)

    monkeypatch.setattr(train_module, "emphasise_low_noise", recording)
    cfg = replace(TrainConfig(**TINY), dit_steps=(3, 1), low_noise_share=0.5, low_noise_fraction=0.25)
    train(tmp_path / "model", seed=1, work=tmp_path / "work", config=cfg, threads=None)
    # steps at progress 0, 1/4, 2/4, 3/4: the last two are in the final half
    assert calls == [(TINY["dit_batch"], 0.25, 0.6)] * 2


def test_edge_weight_marks_the_pixels_near_a_colour_edge_and_nothing_else():
    import torch

    from fluxframe.demo.train import edge_weight

    x = torch.full((2, 3, 32, 32), -0.5)
    x[0, :, 10:20, 12:22] = torch.tensor([0.8, -1.0, 0.2]).view(3, 1, 1)  # a flat rectangle on a flat background
    w = edge_weight(x, 5.0)
    assert w.shape == (2, 1, 32, 32) and set(w.unique().tolist()) == {1.0, 5.0}
    assert torch.all(w[1] == 1.0)  # a flat image has no edge
    near = torch.zeros(32, 32, dtype=torch.bool)
    near[7:23, 9:25] = True  # within three pixels of the rectangle's border (two, plus the blur's reach)
    near[13:17, 15:19] = False  # the rectangle's middle is flat
    assert torch.all(w[0, 0][near.logical_not()] == 1.0)
    assert torch.all(w[0, 0, 9:11, 11:23] == 5.0) and torch.all(w[0, 0, 19:21, 11:23] == 5.0)  # top, bottom rims
    assert torch.all(w[0, 0, 15, 15:19] == 1.0)
    assert torch.equal(edge_weight(x, 1.0), torch.ones_like(w))


def test_text_encoder_residual_scale_shrinks_the_branches_and_the_interaction_between_words(tmp_path):
    """Only the attention and MLP output projections are scaled, and the captions' embeddings become more nearly a
    sum of their words': the part of E(s,c,p) - E(s,c,p') - E(s,c',p) + E(s,c',p') left over shrinks."""
    import torch
    from safetensors.torch import load_file

    from fluxframe.demo.train import build_text_encoder, encode_captions

    captions = [f"a large {c} {s} {p}, on a white background" for s in ("circle", "square")
                for c in ("red", "blue") for p in ("on the left", "at the top")]
    weights, leftover = {}, {}
    for scale in (1.0, 0.1):
        stage = tmp_path / str(scale)
        build_text_encoder(stage, TrainConfig(**{**TINY, "text_residual_scale": scale}), seed=3)
        weights[scale] = load_file(stage / "text_encoder" / "model.safetensors")
        e = encode_captions(stage, stage, captions)[0][:, :40].flatten(1)
        r = [e[i] - e[i + 1] - e[i + 2] + e[i + 3] for i in (0, 4)]  # per shape: (red, blue) x (left, top)
        d = [e[i] - e[i + 3] for i in (0, 4)]
        leftover[scale] = sum(x.norm() for x in r) / sum(x.norm() for x in d)
    assert weights[1.0].keys() == weights[0.1].keys()
    scaled = [k for k in weights[1.0] if k.endswith(("o_proj.weight", "down_proj.weight"))]
    assert len(scaled) == 2 * TrainConfig(**TINY).text_layers
    for k, w in weights[1.0].items():
        torch.testing.assert_close(weights[0.1][k], w * 0.1 if k in scaled else w, rtol=0, atol=0)
    assert leftover[0.1] < 0.5 * leftover[1.0], leftover  # measured 0.28 -> 0.03 (seed 3)


def test_a_save_that_fails_midway_leaves_the_previous_stage_file_whole(tmp_path, monkeypatch):
    """Resuming depends on the work folder's files: a stage is saved under a temporary name and renamed, so a run
    stopped while saving leaves the last complete save (and no stray temporary file)."""
    import torch

    from fluxframe.demo import train as train_module
    from fluxframe.errors import CheckpointError

    path = tmp_path / "dit.pt"
    model = torch.nn.Linear(3, 2)
    train_module._save_stage(path, {"model": model}, {"step": 7})
    before = path.read_bytes()

    def torn(obj, name):  # writes part of the file, then fails as a full disk or a kill would
        with open(name, "wb") as fh:
            fh.write(before[: len(before) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", torn)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(CheckpointError, match="No space left on device") as err:
        train_module._save_stage(path, {"model": model}, {"step": 8})
    assert str(path) in str(err.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["dit.pt"]
    fresh = torch.nn.Linear(3, 2)
    state = train_module._resume_stage(path, {"model": fresh}, {}, "transformer")
    assert state == {"step": 7} and not torch.equal(fresh.weight, model.weight)
