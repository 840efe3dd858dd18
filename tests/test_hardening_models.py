"""What a broken or hostile checkpoint can get wrong in its model files (issue 22, classes 7 and 8).

Absurd sizes in any config.json the families read, or in a single file's header (10^7 blocks, 10^6 autoencoder
levels, zero, negative, boolean or fractional widths, a text encoder of 10^7 layers), are refused with a
CheckpointError naming the file and the key before anything is built: the ``nothing_built`` fixture makes every
model class (ours and transformers') fail the test if it is reached, so a refusal that came after building
cannot pass. A truncated weight file (a transformer shard, the vae, a text encoder, a single file, a shard listed
in an index) is refused by ``check`` (so by ``config check`` and generate's start-up) from its header alone:
``no_tensor_read`` fails the test if any tensor data is read. ``limits_for`` gives exactly the loaded model's
limits, from config files alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from flex2_helpers import build_flux_folder
from safetensors.torch import load_file, save_file

from fluxframe import api
from fluxframe.cli import main
from fluxframe.core.checkpoint import SafetensorsCheckpoint, save_sharded
from fluxframe.errors import CheckpointError
from fluxframe.plugins.common import bounds
from fluxframe.plugins.flex2 import family as flex2_family
from fluxframe.plugins.flex2.family import Flex2
from fluxframe.plugins.flux2 import family as flux2_family
from fluxframe.plugins.flux2 import single_file
from fluxframe.plugins.flux2.autoencoder import AutoencoderConfig, Flux2Autoencoder
from fluxframe.plugins.flux2.family import Flux2
from fluxframe.plugins.flux2.transformer import Flux2Transformer, TransformerConfig
from fluxframe.plugins.memory import KeepOnDevice

DEMO = Path(__file__).resolve().parent.parent / "models" / "shapes-v1"
CPU = torch.device("cpu")


def _config(path, family="flux2", **model):
    return api.parse_config({"model": {"family": family, "path": str(path), "dtype": "float32", "device": "cpu",
                                       **model}, "sampler": {"steps": 1, "width": 64, "height": 64}})


def _edit(file: Path, **changes) -> Path:
    data = json.loads(file.read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        target = data
        for p in parents:
            target = target[p]
        target[last] = value
    file.write_text(json.dumps(data))
    return file


def _truncate(file: Path, keep: int | None = None) -> Path:
    size = file.stat().st_size
    with open(file, "r+b") as fh:
        fh.truncate(size // 2 if keep is None else keep)
    return file


def _refused(info, file: Path, key: str | None = None) -> None:
    """The error names the file (and the key), in its attributes and on its one line."""
    err = info.value
    assert err.file == str(file) and str(file) in str(err) and "\n" not in str(err)
    if key is not None:
        assert err.key == key and repr(key) in str(err)


@pytest.fixture
def nothing_built(monkeypatch):
    """Any model being built, or transformers reading a config, fails the test: refusals must come first."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built (or a config handed to transformers) before the sizes were checked")

    for module in (flux2_family, single_file):
        monkeypatch.setattr(module, "Flux2Transformer", refuse)
        monkeypatch.setattr(module, "Flux2Autoencoder", refuse)
    monkeypatch.setattr(flex2_family, "Flux1Transformer", refuse)
    monkeypatch.setattr(flex2_family, "Flux1Autoencoder", refuse)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    for name in ("Qwen3ForCausalLM", "Mistral3ForConditionalGeneration", "T5EncoderModel", "CLIPTextModel"):
        monkeypatch.setattr(transformers, name, type(name, (), {"from_pretrained": staticmethod(refuse)}))


@pytest.fixture
def no_tensor_read(monkeypatch):
    def refuse(self, key):
        raise AssertionError(f"tensor {key!r} was read: a truncated file must be found from its header")

    monkeypatch.setattr(SafetensorsCheckpoint, "get", refuse)


@pytest.fixture
def demo(tmp_path):
    """A private copy of the shipped demo model (FLUX.2 klein layout, Qwen3 text encoder), free to break."""
    return shutil.copytree(DEMO, tmp_path / "demo")


