"""Memory strategies: every one gives the same image as ``none`` on tiny FLUX.2 and Flux.1 checkpoints (bit-identical:
offloading only moves weights; tiling runs untiled when the image fits one tile), the offloading hooks really
move weights (counted, and the tensors point back at their host copies afterwards), composition and config
errors. The CUDA side-stream path runs only where CUDA is available."""

from __future__ import annotations

import pytest
import torch
from flex2_helpers import build_flux_folder

from fluxframe import api
from fluxframe.errors import ConfigError, PluginError
from fluxframe.plugins.memory import GroupOffload, ModelOffload, VaeTiling
from fluxframe.plugins.memory.tiling import tile_starts, tiled

PROMPT = "a small red square on a blue background"


def _config(folder, family="flux2", memory=None):
    data = {
        "model": {"family": family, "path": str(folder), "dtype": "float32", "device": "cpu"},
        "sampler": {"steps": 2, "guidance": 3.5, "width": 64, "height": 48},
    }
    if memory is not None:
        data["memory"] = memory
    return api.parse_config(data)


def _run(folder, host, family="flux2", memory=None):
    pipeline = api.load(_config(folder, family, memory), host=host)
    result = pipeline.generate(api.GenerationRequest(prompt=PROMPT, seed=3, width=64, height=48, steps=2), write=False)
    return pipeline.stages.model.memory, result


@pytest.fixture(scope="module")
def flux1_folder(tmp_path_factory):
    return build_flux_folder(tmp_path_factory.mktemp("flux1-memory"), in_channels=64)


@pytest.fixture(scope="module")
def reference(diffusers_flux2_folder):
    """The ``none`` result per family, computed once."""
    return {}


def _reference(reference, folder, host, family):
    if family not in reference:
        reference[family] = _run(folder, host, family)[1]
    return reference[family]


def _assert_same(result, ref):
    assert torch.equal(result.latents, ref.latents)
    assert result.image.tobytes() == ref.image.tobytes()


STRATEGIES = [
    {"strategy": "model-offload"},
    {"strategy": "group-offload"},
    {"strategy": "group-offload", "group-offload": {"blocks_per_group": 2, "prefetch": False}},
    {"strategy": "group-offload", "group-offload": {"resident_blocks": 1}},
    {"strategy": "vae-tiling"},
    # the smallest tile that holds the whole 64 x 48 image (flex2's tiny autoencoder downsamples only 2x: 32 x 24)
    {"strategy": "group-offload+vae-tiling", "vae-tiling": {"tile_size": 32, "overlap": 8}},
    {"strategy": ["group-offload", "model-offload", "vae-tiling"], "group-offload": {"blocks_per_group": 3}},
]


@pytest.mark.parametrize("memory", STRATEGIES, ids=lambda m: str(m["strategy"]) + ("+opts" if len(m) > 1 else ""))
@pytest.mark.parametrize("family", ["flux2", "flex2"])
def test_same_image_as_none(diffusers_flux2_folder, flux1_folder, host, reference, family, memory):
    folder = diffusers_flux2_folder if family == "flux2" else flux1_folder
    ref = _reference(reference, folder, host, family)
    strategy, result = _run(folder, host, family, memory)
    _assert_same(result, ref)
    parts = getattr(strategy, "strategies", [strategy])
    for part in parts:
        if isinstance(part, GroupOffload):
            # every group onloaded once per transformer forward (2 steps; flux2's tiny DiT has 1+2 blocks,
            # flex2's 1+1), each prefetched one counted once, and all back on their host copies now
            assert part.stats["onloads"] == part.stats["offloads"] == 2 * len(part.groups)
            # (with resident blocks, the first streamed group is prefetched too, while they run)
            prefetched = len(part.groups) - (0 if part.resident_blocks else 1)
            assert part.stats["prefetches"] == (2 * prefetched if part.prefetch else 0)
            for group in part.groups:
                assert not group.on_device
                assert all(t.data_ptr() == h.data_ptr() for t, h in zip(group.tensors, group.host))
        if isinstance(part, ModelOffload):
            handled = [c for c in ("text_encoder", "transformer", "vae")
                       if not any(p.placement and p.handles(c) for p in parts[: parts.index(part)])]
            # each handled component copied in once (the DiT stays for both steps), then pushed out by the next
            assert part.stats["onloads"] == len(handled)
            assert part.stats["offloads"] == len(handled) - 1
        if isinstance(part, VaeTiling):
            assert part.stats["tiles"] >= 1




