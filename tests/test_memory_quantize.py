"""The ``quantize`` memory strategy: weight-only int8 / fp8 / nf4 for the DiT's block linears.

Every format gives nearly the same image as ``none`` on the tiny FLUX.2 and Flux.1 checkpoints (the measured
errors and their bounds are in MEASURED below), the quantised weights take ~1/2 (8-bit) and ~1/4 (4-bit, plus
scales) of their bf16 bytes, and ``quantize+group-offload`` streams the quantised blocks (it rewrites the DiT
before the offloading strategy captures its tensors) with the same result as ``quantize`` alone."""

from __future__ import annotations

import pytest
import torch
from flex2_helpers import build_flux_folder
from torch import nn

from fluxframe import api
from fluxframe.errors import ConfigError
from fluxframe.plugins.memory import GroupOffload, Quantize
from fluxframe.plugins.memory.quantize import QuantLinear, quantize_weight

PROMPT = "a small red square on a blue background"
FP8 = pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="torch without float8_e4m3fn")
FORMATS = ["int8", pytest.param("fp8", marks=FP8), "nf4"]


def _run(folder, host, family, memory=None, calls=None):
    data = {
        "model": {"family": family, "path": str(folder), "dtype": "float32", "device": "cpu"},
        "sampler": {"steps": 2, "guidance": 3.5, "width": 64, "height": 48},
    }
    if memory is not None:
        data["memory"] = memory
    pipeline = api.load(api.parse_config(data), host=host)
    if calls is not None:  # record the DiT's inputs and output at each step
        pipeline.stages.model.transformer.register_forward_hook(
            lambda _m, args, kwargs, out: calls.append((args, kwargs, out)), with_kwargs=True)
    result = pipeline.generate(api.GenerationRequest(prompt=PROMPT, seed=3, width=64, height=48, steps=2), write=False)
    return pipeline.stages.model, result


@pytest.fixture(scope="module")
def flux1_folder(tmp_path_factory):
    return build_flux_folder(tmp_path_factory.mktemp("flux1-quantize"), in_channels=64)


@pytest.fixture(scope="module")
def references():
    return {}


def _folder(family, diffusers_flux2_folder, flux1_folder):
    return diffusers_flux2_folder if family == "flux2" else flux1_folder


def _reference(references, folder, host, family):
    if family not in references:
        references[family] = _run(folder, host, family)
    return references[family]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# Relative errors ||quantised - none|| / ||none|| on the tiny random float32 DiTs of the test checkpoints (2 steps),
