"""Pipeline.generate_many: compatible requests run through the model as one batch, and each image is the one the
same request gives alone (CPU float32) — FLUX.2 dev-shaped and klein, klein base with true CFG (the demo model),
references, Flex.2 inpaint + control — while filters, outputs and audit lines stay per request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flex2_helpers import build_flux_folder
from PIL import Image

from fluxframe import api
from fluxframe.core.audit import verify_log
from fluxframe.core.types import GenerationResult
from fluxframe.errors import Blocked, ConfigError, RequestError

ROOT = Path(__file__).resolve().parent.parent


def _pipeline(model, host=None, **sections):
    sampler = {"steps": 2, "width": 64, "height": 64, **sections.pop("sampler", {})}
    return api.load(api.parse_config({"model": {"dtype": "float32", "device": "cpu", **model}, "sampler": sampler,
                                      **sections}), host=host)


def _batches(pipeline):
    """Record the batch size of every predict call."""
    model = pipeline.stages.model
    sizes, predict = [], model.predict

    def recording(latents, *args, **kwargs):
        sizes.append(latents.shape[0])
        return predict(latents, *args, **kwargs)

    model.predict = recording
    return sizes


def _pictures(root, n, size=(64, 64), seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        paths.append(root / f"picture{seed}-{i}.png")
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(paths[-1])
    return paths


def assert_batched_equals_single(pipeline, requests, label):
    singles = [pipeline.generate(r, write=False) for r in requests]
    sizes = _batches(pipeline)
    batched = pipeline.generate_many(requests, write=False)
    del pipeline.stages.model.predict
    assert max(sizes) == len(requests), sizes  # they really ran together
    worst = 0
    for one, many in zip(singles, batched, strict=True):
        assert isinstance(many, GenerationResult), many
        assert many.seed == one.seed and many.steps == one.steps
        a, b = np.asarray(one.image, dtype=np.int16), np.asarray(many.image, dtype=np.int16)
        worst = max(worst, int(np.abs(a - b).max()))
        latent = float((one.latents - many.latents).abs().max())
        print(f"{label}: max pixel difference {int(np.abs(a - b).max())}/255, max latent difference {latent:.2e}")
    assert worst <= 1
    return worst


def test_flux2_dev_shape(tmp_path):
    pipeline = _pipeline({"preset": "tiny"}, sampler={"guidance": 3.5})
    requests = [api.GenerationRequest(prompt=p, seed=s) for p, s in (("a cat", 1), ("a dog on a sofa", 2),
                                                                       ("a cat", 3))]
    assert_batched_equals_single(pipeline, requests, "tiny (dev shape)")


def test_flux2_dev_shape_with_references(tmp_path):
    pipeline = _pipeline({"preset": "tiny"})
    first, second = _pictures(tmp_path, 2, (80, 96)), _pictures(tmp_path, 2, (64, 96), seed=1)
    requests = [api.GenerationRequest(prompt="put it on the table", seed=s,
                                      conditioning={"reference": {"images": images}})
                for s, images in ((1, [first[0], second[0]]), (2, [first[1], second[1]]))]
    assert_batched_equals_single(pipeline, requests, "tiny + 2 references")


def test_klein_distilled():
    pipeline = _pipeline({"preset": "tiny-klein"})
    requests = [api.GenerationRequest(prompt="a cat", seed=4), api.GenerationRequest(prompt="a red boat", seed=5)]
    assert_batched_equals_single(pipeline, requests, "tiny-klein")


def test_klein_base_true_cfg_demo_model():
    demo = api.load_config(ROOT / "configs" / "demo.toml")
    pipeline = api.load(demo.model_copy(update={"safety": None, "provenance": None,
                                                "sampler": demo.sampler.model_copy(update={"steps": 2})}))
    assert pipeline.stages.model.true_cfg(4.0)
    requests = [api.GenerationRequest(prompt="a large red circle on the left, on a blue background", seed=7),
                api.GenerationRequest(prompt="a small green star at the top, on a black background",
                                      negative_prompt="a red circle", seed=9)]
    assert_batched_equals_single(pipeline, requests, "demo (klein base, true CFG)")
    # Three requests sharing the empty negative prompt: it is encoded once for the group, and each image is still
    # the one its request gives alone.
    encoded = []
    encode = pipeline.stages.model.encode_prompts
    pipeline.stages.model.encode_prompts = lambda prompts: encoded.append(list(prompts)) or encode(prompts)
    shared = [api.GenerationRequest(prompt=f"a large {c} square in the centre, on a white background", seed=3 + i)
              for i, c in enumerate(("red", "blue", "green"))]
    assert_batched_equals_single(pipeline, shared, "demo (shared empty negative)")
    assert encoded[-2:] == [[r.prompt for r in shared], [""]]


def test_flex2_inpaint_and_control(tmp_path):
    folder = build_flux_folder(tmp_path / "flex2")
    pipeline = _pipeline({"family": "flex2", "path": str(folder)}, sampler={"steps": 3})
    images = _pictures(tmp_path, 4)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    requests = [api.GenerationRequest(prompt="a cat", seed=s, conditioning={
        "inpaint": {"image": images[k], "mask": tmp_path / "mask.png"}, "control": {"image": images[k + 1],
                                                                                   "stop": 0.5}})
        for k, s in ((0, 3), (2, 4))]
    assert_batched_equals_single(pipeline, requests, "flex2 inpaint + control")


def test_per_item_failures_groups_splits_audit_and_outputs(tmp_path, host):
    log = tmp_path / "audit.jsonl"
    pipeline = _pipeline({"preset": "tiny"}, host=host, sampler={"max_batch_size": 2},
                         safety={"require": ["prompt-nsfw"], "audit_log": str(log)},
                         output={"dir": str(tmp_path / "out")})
    sizes = _batches(pipeline)
    requests = [api.GenerationRequest(prompt="a cat", seed=1, request_id="a"),
                api.GenerationRequest(prompt="a nude woman", seed=2, request_id="blocked"),
                api.GenerationRequest(prompt="a dog", seed=3, request_id="b"),
                api.GenerationRequest(prompt="a cat", seed=4, width=40, request_id="invalid"),
                api.GenerationRequest(prompt="a bird", seed=5, width=32, request_id="small"),
                api.GenerationRequest(prompt="a fish", seed=6, request_id="c")]
    results = pipeline.generate_many(requests)
    kinds = [type(r).__name__ for r in results]
    assert kinds == ["GenerationResult", "Blocked", "GenerationResult", "RequestError", "GenerationResult",
                     "GenerationResult"], kinds
    assert isinstance(results[1], Blocked) and isinstance(results[3], RequestError)
    assert results[3].field == "width"
    # a, b, c share a size: split 2 + 1 by max_batch_size; the 32-wide one alone; two steps each
    assert sorted(sizes) == [1, 1, 1, 1, 2, 2], sizes
    assert results[4].image.size == (32, 64)
    for r in (results[0], results[2], results[4], results[5]):
        assert r.path.is_file() and r.path.parent == tmp_path / "out"
        assert r.audit["output"]["path"] == str(r.path)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    by_id = {}
    for line in lines:
        if line.get("event") == "request":
            by_id.setdefault(line["request_id"], []).append(line["action"])
    assert by_id == {"a": ["allow"], "blocked": ["block"], "b": ["allow"], "invalid": ["error"], "small": ["allow"],
                     "c": ["allow"]}, by_id
    assert verify_log(log).ok


def test_encode_unique_encodes_each_text_once_and_keeps_the_order():
    import torch

    from fluxframe.core.batching import encode_unique
    from fluxframe.core.types import TextConditioning

    class Model:
        calls = []

        def encode_prompts(self, prompts):
            self.calls.append(prompts)
            value = torch.tensor([[float(len(p))] for p in prompts])
            return TextConditioning(embeds=value[:, :, None].expand(-1, 3, 2).clone(), ids=torch.zeros(3, 4))

    text = encode_unique(Model(), ["", "ab", "", "abc", "ab"])
    assert Model.calls == [["", "ab", "abc"]]
    assert text.embeds[:, 0, 0].tolist() == [0.0, 2.0, 0.0, 3.0, 2.0] and text.ids.shape == (3, 4)


def test_decoding_on_a_cpu_goes_a_few_images_at_a_time(monkeypatch):
    """A batch's latents decode in calls of at most CPU_DECODE_PIXELS pixels on a CPU (a larger call outgrows the
    caches and is slower per image); each image is still the one its request gives alone."""
    from fluxframe.core import batching

    assert batching.decode_chunk(torch.zeros(8, 256, 128), (16, 16), 16) == 2  # 256² at the default budget
    assert batching.decode_chunk(torch.zeros(8, 4096, 128), (64, 64), 16) == 1  # 1024²: one at a time
    monkeypatch.setattr(batching, "CPU_DECODE_PIXELS", 2 * 64 * 64)
    pipeline = _pipeline({"preset": "tiny"})
    decoded, decode = [], pipeline.stages.model.decode
    pipeline.stages.model.decode = lambda latents: decoded.append(latents.tokens.shape[0]) or decode(latents)
    requests = [api.GenerationRequest(prompt=p, seed=s) for s, p in enumerate(("a cat", "a dog", "a boat"))]
    assert_batched_equals_single(pipeline, requests, "tiny, decoded two at a time")
    assert decoded[-2:] == [2, 1], decoded


def test_max_batch_size_bounds():
    with pytest.raises(ConfigError):
        api.parse_config({"model": {"preset": "tiny"}, "sampler": {"max_batch_size": 0}})
    assert api.parse_config({"model": {"preset": "tiny"}}).sampler.max_batch_size == 8


def test_prompt_embeddings_files_batch_together_and_apart_from_prompts(tmp_path):
    config = api.parse_config({"model": {"preset": "tiny", "dtype": "float32", "device": "cpu"},
                               "sampler": {"steps": 2, "width": 64, "height": 64}})
    files = [api.encode(config, p, tmp_path / f"e{i}.safetensors") for i, p in enumerate(("a cat", "a red boat"))]
    pipeline = api.load(config)
    requests = [api.GenerationRequest(prompt_embeds=f, seed=s) for f, s in zip(files, (1, 2), strict=True)]
    assert_batched_equals_single(pipeline, requests, "tiny, embeddings files")
    sizes = _batches(pipeline)
    mixed = pipeline.generate_many(requests + [api.GenerationRequest(prompt="a cat", seed=3)], write=False)
    assert all(isinstance(r, GenerationResult) for r in mixed) and sorted(sizes) == [1, 1, 2, 2], sizes


def test_a_family_that_does_not_batch_runs_one_by_one():
    pipeline = _pipeline({"preset": "tiny-klein"})
    pipeline.stages.model.batched = False  # as a plugin family that never declared it
    sizes = _batches(pipeline)
    requests = [api.GenerationRequest(prompt="a cat", seed=s) for s in (1, 2, 3)]
    results = pipeline.generate_many(requests, write=False)
    assert sizes == [1] * 6 and all(isinstance(r, GenerationResult) for r in results)
    assert np.array_equal(np.asarray(results[1].image), np.asarray(pipeline.generate(requests[1], write=False).image))


def test_a_crash_in_a_batch_still_leaves_one_audit_line_per_request(tmp_path, host):
    log = tmp_path / "audit.jsonl"
    pipeline = _pipeline({"preset": "tiny-klein"}, host=host, safety={"audit_log": str(log)},
                         output={"dir": str(tmp_path / "out")})
    pipeline.stages.model.decode = lambda latents: (_ for _ in ()).throw(ValueError("decoder bug"))
    requests = [api.GenerationRequest(prompt="a cat", seed=s, request_id=f"r{s}", width=w)
                for s, w in ((1, 64), (2, 64), (3, 32))]
    with pytest.raises(ValueError, match="decoder bug"):
        pipeline.generate_many(requests)
    lines = [x for x in map(json.loads, log.read_text().splitlines()) if x.get("event") == "request"]
    assert sorted((x["request_id"], x["action"]) for x in lines) == [("r1", "error"), ("r2", "error"),
                                                                     ("r3", "error")]
    assert verify_log(log).ok and not list((tmp_path / "out").glob("*.png"))