def test_model_offload_moves_real_copies(diffusers_flux2_folder, host):
    """On the CPU the "device copy" is a second tensor: the DiT's weights change storage when it is onloaded and
    point back at the (unchanged) host copy when the VAE pushes it out."""
    pipeline = api.load(_config(diffusers_flux2_folder, memory={"strategy": "model-offload"}), host=host)
    model, memory = pipeline.stages.model, pipeline.stages.model.memory
    weight = model.transformer.img_in.weight
    host_ptr = weight.data_ptr()
    memory.before_use("transformer", model.transformer, model.device)
    assert weight.data_ptr() != host_ptr and memory.resident is memory.groups[id(model.transformer)]
    memory.before_use("vae", model.vae, model.device)
    assert weight.data_ptr() == host_ptr
    assert memory.stats == {"onloads": 2, "offloads": 1, "prefetches": 0,
                            "onloaded_bytes": memory.stats["onloaded_bytes"]}
    memory.offload_all()
    assert memory.resident is None


def test_group_offload_streams_during_forward(diffusers_flux2_folder, host):
    """While a block runs, its group is on the "device" (a separate copy) and groups that are not current or
    prefetched are not."""
    pipeline = api.load(_config(diffusers_flux2_folder, memory={"strategy": "group-offload"}), host=host)
    model, memory = pipeline.stages.model, pipeline.stages.model.memory
    blocks = [*model.transformer.double_blocks, *model.transformer.single_blocks]
    n = len(memory.groups)
    assert n == len(blocks) >= 3
    seen = []

    def probe(index):
        def hook(_module, _args):
            seen.append([g.on_device for g in memory.groups])
            group = memory.groups[index]
            assert all(t.data_ptr() != h.data_ptr() for t, h in zip(group.tensors, group.host))
        return hook

    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(probe(i))  # registered after the strategy's: sees the onloaded state
    pipeline.generate(api.GenerationRequest(prompt=PROMPT, seed=0, width=32, height=32, steps=1), write=False)
    # block i runs with its own group and the prefetched next one on the device, no other
    assert seen == [[j in (i, i + 1) for j in range(n)] for i in range(n)]


def test_group_offload_keeps_resident_blocks_on_the_device(diffusers_flux2_folder, host):
    """``resident_blocks = 1``: the first block is moved to the device once and belongs to no streamed group;
    the first streamed group is already copied (prefetched) when the resident block starts."""
    memory = {"strategy": "group-offload", "group-offload": {"resident_blocks": 1}}
    pipeline = api.load(_config(diffusers_flux2_folder, memory=memory), host=host)
    model, offload = pipeline.stages.model, pipeline.stages.model.memory
    blocks = [*model.transformer.double_blocks, *model.transformer.single_blocks]
    assert len(offload.groups) == len(blocks) - 1
    streamed = {id(t) for g in offload.groups for t in g.tensors}
    assert not any(id(p) in streamed for p in blocks[0].parameters())
    assert all(id(p) in streamed for b in blocks[1:] for p in b.parameters())
    seen = []
    blocks[0].register_forward_pre_hook(lambda _m, _a: seen.append([g.on_device for g in offload.groups]))
    pipeline.generate(api.GenerationRequest(prompt=PROMPT, seed=0, width=32, height=32, steps=1), write=False)
    assert seen == [[True] + [False] * (len(offload.groups) - 1)]
    assert offload.stats["onloads"] == len(offload.groups)  # the resident block is never copied again


def test_tile_layout():
    assert tile_starts(10, 16, 4) == [0]
    assert tile_starts(16, 16, 4) == [0]
    assert tile_starts(40, 16, 4) == [0, 12, 24]
    assert tile_starts(30, 16, 4) == [0, 12, 14]  # the last tile pulled back to end at the border


def test_tiled_blending_is_exact_for_a_local_function():
    """A pixel-local function (nearest upsampling x8, times 2) tiled gives the untiled result: the blend weights
    of overlapping tiles sum to one everywhere and every output pixel is covered."""
    x = torch.randn(2, 4, 37, 53, dtype=torch.float64)

    def fn(t):
        return torch.nn.functional.interpolate(t, scale_factor=8, mode="nearest") * 2

    out = tiled(fn, x, tile=16, overlap=4, in_scale=1, out_scale=8)
    assert out.shape == (2, 4, 296, 424)
    torch.testing.assert_close(out, fn(x), rtol=0, atol=1e-12)
    down = tiled(lambda t: t[..., ::8, ::8], fn(x), tile=16, overlap=8, in_scale=8, out_scale=1)
    torch.testing.assert_close(down, 2 * x, rtol=0, atol=1e-12)


# Measured on the tiny random autoencoders of the test checkpoints (float32, a 192 x 320 random image; FLUX.2's
# downsamples 8x: 24 x 40 latent, 16-pixel tiles with 4 overlap = 2 x 3 tiles; Flux.1's test one 2x: 96 x 160,
# 48-pixel tiles with 12 overlap = 3 x 4 tiles): see MEASURED. The difference is not rounding: the mid-block
# attention and the group norms see one tile instead of the whole image, which real autoencoders tolerate
# better than these random ones. The bounds leave headroom over the measurements.
# Measured (decoded: mean |diff| / mean |untiled|, max |diff| / max |untiled|; encoded latents: mean relative):
# flux2 0.42, 0.37, 0.11 -- flex2 0.077, 0.11, 0.047. The random tiny FLUX.2 autoencoder is a worst case
# (its global mid-block attention dominates); the blend itself is checked exactly by the test above.
BOUNDS = {"flux2": (0.6, 0.6, 0.2), "flex2": (0.15, 0.25, 0.1)}
TILED = {"flux2": (16, 4), "flex2": (48, 12)}