# of the final latents and of the DiT's output (velocity) on the same inputs at the first step. Measured
# (latents, velocity):
MEASURED = {
    ("flux2", "int8"): (8.6e-5, 1.8e-4), ("flux2", "fp8"): (4.0e-4, 1.0e-3), ("flux2", "nf4"): (1.2e-3, 2.9e-3),
    ("flex2", "int8"): (3.7e-3, 4.2e-3), ("flex2", "fp8"): (2.5e-2, 2.8e-2), ("flex2", "nf4"): (7.6e-2, 8.4e-2),
}
# The Flux.1 DiT errs more: its blocks carry their own modulation (quantised with them), and the tiny random
# FLUX.2 DiT's output depends little on its blocks. Bounds, for both measures: 3-5x the format's largest
# measurement (int8: a scale per row, 255 levels; fp8 e4m3: 3 mantissa bits; nf4: 16 levels per group of 64).
BOUNDS = {"int8": 0.02, "fp8": 0.1, "nf4": 0.3}
assert all(max(m) < BOUNDS[fmt] / 3 for (_, fmt), m in MEASURED.items())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", ["flux2", "flex2"])
def test_quantized_image_close_to_none(diffusers_flux2_folder, flux1_folder, host, references, family, fmt):
    folder = _folder(family, diffusers_flux2_folder, flux1_folder)
    ref_model, ref = _reference(references, folder, host, family)
    calls = []
    model, result = _run(folder, host, family, {"strategy": "quantize", "quantize": {"format": fmt}}, calls)
    strategy = model.memory.strategies[0]
    assert isinstance(strategy, Quantize) and strategy.format == fmt
    blocks = [*model.transformer.double_blocks, *model.transformer.single_blocks]
    layers = [m for b in blocks for m in b.modules() if isinstance(m, QuantLinear)]
    assert layers and len(layers) == strategy.stats["layers"]
    assert not any(type(m) is nn.Linear for b in blocks for m in b.modules())  # every block linear replaced
    assert type(model.transformer.img_in) is nn.Linear  # embedders kept
    # alone, the DiT is loaded (and quantised) on the CPU, whatever the device; the rest where it runs
    assert model.memory.load_device("transformer", "cuda") == torch.device("cpu")
    assert model.memory.load_device("vae", "cuda") == "cuda"
    args, kwargs, velocity = calls[0]
    with torch.inference_mode():
        ref_velocity = ref_model.transformer(*args, **kwargs)
    err, verr = _rel(result.latents, ref.latents), _rel(velocity, ref_velocity)
    print(f"\n{family} {fmt}: relative error latents {err:.3g}, velocity {verr:.3g}")
    assert 0 < err < BOUNDS[fmt] and 0 < verr < BOUNDS[fmt], (err, verr)
    img = torch.tensor(list(result.image.tobytes()), dtype=torch.float32)
    img_ref = torch.tensor(list(ref.image.tobytes()), dtype=torch.float32)
    assert (img - img_ref).abs().mean() < 255 * BOUNDS[fmt]


def test_quantize_then_group_offload(diffusers_flux2_folder, host):
    """Composed with group-offload (either order in the list), the DiT is quantised first, so the streamed
    groups hold the int8 codes and no float block weights, and the image is that of ``quantize`` alone."""
    options = {"quantize": {"format": "int8"}}
    _, alone = _run(diffusers_flux2_folder, host, "flux2", {"strategy": "quantize", **options})
    for strategy in ("quantize+group-offload", "group-offload+quantize"):
        model, result = _run(diffusers_flux2_folder, host, "flux2", {"strategy": strategy, **options})
        assert torch.equal(result.latents, alone.latents)
        assert model.memory.load_device("transformer", "cuda") == torch.device("cpu")  # group-offload's
        offload = next(p for p in model.memory.strategies if isinstance(p, GroupOffload))
        quant = next(p for p in model.memory.strategies if isinstance(p, Quantize))
        layers = [m for m in model.transformer.modules() if isinstance(m, QuantLinear)]
        grouped = {id(t) for g in offload.groups for t in g.tensors}
        assert all(id(m.codes) in grouped and id(m.scale) in grouped for m in layers)
        assert sum(t.dtype == torch.int8 for g in offload.groups for t in g.tensors) == quant.stats["layers"]
        assert all(t.dim() < 2 or t.dtype == torch.int8 for g in offload.groups for t in g.tensors)
        assert offload.stats["onloads"] == offload.stats["offloads"] == 2 * len(offload.groups)
        # the bytes streamed per step are the quantised ones: codes + scales + norms
        per_pass = sum(g.nbytes for g in offload.groups)
        assert per_pass < quant.stats["bytes_before"] * 0.6