@pytest.fixture(scope="module")
def flex2_source(tmp_path_factory):
    return build_flux_folder(tmp_path_factory.mktemp("flex2"), in_channels=196)


@pytest.fixture
def flex2(tmp_path, flex2_source):
    return shutil.copytree(flex2_source, tmp_path / "flex2")


TINY_T = TransformerConfig(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
                           joint_attention_dim=96, axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False)
TINY_V = AutoencoderConfig(block_out_channels=(32, 32, 32), layers_per_block=1, norm_num_groups=32)


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """(DiT file, ae file) of a tiny FLUX.2 in the original single-file layout; the demo model is its text
    encoder folder."""
    root = tmp_path_factory.mktemp("single")
    torch.manual_seed(0)
    dit, ae = root / "flux2-tiny.safetensors", root / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in Flux2Transformer(TINY_T).state_dict().items()}, dit)
    vae = Flux2Autoencoder(TINY_V).state_dict()
    save_file({k: v.contiguous() for k, v in single_file.vae_to_original(vae, TINY_V).items()}, ae)
    return dit, ae


@pytest.fixture
def singles(tmp_path, single_files):
    return tuple(Path(shutil.copy(f, tmp_path / f.name)) for f in single_files)


# -- absurd sizes in a config.json --------------------------------------------------------------------------------

TRANSFORMER_CASES = [
    ("num_layers", 10**7), ("num_single_layers", 10**6), ("num_layers", -1), ("num_layers", 2.0),
    ("num_layers", True), ("num_attention_heads", 10**6), ("num_attention_heads", 0), ("attention_head_dim", -48),
    ("in_channels", 0), ("in_channels", False), ("joint_attention_dim", 10**9), ("joint_attention_dim", 96.5),
    ("out_channels", -128), ("timestep_guidance_channels", 10**8), ("mlp_ratio", 1e9), ("mlp_ratio", -3.0),
    ("mlp_ratio", float("nan")), ("eps", 0), ("rope_theta", float("inf")), ("axes_dims_rope", [12] * 10**6),
    ("axes_dims_rope", [12, 12, 12, True]), ("axes_dims_rope", []), ("guidance_embeds", 1),
]


@pytest.mark.parametrize("key,value", TRANSFORMER_CASES, ids=[f"{k}={str(v)[:12]}" for k, v in TRANSFORMER_CASES])
def test_absurd_flux2_transformer_config_is_refused_before_anything_is_built(demo, nothing_built, key, value):
    cfg = _edit(demo / "transformer" / "config.json", **{key: value})
    with pytest.raises(CheckpointError) as info:
        Flux2.check(_config(demo))
    _refused(info, cfg, key)
    with pytest.raises(CheckpointError) as info:  # the loading path refuses it on its own too
        flux2_family.load_transformer(demo / "transformer", torch.float32, CPU)
    _refused(info, cfg, key)
    with pytest.raises(CheckpointError) as info:
        Flux2.limits_for(_config(demo))
    _refused(info, cfg, key)


def test_sizes_each_in_bounds_but_absurd_together_are_refused(demo, nothing_built):
    cfg = _edit(demo / "transformer" / "config.json", num_attention_heads=1024, attention_head_dim=128,
                axes_dims_rope=[32] * 4)  # hidden 131072
    with pytest.raises(CheckpointError, match="hidden size of 131072") as info:
        Flux2.check(_config(demo))
    _refused(info, cfg, "num_attention_heads")
    cfg = _edit(cfg, num_layers=1000, num_single_layers=1000, num_attention_heads=512)  # ~1.7e14 parameters
    with pytest.raises(CheckpointError, match="parameters") as info:
        Flux2.check(_config(demo))
    _refused(info, cfg, "num_layers")
    vae = _edit(demo / "vae" / "config.json", block_out_channels=[65536] * 16, decoder_block_out_channels=None,
                down_block_types=["DownEncoderBlock2D"] * 16, up_block_types=["UpDecoderBlock2D"] * 16,
                layers_per_block=64)
    with pytest.raises(CheckpointError, match="parameters") as info:
        flux2_family.load_autoencoder(demo / "vae", torch.float32, CPU)
    _refused(info, vae, "block_out_channels")


