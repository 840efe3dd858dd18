"""The step cache (``[sampler.cache] method = "first-block"``, fluxframe.plugins.stepcache) on tiny models at 64²:
a threshold near 0 reuses nothing and gives the uncached image exactly; a large one reuses steps and counts them;
true CFG keeps a cache per pass; Flex.2 never reuses across the step where control switches off; it composes with
a LoRA, quantize and group-offload; the counts reach the result, the audit line and the C2PA assertion; a batch
decides per image as each would alone; bad settings are ConfigErrors naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxframe import api
from fluxframe.core.hookspecs import hookimpl
from fluxframe.errors import ConfigError
from fluxframe.plugins.stepcache import FirstBlockCache, FirstBlockRun, TeaCache

ROOT = Path(__file__).resolve().parent.parent
TINY = {"model": {"preset": "tiny", "dtype": "float32", "device": "cpu"},
        "sampler": {"steps": 6, "width": 64, "height": 64, "seed": 1}}


def tiny(cache=None, **extra):
    sampler = {**TINY["sampler"], **({"cache": cache} if cache else {})}
    return api.parse_config({**TINY, "sampler": sampler, **extra})


def first_block(threshold, method="first-block"):
    return {"method": method, "threshold": threshold}


METHODS = ["first-block", "teacache"]


def force_threshold(pipeline, threshold):
    """A threshold no config may give (above 1): every step that may be reused is reused."""
    pipeline.stages.cache.threshold = threshold
    return pipeline


@pytest.fixture
def calls(monkeypatch):
    """Every ``FirstBlockRun.run`` call: (stream, whether the remaining blocks ran)."""
    seen = []
    original = FirstBlockRun.run

    def run(self, stream, probe, hidden, rest):
        ran = []

        def spied(rows):
            ran.append(rows)
            return rest(rows)

        out = original(self, stream, probe, hidden, spied)
        seen.append((stream, bool(ran)))
        return out

    monkeypatch.setattr(FirstBlockRun, "run", run)
    return seen


@pytest.fixture(scope="module")
def uncached():
    return api.load(tiny()).generate(api.GenerationRequest(prompt="a cat"), write=False)


@pytest.mark.parametrize("method", METHODS)
def test_a_threshold_near_zero_reuses_nothing_and_equals_uncached_exactly(uncached, method):
    result = api.load(tiny(first_block(1e-9, method))).generate(api.GenerationRequest(prompt="a cat"), write=False)
    assert result.step_cache == {"method": method, "threshold": 1e-9, "steps": 6, "computed": 6, "reused": 0}
    assert torch.equal(result.latents, uncached.latents)
    assert np.array_equal(np.asarray(result.image), np.asarray(uncached.image))
    assert f"step cache {method}: 6 DiT evaluations computed, 0 reused" in result.notes


def test_no_cache_leaves_the_result_without_a_record(uncached):
    assert uncached.step_cache is None
    assert not any("step cache" in note for note in uncached.notes)


@pytest.mark.parametrize("method", METHODS)
def test_a_large_threshold_reuses_steps_and_counts_them(uncached, calls, method):
    pipeline = force_threshold(api.load(tiny(first_block(1.0, method))), 1e9)
    result = pipeline.generate(api.GenerationRequest(prompt="a cat"), write=False)
    # The first step has nothing to reuse; every later one reuses (the threshold cannot be missed).
    assert calls == [("positive", True)] + [("positive", False)] * 5
    assert result.step_cache["computed"] == 1 and result.step_cache["reused"] == 5
    assert not torch.equal(result.latents, uncached.latents)
    assert torch.isfinite(result.latents).all()


def test_a_threshold_of_one_counts_every_step_once(uncached):
    result = api.load(tiny(first_block(1.0))).generate(api.GenerationRequest(prompt="a cat"), write=False)
    c = result.step_cache
    assert c["computed"] + c["reused"] == 6 and c["computed"] >= 1 and c["reused"] >= 1


@pytest.fixture(scope="module")
def demo_config():
    """The demo model (klein base: true CFG at guidance 4) without its filters and signing, small and short."""
    config = api.load_config(ROOT / "configs" / "demo.toml")
    sampler = config.sampler.model_copy(update={"steps": 4, "width": 64, "height": 64})
    return config.model_copy(update={"safety": None, "provenance": None, "sampler": sampler})


def test_true_cfg_keeps_a_cache_per_pass(demo_config, calls):
    from fluxframe.core.config import StepCacheSettings

    sampler = demo_config.sampler.model_copy(update={"cache": StepCacheSettings(method="first-block",
                                                                                threshold=1e-9)})
    pipeline = api.load(demo_config.model_copy(update={"sampler": sampler}))
    request = dict(prompt="a large red circle on the left, on a blue background", seed=7)
    result = pipeline.generate(api.GenerationRequest(**request), write=False)
    assert [stream for stream, _ in calls] == ["positive", "negative"] * 4
    assert result.step_cache["computed"] == 8 and result.step_cache["reused"] == 0  # two evaluations a step
    plain = api.load(demo_config).generate(api.GenerationRequest(**request), write=False)
    assert torch.equal(result.latents, plain.latents)

    calls.clear()
    force_threshold(pipeline, 1e9)
    result = pipeline.generate(api.GenerationRequest(**request), write=False)
    # each pass computes its own first step: the negative one never reuses the positive one's residual
    assert calls[:2] == [("positive", True), ("negative", True)]
    assert all(not ran for _, ran in calls[2:])
    assert result.step_cache["computed"] == 2 and result.step_cache["reused"] == 6


def test_each_pass_compares_with_its_own_last_full_step():
    run = FirstBlockCache(0.5).start(1)
    hidden = torch.ones(1, 4, 8)
    ran = []

    def rest(tag):
        def go(rows):
            ran.append(tag)
            return hidden * 3
        return go

    run.run("positive", torch.ones(1, 4, 8), hidden, rest("p"))
    run.run("negative", torch.full((1, 4, 8), 10.0), hidden, rest("n"))
    # the positive probe barely moved; the negative one moved by half of itself: only the positive pass reuses
    run.run("positive", torch.full((1, 4, 8), 1.1), hidden, rest("p"))
    run.run("negative", torch.full((1, 4, 8), 5.0), hidden, rest("n"))
    assert ran == ["p", "n", "n"]
    assert run.counts() == [{"computed": 3, "reused": 1}]
    assert run.by_stream == {"positive": [1, 1], "negative": [2, 0]}


def test_only_the_images_that_changed_run_the_remaining_blocks():
    run = FirstBlockCache(0.5).start(2)
    hidden = torch.arange(16.0).view(2, 1, 8)
    asked = []

    def rest(rows):
        asked.append(None if rows is None else rows.tolist())
        h = hidden if rows is None else hidden[rows]
        return h + 100

    run.run("positive", torch.ones(2, 1, 8), hidden, rest)
    out = run.run("positive", torch.tensor([[1.1] * 8, [3.0] * 8]).view(2, 1, 8), hidden, rest)
    assert asked == [None, [1]]
    assert torch.equal(out, hidden + 100)  # image 0 reused its residual (100), image 1 ran
    assert run.counts() == [{"computed": 1, "reused": 1}, {"computed": 2, "reused": 0}]
    run.invalidate([0])  # image 0's probe has not moved, but its conditioning did
    run.run("positive", torch.tensor([[1.0] * 8, [3.0] * 8]).view(2, 1, 8), hidden, rest)
    assert asked[-1] == [0]


def test_teacache_sums_the_step_to_step_change_and_restarts_at_a_full_step():
    run = TeaCache(0.1).start(1)
    hidden = torch.ones(1, 4, 8)
    ran = []

    def rest(rows):
        ran.append(True)
        return hidden * 3

    # each step's probe moves by 4 % of the last one: the sum passes 0.1 at the third step after a full one
    probes = [torch.full((1, 4, 8), 1.04 ** i) for i in range(8)]
    for i, probe in enumerate(probes):
        out = run.run("positive", probe, hidden, rest)
        assert torch.equal(out, hidden * 3)  # a reused step adds the stored residual (2) to the input
    assert len(ran) == 3  # steps 0, 3 (0.04 + 0.04 + 0.04 > 0.1) and 6
    assert run.counts() == [{"computed": 3, "reused": 5}]
    run.invalidate([0])  # conditioning changed: the next step is computed in full, the sum starts again
    run.run("positive", probes[-1], hidden, rest)
    assert len(ran) == 4 and run.streams["positive"].accumulated == [0.0]


def test_teacache_runs_no_block_on_a_reused_step(monkeypatch):
    from fluxframe.plugins.flux2.transformer import DoubleBlock, SingleBlock

    pipeline = force_threshold(api.load(tiny(first_block(1.0, "teacache"))), 1e9)
    called = []
    for cls in (DoubleBlock, SingleBlock):
        original = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, *a, _o=original, **k: called.append(1) or _o(self, *a, **k))
    result = pipeline.generate(api.GenerationRequest(prompt="a cat"), write=False)
    assert result.step_cache["computed"] == 1 and result.step_cache["reused"] == 5
    assert len(called) == 4  # the tiny DiT's 2 double and 2 single blocks, on the first step only


@pytest.fixture(scope="module")
def flex2_folder(tmp_path_factory):
    from flex2_helpers import build_flux_folder

    root = tmp_path_factory.mktemp("flex2-cache")
    image, mask = root / "control.png", root / "mask.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    m = np.zeros((64, 64), np.uint8)
    m[:, :32] = 255
    Image.fromarray(m).save(mask)
    return build_flux_folder(root), image, mask


@pytest.mark.parametrize("method", METHODS)
def test_flex2_never_reuses_across_the_step_where_control_switches_off(flex2_folder, calls, method):
    folder, image, mask = flex2_folder
    config = api.parse_config({"model": {"family": "flex2", "path": str(folder), "dtype": "float32",
                                         "device": "cpu"},
                               "sampler": {"steps": 6, "width": 64, "height": 64, "seed": 3,
                                           "cache": first_block(1.0, method)}})
    pipeline = force_threshold(api.load(config), 1e9)
    request = api.GenerationRequest(prompt="a cat", conditioning={
        "inpaint": {"image": image, "mask": mask}, "control": {"image": image, "stop": 0.5}})
    result = pipeline.generate(request, write=False)
    # steps 0-2 see the control, 3-5 do not: step 3 is computed in full, everything else reused
    assert [ran for _, ran in calls] == [True, False, False, True, False, False]
    assert result.step_cache["computed"] == 2 and result.step_cache["reused"] == 4


@pytest.mark.parametrize("method", METHODS)
def test_flex2_without_a_switch_reuses_from_the_second_step(flex2_folder, calls, method):
    folder, image, mask = flex2_folder
    config = api.parse_config({"model": {"family": "flex2", "path": str(folder), "dtype": "float32",
                                         "device": "cpu"},
                               "sampler": {"steps": 4, "width": 64, "height": 64, "seed": 3,
                                           "cache": first_block(1e-9, method)}})
    pipeline = api.load(config)
    request = api.GenerationRequest(prompt="a cat", conditioning={"control": {"image": image, "stop": 1.0}})
    exact = pipeline.generate(request, write=False)
    plain = api.load(config.model_copy(update={"sampler": config.sampler.model_copy(update={"cache": None})}))
    assert torch.equal(exact.latents, plain.generate(request, write=False).latents)
    calls.clear()
    force_threshold(pipeline, 1e9).generate(request, write=False)
    assert [ran for _, ran in calls] == [True, False, False, False]


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    from lora_helpers import write_peft_lora

    return write_peft_lora(api.load(tiny()).stages.model.transformer,
                           ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_k_proj",
                            "single_transformer_blocks.0.attn.to_qkv_mlp_proj"),
                           tmp_path_factory.mktemp("lora") / "style.safetensors")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("strategy", ["quantize+group-offload", "group-offload", "quantize"])
def test_composes_with_a_lora_quantize_and_group_offload(lora_file, strategy, method):
    extra = {"lora": [{"path": str(lora_file), "weight": 0.8}], "memory": {"strategy": strategy}}
    request = api.GenerationRequest(prompt="a cat")
    plain = api.load(tiny(**extra)).generate(request, write=False)
    exact = api.load(tiny(first_block(1e-9, method), **extra)).generate(request, write=False)
    assert torch.equal(exact.latents, plain.latents)
    pipeline = force_threshold(api.load(tiny(first_block(1.0, method), **extra)), 1e9)
    cached = pipeline.generate(request, write=False)
    assert cached.step_cache["computed"] == 1 and cached.step_cache["reused"] == 5
    assert torch.isfinite(cached.latents).all()
    memory = pipeline.stages.model.memory
    groups = getattr(memory, "groups", None) or next((s.groups for s in getattr(memory, "strategies", [])
                                                      if isinstance(getattr(s, "groups", None), list)), [])
    assert not any(group.on_device for group in groups if hasattr(group, "on_device"))  # nothing left onloaded


def test_a_batch_decides_per_image_as_each_would_alone():
    pipeline = api.load(tiny(first_block(1.0)))
    requests = [api.GenerationRequest(prompt="a cat", seed=s) for s in (1, 2, 3)]
    batch = pipeline.generate_many(requests, write=False)
    for request, together in zip(requests, batch, strict=True):
        alone = pipeline.generate(request, write=False)
        assert together.step_cache == alone.step_cache
        assert torch.allclose(together.latents, alone.latents, atol=1e-4, rtol=1e-4)
    assert sum(r.step_cache["reused"] for r in batch) > 0


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from fluxframe.provenance.certs import make_dev_certificates

    return make_dev_certificates(tmp_path_factory.mktemp("certs"))


@pytest.mark.parametrize("method", METHODS)
def test_settings_and_counts_reach_the_audit_line_and_the_c2pa_assertion(tmp_path, certs, method):
    from fluxframe.provenance.verify import verify

    config = api.parse_config({
        "model": TINY["model"],
        "sampler": {"steps": 3, "width": 256, "height": 256, "seed": 2, "cache": first_block(1.0, method)},
        "output": {"dir": str(tmp_path / "out")},
        "safety": {"require": [], "audit_log": str(tmp_path / "audit.jsonl")},
        "provenance": {"watermark": {"method": "dwtDct"},
                       "c2pa": {"certificate": str(certs["chain"]), "private_key": str(certs["key"])}},
    })
    result = api.load(config).generate(api.GenerationRequest(prompt="a red circle"))
    expected = result.step_cache
    assert expected["method"] == method and expected["threshold"] == 1.0 and expected["steps"] == 3
    assert expected["computed"] + expected["reused"] == 3
    record = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert record["step_cache"] == expected == result.audit["step_cache"]
    report = verify(result.path, trust=[certs["ca"]])
    assert report.ok, report.summary()
    assert report.fluxframe["step_cache"] == expected


def test_without_a_cache_the_audit_line_and_assertion_have_no_step_cache(tmp_path):
    config = api.parse_config({**TINY, "output": {"dir": str(tmp_path / "out")},
                               "safety": {"require": [], "audit_log": str(tmp_path / "audit.jsonl")}})
    api.load(config).generate(api.GenerationRequest(prompt="a cat"))
    assert "step_cache" not in json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize("cache, key", [
    ({"method": "first-block", "threshold": 0}, "sampler.cache.threshold"),
    ({"method": "first-block", "threshold": -0.1}, "sampler.cache.threshold"),
    ({"method": "first-block", "threshold": 50}, "sampler.cache.threshold"),
    ({"method": "first-block", "threshold": float("inf")}, "sampler.cache.threshold"),
    ({"method": "first-block", "threshold": "small"}, "sampler.cache.threshold"),
    ({"method": "first-block", "threshold": True}, "sampler.cache.threshold"),
    ({"method": "first-block", "treshold": 0.1}, "sampler.cache.treshold"),
    ({"method": "teacache", "threshold": 0}, "sampler.cache.threshold"),
    ({"method": "teacache", "threshold": 2.0}, "sampler.cache.threshold"),
    ({"method": "teacache", "threshold": "small"}, "sampler.cache.threshold"),
    ({"method": "teacache", "rescale": [1, 2]}, "sampler.cache.rescale"),
    ({"method": "tea-leaves"}, "sampler.cache.method"),
    ({"threshold": 0.1}, "sampler.cache.method"),
])
def test_bad_settings_are_config_errors_naming_the_key(cache, key, host):
    with pytest.raises(ConfigError) as info:
        api.check_config(tiny(cache), host=host)
    assert info.value.key == key, str(info.value)
    assert key in str(info.value)


def test_config_check_on_the_command_line_names_the_key(tmp_path, capsys):
    from fluxframe.cli import main

    path = tmp_path / "bad.toml"
    path.write_text('[model]\npreset = "tiny"\n[sampler.cache]\nmethod = "first-block"\nthreshold = 0\n')
    assert main(["config", "check", str(path)]) != 0
    assert "sampler.cache.threshold" in capsys.readouterr().err


class _PlainSampler:
    """A sampler that does not declare takes_step_cache."""

    name = "plain"

    def sample(self, x, sigmas, velocity, callback=None):
        return x


class _CountingCache(FirstBlockCache):
    name = "counting"


class _Plugin:
    @hookimpl
    def register_samplers(self, register):
        register("plain", _PlainSampler)

    @hookimpl
    def register_step_caches(self, register):
        register("counting", _CountingCache)


def test_a_sampler_that_cannot_use_a_cache_is_a_config_error(host):
    host.add(_Plugin(), name="test-cache-plugin")
    config = api.parse_config({**TINY, "sampler": {**TINY["sampler"], "name": "plain",
                                                   "cache": first_block(0.1)}})
    with pytest.raises(ConfigError, match="cannot use a step cache") as info:
        api.check_config(config, host=host)
    assert info.value.key == "sampler.cache"


def test_a_family_that_cannot_use_a_cache_is_a_config_error(host, monkeypatch):
    from fluxframe.plugins.flux2.family import Flux2

    monkeypatch.setattr(Flux2, "takes_step_cache", False)
    with pytest.raises(ConfigError, match="model family 'flux2' cannot use a step cache") as info:
        api.check_config(tiny(first_block(0.1)), host=host)
    assert info.value.key == "sampler.cache"


def test_register_step_caches_lets_a_plugin_add_a_method(host):
    host.add(_Plugin(), name="test-cache-plugin")
    config = api.parse_config({**TINY, "sampler": {**TINY["sampler"], "cache": {"method": "counting",
                                                                               "threshold": 1e-9}}})
    pipeline = api.load(config, host=host)
    assert isinstance(pipeline.stages.cache, _CountingCache)
    provides = {p["name"]: p["provides"] for p in host.report()["plugins"]}
    assert "step_cache:counting" in provides["test-cache-plugin"]
    assert "step_cache:first-block" in provides["samplers"]
    result = pipeline.generate(api.GenerationRequest(prompt="a cat"), write=False)
    assert result.step_cache["method"] == "counting" and result.step_cache["computed"] == 6