@pytest.mark.parametrize("fmt,ratio", [("int8", 1 / 2), pytest.param("fp8", 1 / 2, marks=FP8), ("nf4", 1 / 4)])
def test_quantized_bytes(diffusers_flux2_folder, host, fmt, ratio):
    """Bytes of the quantised weights over their bf16 bytes: codes take 1/2 (8-bit) or 1/4 (4-bit) exactly, plus
    float32 scales (one per row for 8-bit, one per group of 64 inputs for nf4). Checked on a DiT-sized layer
    (3072 x 3072: ratios 0.5007 and 0.2813) and on the tiny DiT, whose 32-wide rows make the scales weigh more."""
    layer = QuantLinear(nn.Linear(3072, 3072, bias=False).to(torch.bfloat16), fmt)
    bf16 = 3072 * 3072 * 2
    scales = 4 / (3072 if fmt != "nf4" else 64) / 2
    assert layer.nbytes / bf16 == pytest.approx(ratio + scales, rel=1e-9)
    assert layer.codes.nbytes == bf16 * ratio
    # the tiny DiT's rows are 32, 96 or 128 wide: groups of 32 need no padding
    options = {"format": fmt, "group_size": 32}
    model, _ = _run(diffusers_flux2_folder, host, "flux2", {"strategy": "quantize", "quantize": options})
    stats = model.memory.strategies[0].stats
    bf16 = stats["bytes_before"] // 2  # the tiny DiT is float32
    codes = sum(m.codes.nbytes for m in model.transformer.modules() if isinstance(m, QuantLinear))
    print(f"\n{fmt}: tiny DiT block weights {stats['bytes_after']} bytes / bf16 {bf16} = {stats['bytes_after'] / bf16:.3f}")
    assert codes / bf16 == ratio
    assert stats["bytes_after"] < bf16 * (ratio + 0.07)


@pytest.mark.parametrize("fmt,bound", [("int8", 0.01), pytest.param("fp8", 0.03, marks=FP8), ("nf4", 0.11)])
def test_dequantized_weights(fmt, bound):
    """Dequantisation error of a normal weight (relative Frobenius norm), any row width (nf4 pads rows to whole
    groups), zero rows exact, the original dtype kept, and forward = F.linear with the dequantised weight."""
    torch.manual_seed(0)
    linear = nn.Linear(100, 48).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.normal_()
        linear.weight[3] = 0
    layer = QuantLinear(linear, fmt, group_size=32)
    w = layer.weight
    assert w.shape == linear.weight.shape and w.dtype == torch.bfloat16
    assert _rel(w, linear.weight) < bound
    assert torch.equal(w[3], torch.zeros(100, dtype=torch.bfloat16))
    x = torch.randn(2, 5, 100, dtype=torch.bfloat16)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w, linear.bias))
    assert layer.bias is linear.bias


def test_nf4_codes_round_trip():
    """Each nf4 value is the nearest of the 16 levels times its group's absmax."""
    from fluxframe.plugins.memory.quantize import NF4_LEVELS

    w = NF4_LEVELS.repeat(2, 4) * torch.tensor([[2.0], [0.5]])  # rows of 64 = one group each
    codes, scale = quantize_weight(w, "nf4", 64)
    assert codes.dtype == torch.uint8 and codes.numel() == w.numel() // 2
    assert torch.equal(scale, torch.tensor([2.0, 0.5]))
    linear = nn.Linear(64, 2, bias=False)
    linear.weight.data = w
    assert torch.equal(QuantLinear(linear, "nf4", 64).weight, w)


def test_quantize_config_errors(diffusers_flux2_folder, host):
    def check(options):
        data = {"model": {"family": "flux2", "path": str(diffusers_flux2_folder), "dtype": "float32",
                          "device": "cpu"}, "memory": {"strategy": "quantize", "quantize": options}}
        return api.load(api.parse_config(data), host=host)

    with pytest.raises(ConfigError) as err:
        check({"format": "int4"})
    assert err.value.key == "memory.quantize.format"
    with pytest.raises(ConfigError) as err:
        check({"format": "nf4", "group_size": 33})
    assert err.value.key == "memory.quantize.group_size"
    with pytest.raises(ConfigError) as err:
        check({"bits": 8})
    assert err.value.key == "memory.quantize.bits"
    with pytest.raises(ValueError, match="double_blocks"):
        Quantize().place("transformer", nn.Sequential(nn.Linear(2, 2)), "cpu")