AUTOENCODER_CASES = [
    ("layers_per_block", 10**6), ("layers_per_block", 0), ("layers_per_block", 1.0),
    ("block_out_channels", [32] * 10**6), ("block_out_channels", [8, 16, 10**7, 64, 128]),
    ("decoder_block_out_channels", [16] * 10**6), ("latent_channels", 10**6), ("latent_channels", -32),
    ("norm_num_groups", True), ("in_channels", 10**8), ("patch_size", [10**4, 10**4]),
]


@pytest.mark.parametrize("key,value", AUTOENCODER_CASES, ids=[f"{k}={str(v)[:12]}" for k, v in AUTOENCODER_CASES])
def test_absurd_autoencoder_config_is_refused_before_anything_is_built(demo, flex2, nothing_built, key, value):
    cfg = _edit(demo / "vae" / "config.json", **{key: value})
    with pytest.raises(CheckpointError) as info:
        Flux2.check(_config(demo))
    _refused(info, cfg, key)
    with pytest.raises(CheckpointError) as info:
        flux2_family.load_autoencoder(demo / "vae", torch.float32, CPU)
    _refused(info, cfg, key)
    cfg = _edit(flex2 / "vae" / "config.json", **{key: value})  # the Flux.1 autoencoder reads the same keys
    for call in (lambda: Flex2.check(_config(flex2, "flex2")), lambda: Flex2.limits_for(_config(flex2, "flex2")),
                 lambda: flex2_family.load_autoencoder(flex2 / "vae", torch.float32, CPU)):
        with pytest.raises(CheckpointError) as info:
            call()
        _refused(info, cfg, key)


def test_absurd_autoencoder_levels_with_matching_block_types(demo, nothing_built):
    n = 10**5  # a million would make the file too large to be read at all (test_oversized_config_file...)
    cfg = _edit(demo / "vae" / "config.json", block_out_channels=[32] * n, decoder_block_out_channels=None,
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)
    with pytest.raises(CheckpointError, match="100000 entries") as info:
        Flux2.check(_config(demo))
    _refused(info, cfg, "block_out_channels")


@pytest.mark.parametrize("key,value", [("num_layers", 10**7), ("num_single_layers", 10**6), ("num_layers", 0.5),
                                       ("num_attention_heads", True), ("pooled_projection_dim", -768),
                                       ("axes_dims_rope", [4] * 10**6)])
def test_absurd_flex2_transformer_config_is_refused(flex2, nothing_built, key, value):
    cfg = _edit(flex2 / "transformer" / "config.json", **{key: value})
    with pytest.raises(CheckpointError) as info:
        Flex2.check(_config(flex2, "flex2"))
    _refused(info, cfg, key)
    with pytest.raises(CheckpointError) as info:
        flex2_family.load_transformer(flex2 / "transformer", torch.float32, CPU)
    _refused(info, cfg, key)


TEXT_CASES = [
    ("num_hidden_layers", 10**7), ("hidden_size", -5), ("hidden_size", 10**6), ("vocab_size", 10**9),
    ("intermediate_size", True), ("num_attention_heads", 2.5), ("num_key_value_heads", 0),
    ("max_position_embeddings", 10**12),
]


@pytest.mark.parametrize("key,value", TEXT_CASES, ids=[f"{k}={v}" for k, v in TEXT_CASES])
def test_absurd_text_encoder_config_is_refused_before_transformers_reads_it(demo, nothing_built, key, value):
    from fluxframe.plugins.flux2.qwen3_encoder import Qwen3PromptEncoder

    cfg = _edit(demo / "text_encoder" / "config.json", **{key: value})
    calls = (lambda: Flux2.check(_config(demo)),
             lambda: Qwen3PromptEncoder.from_pretrained(demo / "text_encoder", demo / "tokenizer", dtype=torch.float32,
                                                        device=CPU),
             lambda: flux2_family.prompt_encoder_identity(demo))  # what reading an embeddings file asks for
    for call in calls:
        with pytest.raises(CheckpointError) as info:
            call()
        _refused(info, cfg, key)