@pytest.mark.parametrize("family", ["flux2", "flex2"])
def test_tiled_vae_close_to_untiled(diffusers_flux2_folder, flux1_folder, host, family):
    from fluxframe.plugins.memory.tiling import _scale

    folder = diffusers_flux2_folder if family == "flux2" else flux1_folder
    model = api.load(_config(folder, family), host=host).stages.model
    torch.manual_seed(0)
    images = torch.rand(1, 3, 192, 320) * 2 - 1
    with torch.inference_mode():
        plain_latents = model.encode_image(images)
        plain = model.decode(plain_latents)
        tile, overlap = TILED[family]
        tiling = VaeTiling(tile_size=tile, overlap=overlap)
        tiling.place("vae", model.vae, model.device)
        latents = model.encode_image(images)
        decoded = model.decode(plain_latents)
    scale = _scale(model.vae.decoder)
    per_op = len(tile_starts(192 // scale, tile, overlap)) * len(tile_starts(320 // scale, tile, overlap))
    assert per_op > 1 and tiling.stats["tiles"] == 2 * per_op
    assert decoded.shape == plain.shape and latents.tokens.shape == plain_latents.tokens.shape
    diff = (decoded - plain).abs()
    ldiff = (latents.tokens - plain_latents.tokens).abs()
    rel_mean = (diff.mean() / plain.abs().mean()).item()
    rel_max = (diff.max() / plain.abs().max()).item()
    enc_rel_mean = (ldiff.mean() / plain_latents.tokens.abs().mean()).item()
    bound = BOUNDS[family]
    assert rel_mean < bound[0] and rel_max < bound[1] and enc_rel_mean < bound[2], (rel_mean, rel_max, enc_rel_mean)


def test_memory_config_errors(diffusers_flux2_folder, host):
    def check(memory):
        return api.load(_config(diffusers_flux2_folder, memory=memory), host=host)

    with pytest.raises(PluginError, match="'page-to-disk'"):
        check({"strategy": "group-offload+page-to-disk"})
    with pytest.raises(ConfigError) as err:
        check({"strategy": "group-offload", "group-offload": {"blocks": 2}})
    assert err.value.key == "memory.group-offload.blocks"
    with pytest.raises(ConfigError) as err:
        check({"strategy": "group-offload", "group-offload": {"blocks_per_group": 0}})
    assert err.value.key == "memory.group-offload.blocks_per_group"
    with pytest.raises(ConfigError) as err:
        check({"strategy": "group-offload", "group-offload": {"resident_blocks": -1}})
    assert err.value.key == "memory.group-offload.resident_blocks"
    with pytest.raises(ConfigError) as err:
        check({"strategy": "none", "vae-tiling": {"tile_size": 32}})
    assert err.value.key == "memory.vae-tiling"
    with pytest.raises(ConfigError) as err:
        check({"strategy": "model-offload+group-offload"})  # model-offload already places the DiT
    assert err.value.key == "memory.strategy" and "group-offload" in str(err.value)
    with pytest.raises(ConfigError, match="memory.strategy"):
        check({"strategy": ["vae-tiling", "vae-tiling"]})
    with pytest.raises(ConfigError) as err:
        check({"strategy": "vae-tiling", "vae-tiling": {"tile_size": 32, "overlap": 20}})
    assert err.value.key == "memory.vae-tiling.overlap"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: side-stream prefetch from pinned memory")
@pytest.mark.parametrize("memory", [{"strategy": "group-offload"}, {"strategy": ["group-offload", "model-offload"]}])
def test_cuda_offload_same_image(diffusers_flux2_folder, host, memory):
    def run(mem):
        data = {"model": {"family": "flux2", "path": str(diffusers_flux2_folder), "dtype": "float32",
                          "device": "cuda"}}
        if mem:
            data["memory"] = mem
        pipeline = api.load(api.parse_config(data), host=host)
        request = api.GenerationRequest(prompt=PROMPT, seed=3, width=64, height=48, steps=2)
        return pipeline.stages.model.memory, pipeline.generate(request, write=False)

    ref = run(None)[1]
    strategy, result = run(memory)
    _assert_same(result, ref)
    group = next(p for p in getattr(strategy, "strategies", [strategy]) if isinstance(p, GroupOffload))
    assert group._stream is not None and all(h.is_pinned() for g in group.groups for h in g.host)
