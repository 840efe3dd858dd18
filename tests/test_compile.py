"""``[model] compile = true`` (fluxframe.plugins.common.compile): regional compilation of the DiT's blocks.

SLOW: the first test compiles two block classes with inductor on the CPU (about 20-60 s here, more on a busy
machine); the model is the tiny preset at 64², two steps. It checks the compiled run equals the uncompiled one
within float32 tolerance, that each block class compiles once (a counting backend wrapping inductor) and that
neither a second seed nor another run recompiles anything. The fallback test needs no compiler.
"""

from __future__ import annotations

import logging

import pytest
import torch

from fluxframe import api
from fluxframe.plugins.common import compile as regional

TINY = {"model": {"preset": "tiny", "dtype": "float32", "device": "cpu"},
        "sampler": {"steps": 2, "width": 64, "height": 64}}


def tiny(**model):
    return api.parse_config({**TINY, "model": {**TINY["model"], **model}})


@pytest.fixture
def counting_inductor(monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    monkeypatch.setattr(regional, "BACKEND", counter)
    yield counter
    torch._dynamo.reset()


def compare_over_two_seeds(plain, compiled, counting_inductor) -> list:
    """Both pipelines draw two seeds: the compiled latents equal the uncompiled within 1e-4, each block class
    compiles one graph, with no graph break and no recompilation. Returns the (uncompiled, compiled) results."""
    from torch._dynamo.utils import counters

    probe_frames = counting_inductor.frame_count  # the compiler check at load compiles one test function
    counters.clear()
    results = []
    for seed in (1, 2):
        request = api.GenerationRequest(prompt="a cat", seed=seed)
        want, got = plain.generate(request, write=False), compiled.generate(request, write=False)
        assert got.compile["enabled"] is True
        assert torch.allclose(got.latents, want.latents, rtol=1e-4, atol=1e-4), \
            (got.latents - want.latents).abs().max()
        results.append((want, got))
    assert counting_inductor.frame_count - probe_frames == 2
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not counters["recompiles"], dict(counters["recompiles"])
    return results


@pytest.mark.slow_compile
def test_compiled_blocks_equal_uncompiled_and_compile_once_per_class(counting_inductor):
    from torch._dynamo.utils import counters

    plain = api.load(tiny())
    compiled = api.load(tiny(compile=True))
    record = compiled.stages.model.compiled
    assert record["enabled"] is True
    # 2 double blocks, 2 single blocks of which the last (the text-token skip) stays eager
    assert record["blocks"] == {"DoubleBlock": 2, "SingleBlock": 1}
    # one graph per block class, compiled on the first step of the first seed, reused ever after
    for _, got in compare_over_two_seeds(plain, compiled, counting_inductor):
        assert got.compile == record and "compile" in compiled.stages.model.describe()
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.slow_compile
@pytest.mark.parametrize("fmt", ["int8", "nf4", pytest.param("fp8", marks=pytest.mark.skipif(
    not hasattr(torch, "float8_e4m3fn"), reason="torch without float8_e4m3fn"))])
def test_compiled_blocks_compose_with_a_quantised_dit(counting_inductor, fmt):
    """The quantised linears dequantise inside the compiled block: the image is the uncompiled quantised one, one
    graph per block class, no graph break or recompilation over two seeds (nf4's lookup table once failed dynamo's
    guards: it was created lazily inside the first forward)."""
    memory = {"memory": {"strategy": "quantize", "quantize": {"format": fmt}}}
    plain = api.load(api.parse_config({**TINY, **memory}))
    compiled = api.load(api.parse_config({**TINY, **memory, "model": {**TINY["model"], "compile": True}}))
    compare_over_two_seeds(plain, compiled, counting_inductor)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    from lora_helpers import write_peft_lora

    return write_peft_lora(api.load(tiny()).stages.model.transformer,
                           ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_qkv_mlp_proj"),
                           tmp_path_factory.mktemp("lora") / "style.safetensors")


@pytest.mark.slow_compile
@pytest.mark.parametrize("strategy, method", [("group-offload", "first-block"), ("model-offload", "teacache")])
def test_compiled_blocks_compose_with_offloading_a_lora_and_the_step_cache(counting_inductor, lora_file, strategy,
                                                                            method):
    """group-offload's hooks onload and offload a block's weights around its call: they run eagerly around the
    compiled forward (no graph breaks, still one graph per block class), and the image is the uncompiled one, with
    a LoRA applied; a step cache (forced to reuse every step it may) runs the compiled blocks on the steps it
    computes (first-block: the compiled first block is its probe)."""
    cache = {"method": method, "threshold": 1.0}
    extra = {"memory": {"strategy": strategy}, "sampler": {**TINY["sampler"], "steps": 3, "cache": cache},
             "lora": [{"path": str(lora_file), "weight": 0.8}]}
    plain = api.load(api.parse_config({**TINY, **extra}))
    compiled = api.load(api.parse_config({**TINY, **extra, "model": {**TINY["model"], "compile": True}}))
    for pipeline in (plain, compiled):
        pipeline.stages.cache.threshold = 1e9  # no config may say this: reuse every step after the first
    for want, got in compare_over_two_seeds(plain, compiled, counting_inductor):
        assert got.step_cache == want.step_cache and got.step_cache["reused"] == 2
    memory = compiled.stages.model.memory
    assert memory.stats["onloads"] > 0  # the weights did move
    if strategy == "group-offload":  # each block group onloaded before its first block, offloaded after its last
        assert not any(group.on_device for group in memory.groups)
        assert memory.stats["onloads"] == memory.stats["offloads"]


def test_without_a_working_compiler_the_blocks_run_uncompiled_and_the_result_says_so(monkeypatch, caplog):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    torch._dynamo.reset()
    monkeypatch.setattr(regional, "BACKEND", broken)
    with caplog.at_level(logging.WARNING, logger="fluxframe"):
        pipeline = api.load(tiny(compile=True))
    torch._dynamo.reset()
    record = pipeline.stages.model.compiled
    assert record["enabled"] is False and "no C++ compiler found" in record["reason"]
    assert any("runs uncompiled" in r.getMessage() for r in caplog.records)
    request = api.GenerationRequest(prompt="a cat", seed=1)
    result = pipeline.generate(request, write=False)
    assert result.compile == record
    assert any(note.startswith("compile: NOT applied: ") for note in result.notes)
    assert torch.equal(result.latents, api.load(tiny()).generate(request, write=False).latents)


def test_compile_is_off_by_default_and_then_not_recorded():
    pipeline = api.load(tiny())
    assert pipeline.stages.model.compiled is None and "compile" not in pipeline.stages.model.describe()
    assert pipeline.generate(api.GenerationRequest(prompt="a cat", seed=1), write=False).compile is None


def test_compile_must_be_a_boolean():
    from fluxframe.errors import ConfigError

    with pytest.raises(ConfigError, match="model.compile"):
        tiny(compile="yes")