def test_nested_and_combined_text_encoder_sizes(demo, flex2, nothing_built):
    from fluxframe.plugins.flex2.text_encoder import _model

    cfg = _edit(demo / "text_encoder" / "config.json", text_config={"num_hidden_layers": 10**7})  # Mistral-3 style
    with pytest.raises(CheckpointError) as info:
        Flux2.check(_config(demo))
    _refused(info, cfg, "text_config.num_hidden_layers")
    cfg = _edit(cfg, text_config={}, num_hidden_layers=1000, hidden_size=65536, intermediate_size=262144)
    with pytest.raises(CheckpointError, match="parameters") as info:
        Flux2.check(_config(demo))
    _refused(info, cfg, "num_hidden_layers")
    for folder, key in (("text_encoder_2", "d_model"), ("text_encoder", "num_hidden_layers")):  # T5, CLIP
        cfg = _edit(flex2 / folder / "config.json", **{key: 10**7})
        with pytest.raises(CheckpointError) as info:
            Flex2.check(_config(flex2, "flex2"))
        _refused(info, cfg, key)
        with pytest.raises(CheckpointError) as info:  # the loading path, before transformers sees the config
            _model(None, flex2 / folder, "t5|clip_text_model", torch.float32, CPU)
        _refused(info, cfg, key)
        _edit(cfg, **{key: 32})


