"""The shipped style LoRA of the demo model (issue 27, part 5): models/shapes-v1-outline-lora/outline.safetensors,
trained by ``fluxframe train-lora`` on 192 outline-style scenes of training triples only, makes the demo model draw
held-out captions as outlines; without it the same captions and seeds come out filled. Graded by
``shapes.analyse`` (filled against hollow), two captions, fixed seeds. The full figures are bench/demo_outline_lora.py's
(docs/lora.md, "A style LoRA for the demo model")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from fluxframe import api
from fluxframe.demo import shapes

ROOT = Path(__file__).resolve().parents[1]
LORA = ROOT / "models" / "shapes-v1-outline-lora" / "outline.safetensors"
MODEL = ROOT / "models" / "shapes-v1"
# (held-out caption index in shapes.held_out_scenes(64), seed): bench/demo_outline_lora.py's seeds (3000 + index)
CASES = [(1, 3001), (11, 3011)]  # a large orange circle on the left; a large green square on the left


@pytest.fixture(scope="module")
def pipelines():
    def load(loras):
        return api.load(api.parse_config({
            "model": {"family": "flux2", "path": str(MODEL), "dtype": "float32"},
            "sampler": {"steps": 24, "guidance": 4.0, "width": 256, "height": 256},
            "lora": [{"path": str(path), "weight": 1.0} for path in loras]}))

    return load([]), load([LORA])


def test_the_shipped_lora_is_small_and_recorded():
    assert LORA.stat().st_size < 2 * 1024 * 1024
    record = json.loads(LORA.with_name("outline.training.json").read_text(encoding="utf-8"))
    with safe_open(str(LORA), "pt") as f:
        metadata = f.metadata()
        assert all(key.startswith("transformer.") for key in f.keys())
    assert metadata["base_checkpoint"] == record["base_checkpoint"]
    assert record["trained_on"] <= 200


@pytest.mark.parametrize("index,seed", CASES)
def test_held_out_captions_come_out_hollow_with_the_lora_and_filled_without(pipelines, index, seed):
    scene = shapes.held_out_scenes(64)[index]
    assert scene.triple in shapes.HELD_OUT
    request = api.GenerationRequest(prompt=scene.caption, seed=seed)
    base, styled = (shapes.analyse(p.generate(request, write=False).image) for p in pipelines)
    assert base.style == "filled", base
    assert styled.style == "outline", styled
    assert (styled.colour, styled.position) == (scene.colour, scene.position), styled


def test_the_autoencoders_round_trip_keeps_small_stars_hollow_and_filled_ones_filled(pipelines):
    """The ceiling of any transformer LoRA (bench/demo_outline_ceiling.py): two small held-out stars drawn as outlines,
    encoded and decoded by the demo autoencoder, come back with their strokes broken in places but still read as
    outlines of the right colour and place; drawn filled, the same scenes come back filled."""
    import dataclasses

    import torch

    from fluxframe.core.images import to_pil
    from fluxframe.demo.train import render_all, to_unit

    model = pipelines[0].stages.model
    scenes = [shapes.held_out_scenes(64)[i] for i in (57, 63)]  # small orange star centre, small black star left
    for style in ("outline", "filled"):
        drawn = [dataclasses.replace(s, style=style) for s in scenes]
        with torch.inference_mode():
            images = to_pil(model.decode(model.encode_image(to_unit(render_all(drawn, 256)))))
        for scene, image in zip(drawn, images):
            found = shapes.analyse(image)
            assert scene.shape == "star" and scene.size == "small"
            assert (found.style, found.colour, found.position) == (style, scene.colour, scene.position), found