def _watch_float_linears(strategy, counts):
    """Wrap ``strategy.while_loading`` so that after every loaded key ``counts`` gets the number of block
    linears still holding a full-precision (loaded, not yet quantised) weight."""
    from fluxframe.plugins.memory.quantize import _block_linears

    inner = strategy.while_loading

    def while_loading(component, module):
        hook = inner(component, module)
        if hook is None:
            return None

        def loaded(key):
            hook(key)
            counts.append(sum(not linear.weight.is_meta for _, _, linear in _block_linears(module)))

        return loaded

    strategy.while_loading = while_loading
    return strategy


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
@pytest.mark.parametrize("family", ["flux2", "flex2"])
def test_quantized_while_loading(diffusers_flux2_folder, flux1_folder, family, fmt):
    """The family loaders quantise each block linear the moment its tensors are read (the ``while_loading``
    hook), so at no point is more than one full-precision block weight alive; the codes and scales are exactly
    those of quantising a fully loaded DiT, and ``place`` finds nothing left to do."""
    from fluxframe.plugins.flex2.family import load_transformer as load_flex2
    from fluxframe.plugins.flex2.family import locate
    from fluxframe.plugins.flux2.family import load_transformer as load_flux2
    from fluxframe.plugins.memory.quantize import quantize_blocks

    if family == "flux2":
        def load(memory=None):
            return load_flux2(diffusers_flux2_folder / "transformer", torch.float32, torch.device("cpu"), memory)
    else:
        source, _ = locate(flux1_folder)

        def load(memory=None):
            return load_flex2(source, torch.float32, torch.device("cpu"), memory)

    counts: list[int] = []
    strategy = _watch_float_linears(Quantize(fmt, group_size=32), counts)
    streamed = load(strategy)
    quantized = {k: m for k, m in streamed.named_modules() if isinstance(m, QuantLinear)}
    assert quantized and strategy.stats["layers"] == len(quantized)
    assert max(counts) <= 1 and counts[-1] == 0, counts  # a Flux.1 linear waits for its bias, then goes
    stats = dict(strategy.stats)
    assert strategy.place("transformer", streamed, "cpu") is streamed
    assert strategy.stats == stats  # nothing left for place to quantise

    after = load()
    expected = quantize_blocks(after, fmt, 32)
    assert expected == stats
    for name, module in after.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(module.codes, quantized[name].codes) and torch.equal(module.scale, quantized[name].scale)
    assert all(torch.equal(a, b) for a, b in zip(after.state_dict().values(), streamed.state_dict().values()))


def test_quantize_without_the_hook_still_quantizes(diffusers_flux2_folder):
    """A model family that does not call ``while_loading`` gets its DiT quantised by ``place``, as before."""
    from fluxframe.plugins.flux2.family import load_transformer

    strategy = Quantize("int8")
    dit = strategy.place("transformer", load_transformer(diffusers_flux2_folder / "transformer", torch.float32,
                                                         torch.device("cpu")), "cpu")
    layers = [m for m in dit.modules() if isinstance(m, QuantLinear)]
    assert layers and strategy.stats["layers"] == len(layers)


@pytest.mark.parametrize("fmt", ["int8", pytest.param("fp8", marks=FP8), "nf4"])
def test_quantized_in_row_bands_is_exact(fmt, monkeypatch):
    """Large layers are quantised in bands of rows (small float32 temporaries); the codes and scales are exactly
    those of the whole layer at once, uneven last band included."""
    from fluxframe.plugins.memory import quantize

    w = torch.randn(37, 96, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    whole = quantize.quantize_weight(w, fmt, 32)
    monkeypatch.setattr(quantize, "_CHUNK_ELEMENTS", 5 * 96)  # bands of 5 rows: 7 full, one of 2
    banded = quantize.quantize_weight(w, fmt, 32)
    assert whole[0].shape == banded[0].shape and whole[1].shape == banded[1].shape
    assert torch.equal(whole[0].view(torch.uint8), banded[0].view(torch.uint8))
    assert torch.equal(whole[1], banded[1])