def test_oversized_config_file_is_not_parsed(demo):
    cfg = demo / "transformer" / "config.json"
    cfg.write_text('{"num_layers": [' + "1," * (bounds.MAX_CONFIG_BYTES // 2) + "1]}")
    with pytest.raises(CheckpointError, match="over") as info:
        Flux2.check(_config(demo))
    _refused(info, cfg)


# -- absurd sizes in a single file's header ---------------------------------------------------------------------

def test_absurd_single_file_headers_are_refused(singles, nothing_built, tmp_path):
    dit, ae = singles
    sane = Path(shutil.copy(dit, tmp_path / "sane.safetensors"))
    state = load_file(dit)
    for n in range(bounds.MAX_BLOCKS + 1):  # one double block over the bound, each a tiny tensor in the header
        state[f"double_blocks.{n}.img_attn.norm.key_norm.scale"] = torch.zeros(1)
    save_file(state, dit)
    with pytest.raises(CheckpointError, match="1001 is out of bounds") as info:
        Flux2.check(_config(dit, vae=str(ae), text_encoder=str(DEMO)))
    _refused(info, dit, "double_blocks")
    with pytest.raises(CheckpointError) as info:
        single_file.load_transformer(dit, torch.float32, CPU)
    _refused(info, dit, "double_blocks")

    # A hidden size of 10^6 in the header: a sparse file, so the claimed 128 MB takes no disk.
    huge = tmp_path / "huge.safetensors"
    shapes = {"img_in.weight": [10**6, 128], "txt_in.weight": [64, 96], "time_in.in_layer.weight": [64, 256],
              "final_layer.linear.weight": [128, 64], "single_blocks.0.norm.query_norm.scale": [32],
              "single_blocks.0.linear1.weight": [576, 64]}
    _write_header_only(huge, shapes)
    with pytest.raises(CheckpointError) as info:
        Flux2.check(_config(huge, vae=str(ae), text_encoder=str(DEMO)))
    _refused(info, huge, "img_in.weight")

    levels = load_file(ae)
    for n in range(bounds.MAX_LEVELS + 1):
        levels[f"encoder.down.{n}.block.0.conv1.bias"] = torch.zeros(1)
    save_file(levels, ae)
    for call in (lambda: Flux2.check(_config(sane, vae=str(ae), text_encoder=str(DEMO))),
                 lambda: single_file.load_autoencoder(ae, torch.float32, CPU)):
        with pytest.raises(CheckpointError, match="17 is out of bounds") as info:
            call()
        _refused(info, ae, "encoder.down")


def _write_header_only(path: Path, shapes: dict[str, list[int]]) -> None:
    """A valid safetensors file (U8 tensors) whose data is a hole: as large as claimed, no disk used."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 1
        for d in shape:
            size *= d
        header[key] = {"dtype": "U8", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        fh.truncate(8 + len(raw) + offset)


@pytest.fixture(scope="module")
def flex2_original(flex2_source) -> dict:
    """The flex2 checkpoint's transformer in the original single-file layout (fluxframe's own key names)."""
    from fluxframe.plugins.flex2 import keymap
    from fluxframe.plugins.flex2.transformer import Flux1Config

    with SafetensorsCheckpoint.open(flex2_source / "transformer") as ckpt:
        state = {k: ckpt.get(k) for k in ckpt.keys()}
    config = Flux1Config.from_dict(json.loads((flex2_source / "transformer" / "config.json").read_text()))
    out = {}
    for ours, source in keymap.from_diffusers(config).items():
        out[ours] = state[source] if isinstance(source, str) else source[1]([state[k] for k in source[0]])
    return {k: v.contiguous() for k, v in out.items()}


def test_absurd_flex2_single_file_is_refused(flex2, flex2_original, nothing_built):
    file = flex2 / "flex2.safetensors"
    state = dict(flex2_original)
    for n in range(bounds.MAX_BLOCKS + 1):
        state[f"single_blocks.{n}.norm.key_norm.scale"] = torch.zeros(1)
    save_file(state, file, {"axes_dims_rope": "4,6,6"})
    for call in (lambda: Flex2.check(_config(file, "flex2")),
                 lambda: flex2_family.load_transformer(file, torch.float32, CPU)):
        with pytest.raises(CheckpointError) as info:
            call()
        _refused(info, file, "single_blocks")
    save_file(flex2_original, file, {"axes_dims_rope": "4,6,x"})
    with pytest.raises(CheckpointError) as info:
        Flex2.check(_config(file, "flex2"))
    _refused(info, file, "__metadata__")


# -- truncated weight files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder"])
@pytest.mark.parametrize("cut", ["half", "last byte"])
def test_truncated_weight_file_is_refused_by_check(demo, no_tensor_read, component, cut):
    (weights,) = (demo / component).glob("*.safetensors")
    _truncate(weights, None if cut == "half" else weights.stat().st_size - 1)
    with pytest.raises(CheckpointError, match="truncated") as info:
        Flux2.check(_config(demo))
    _refused(info, weights)
    assert info.value.key is not None  # the first tensor it cuts into


def test_truncated_shard_listed_in_an_index_is_refused(demo, no_tensor_read):
    sub = demo / "transformer"
    state = load_file(sub / "diffusion_pytorch_model.safetensors")
    files = save_sharded(state, sub, max_shard_bytes=4_000_000)
    assert len(files) > 2 and not (sub / "diffusion_pytorch_model.safetensors").exists()
    assert Flux2.check(_config(demo)) == []
    _truncate(files[1])
    with pytest.raises(CheckpointError, match="truncated") as info:
        Flux2.check(_config(demo))
    _refused(info, files[1])
    # the index itself, handed over as the weights: same answer
    from fluxframe.core.checkpoint import check_weight_files

    with pytest.raises(CheckpointError) as info:
        check_weight_files(sub / "diffusion_pytorch_model.safetensors.index.json")
    _refused(info, files[1])


def test_truncated_text_encoder_shard_is_refused(demo, no_tensor_read):
    te = demo / "text_encoder"
    files = save_sharded(load_file(te / "model.safetensors"), te, base_name="model", max_shard_bytes=300_000)
    assert len(files) > 1
    _truncate(files[-1])
    with pytest.raises(CheckpointError, match="truncated") as info:
        Flux2.check(_config(demo))
    _refused(info, files[-1])


@pytest.mark.parametrize("which", ["dit", "ae"])
def test_truncated_single_file_is_refused(singles, no_tensor_read, which):
    dit, ae = singles
    _truncate(dit if which == "dit" else ae)
    with pytest.raises(CheckpointError, match="truncated") as info:
        Flux2.check(_config(dit, vae=str(ae), text_encoder=str(DEMO)))
    _refused(info, dit if which == "dit" else ae)


def test_truncated_text_encoder_beside_single_file_is_refused(singles, demo, no_tensor_read):
    dit, ae = singles
    weights = _truncate(demo / "text_encoder" / "model.safetensors")
    with pytest.raises(CheckpointError, match="truncated") as info:
        Flux2.check(_config(dit, vae=str(ae), text_encoder=str(demo)))
    _refused(info, weights)


@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder", "text_encoder_2"])
def test_truncated_flex2_file_is_refused(flex2, no_tensor_read, component):
    (weights,) = (flex2 / component).glob("*.safetensors")
    _truncate(weights)
    with pytest.raises(CheckpointError, match="truncated") as info:
        Flex2.check(_config(flex2, "flex2"))
    _refused(info, weights)


def test_truncated_flex2_single_file_is_refused(flex2, flex2_original, no_tensor_read):
    file = flex2 / "flex2.safetensors"
    save_file(flex2_original, file, {"axes_dims_rope": "4,6,6"})
    assert Flex2.check(_config(file, "flex2")) == []
    _truncate(file)
    with pytest.raises(CheckpointError, match="truncated") as info:
        Flex2.check(_config(file, "flex2"))
    _refused(info, file)


# -- through the command line -----------------------------------------------------------------------------------

@pytest.mark.parametrize("breakage", ["blocks", "levels", "text", "truncated"])
def test_config_check_exits_1_with_one_line(demo, tmp_path, capsys, breakage):
    if breakage == "blocks":
        file, words = _edit(demo / "transformer" / "config.json", num_layers=10**7), "'num_layers'"
    elif breakage == "levels":
        file, words = _edit(demo / "vae" / "config.json", layers_per_block=10**6), "'layers_per_block'"
    elif breakage == "text":
        file, words = _edit(demo / "text_encoder" / "config.json", num_hidden_layers=10**7), "'num_hidden_layers'"
    else:
        file, words = _truncate(demo / "vae" / "diffusion_pytorch_model.safetensors"), "truncated"
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\npath = "{demo}"\ndevice = "cpu"\n[sampler]\nwidth = 64\nheight = 64\n')
    assert main(["config", "check", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fluxframe: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert str(file) in err and words in err


def test_config_check_passes_the_intact_demo_model(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\npath = "{DEMO}"\ndevice = "cpu"\n[sampler]\nwidth = 64\nheight = 64\n')
    assert main(["config", "check", str(config)]) == 0


# -- limits_for equals the loaded model's limits ----------------------------------------------------------------

def _loaded_limits(family, config):
    return family.load(config, KeepOnDevice()).limits


def test_limits_for_the_demo_model():
    config = _config(DEMO)
    limits = Flux2.limits_for(config)
    assert limits == _loaded_limits(Flux2, config)
    assert limits.pixel_multiple == 32  # 5 autoencoder levels and a 2x2 patch: what `width = 17` must meet


def test_limits_for_a_tiny_preset_before_and_after_it_is_built(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXFRAME_CACHE", str(tmp_path / "cache"))
    config = api.parse_config({"model": {"preset": "tiny", "dtype": "float32", "device": "cpu"}})
    before = Flux2.limits_for(config)
    assert not (tmp_path / "cache").exists()  # known without building anything
    assert before == _loaded_limits(Flux2, config) == Flux2.limits_for(config)  # the last from the built folder
    assert before.pixel_multiple == 16


def test_limits_for_a_flex2_checkpoint(flex2_source):
    config = _config(flex2_source, "flex2")
    limits = Flex2.limits_for(config)
    assert limits == _loaded_limits(Flex2, config) and limits.pixel_multiple == 4  # 2 levels, 2x2 tokens


def test_limits_for_a_flex2_single_file(flex2, flex2_original):
    file = flex2 / "flex2.safetensors"
    save_file(flex2_original, file, {"axes_dims_rope": "4,6,6"})
    config = _config(file, "flex2")
    assert Flex2.limits_for(config) == _loaded_limits(Flex2, config)


def test_limits_for_a_flux2_single_file(single_files):
    dit, ae = single_files
    config = _config(dit, vae=str(ae), text_encoder=str(DEMO))
    limits = Flux2.limits_for(config)
    assert limits == _loaded_limits(Flux2, config) and limits.pixel_multiple == 8  # 3 levels, 2x2 patch
