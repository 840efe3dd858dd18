"""Plugins meet the core through documented interfaces only (issue 23): the example third-party conditioner imports
nothing of fluxframe but ``fluxframe.plugin``; ``fluxframe.conditioning`` imports no model family; the families
import nothing of each other and no module of the model code imports itself back; ``fluxframe.plugin`` sits on the
core and the errors alone and is cheap to import. Then the ``ChannelConditioned`` interface the inpaint and
control conditioners use: what Flex.2's members give, and the error a family without it gets, naming the
conditioner."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flex2_helpers import build_flux_folder

from fluxframe import api
from fluxframe.errors import ConfigError, RequestError

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fluxframe"
EXAMPLE = ROOT / "examples" / "fluxframe-example-conditioner" / "fluxframe_palette" / "__init__.py"
W, H = 64, 48  # the tiny Flux.1 VAE downsamples 2×: latents 32×24, tokens 16×12


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """(module, line) for every import in ``path``, at any depth (inside functions too), relative ones resolved;
    ``from X import n`` counts as X.n where that is a module of the package, else as X."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (ROOT / Path(*sub.split(".")) / "__init__.py").is_file()
                out.append((sub if is_module else base, node.lineno))
    return out


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_example_conditioner_imports_only_fluxframe_plugin():
    seen = [(m, line) for m, line in imports(EXAMPLE) if within(m, "fluxframe")]
    assert seen, "the example imports nothing of fluxframe?"
    assert all(m == "fluxframe.plugin" for m, _ in seen), [f"line {line}: {m}" for m, line in seen]


def test_conditioning_imports_no_model_family():
    files = sorted((PACKAGE / "conditioning").rglob("*.py"))
    assert len(files) >= 5
    bad = [f"{f.name}:{line}: {m}" for f in files for m, line in imports(f) if within(m, "fluxframe.plugins")]
    assert not bad, bad


def test_plugin_surface_sits_on_core_and_errors_only():
    from fluxframe import plugin

    bad = [f"line {line}: {m}" for m, line in imports(PACKAGE / "plugin.py")
           if within(m, "fluxframe") and not (within(m, "fluxframe.core") or m == "fluxframe.errors")]
    assert not bad, bad
    assert all(within(m, "fluxframe.core") for m in plugin._LAZY.values())


def test_families_import_nothing_of_each_other():
    for family, other in (("flex2", "flux2"), ("flux2", "flex2")):
        bad = [f"{f.name}:{line}: {m}" for f in sorted((PACKAGE / "plugins" / family).rglob("*.py"))
               for m, line in imports(f) if within(m, f"fluxframe.plugins.{other}")]
        assert not bad, (family, bad)
    # and nothing else of the package imports a family's private names either
    for f in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and within(node.module, "fluxframe.plugins") \
                    and not within(module_name(f), node.module.rsplit(".", 1)[0]):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{f.relative_to(ROOT)}:{node.lineno} imports {private} from {node.module}"


def test_no_import_cycles_in_the_model_code_and_core():
    """Function-level imports count: a lazy import back is a cycle all the same."""
    scope = ("fluxframe.plugins", "fluxframe.conditioning", "fluxframe.core", "fluxframe.plugin")
    files = {module_name(f): f for f in PACKAGE.rglob("*.py") if any(within(module_name(f), s) for s in scope)}
    graph = {name: {m for m, _ in imports(f) if m in files and m != name} for name, f in files.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_plugin_surface_is_complete_and_cheap_to_import():
    code = ("import sys, fluxframe.plugin as p\n"
            "assert 'torch' not in sys.modules, 'importing fluxframe.plugin loaded torch'\n"
            "missing = [n for n in p.__all__ if not hasattr(p, n)]\n"
            "assert not missing, missing\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr

    from fluxframe import plugin
    from fluxframe.core import channels, images, interfaces, types
    from fluxframe.core.hookspecs import hookimpl

    assert plugin.hookimpl is hookimpl and plugin.ChannelConditioned is interfaces.ChannelConditioned
    assert plugin.Conditioning is types.Conditioning and plugin.from_pil is images.from_pil
    assert plugin.require_channels is channels.require_channels


def test_channel_option_checks_name_the_conditioner():
    from fluxframe.plugin import ChannelStop, Conditioning, check_stop, check_strength

    assert check_strength(0, "palette") == 0.0 and check_stop(1, "palette") == 1.0
    with pytest.raises(ValueError, match="palette: stop must be in \\[0, 1\\], got 2"):
        check_stop(2, "palette")
    with pytest.raises(ValueError, match="palette: strength must be a number, got True"):
        check_strength(True, "palette")
    hint, conditioning = torch.ones(1, 6, 4), Conditioning()
    stop = ChannelStop("control", hint, 0.5)
    stop(1, 4, conditioning)
    assert conditioning.channels["control"] is hint
    stop(2, 4, conditioning)
    assert torch.equal(conditioning.channels["control"], torch.zeros(1, 6, 4))


# -- ChannelConditioned ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flex2(tmp_path_factory):
    folder = build_flux_folder(tmp_path_factory.mktemp("flex2-channels"), in_channels=196)
    config = api.parse_config({"model": {"family": "flex2", "path": str(folder), "dtype": "float32",
                                         "device": "cpu"}})
    return api.load(config, host=api.PluginHost(allow=[])).stages.model


def test_flex2_channel_interface_gives_what_the_conditioners_need(flex2):
    from fluxframe.plugin import ChannelConditioned
    from fluxframe.plugins.flex2.family import pack

    model = flex2
    assert isinstance(model, ChannelConditioned)
    assert model.channel_groups == {"inpaint": 64, "mask": 4, "control": 64}
    assert 64 + sum(model.channel_groups.values()) == model.transformer.config.in_channels
    rows, cols = model.token_grid(W, H)
    assert (rows, cols) == (12, 16) and model.initial_noise(0, W, H).tokens.shape[1] == rows * cols

    images = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tokens = model.encode_tokens(images)
    assert tokens.shape == (1, rows * cols, model.channel_groups["control"])
    assert torch.equal(tokens, pack(model.encode_latents(images)))  # the packed posterior mean
    sampled = [model.encode_tokens(images, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*sampled) and not torch.equal(sampled[0], tokens)

    mask = torch.zeros(1, 1, 2 * H, 2 * W)  # any size with the output's aspect ratio
    mask[..., : W] = 1.0  # the left half
    m = model.mask_tokens(mask, W, H)
    assert m.shape == (1, rows * cols, model.channel_groups["mask"]) and m.dtype == tokens.dtype
    grid = m.view(rows, cols, 4)
    assert torch.all(grid[:, : cols // 2] == 1) and torch.all(grid[:, cols // 2:] == 0)  # a sharp edge stays one
    per_channel = model.mask_tokens(mask, W, H, per_channel=True)
    assert per_channel.shape == tokens.shape
    # each latent channel of a token gets its own pixel's mask value, as the tokens are laid out
    assert torch.equal(per_channel.view(1, rows * cols, 16, 4), m[:, :, None, :].expand(1, rows * cols, 16, 4))
    blanked = tokens * (1.0 - per_channel)
    assert torch.all(blanked.view(rows, cols, 64)[:, : cols // 2] == 0)
    assert torch.equal(blanked.view(rows, cols, 64)[:, cols // 2:], tokens.view(rows, cols, 64)[:, cols // 2:])


def test_inpaint_channels_are_the_interface_products(flex2, tmp_path):
    """What the inpaint conditioner sets is encode_tokens × (1 − mask_tokens), and mask_tokens."""
    from PIL import Image

    from fluxframe.conditioning.inpaint import InpaintConditioner
    from fluxframe.core.images import from_pil
    from fluxframe.core.types import Conditioning, GenerationRequest

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    mask = np.zeros((H, W), np.uint8)
    mask[10:30, 5:50] = 255
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    conditioning = Conditioning()
    InpaintConditioner().prepare(flex2, GenerationRequest(prompt="x", seed=1, width=W, height=H),
                                 {"image": tmp_path / "image.png", "mask": tmp_path / "mask.png"}, conditioning)
    m = torch.from_numpy(mask.astype(np.float32) / 255.0)[None, None]
    tokens = flex2.encode_tokens(from_pil(Image.open(tmp_path / "image.png")))
    assert torch.equal(conditioning.channels["mask"], flex2.mask_tokens(m, W, H))
    assert torch.equal(conditioning.channels["inpaint"], tokens * (1.0 - flex2.mask_tokens(m, W, H, per_channel=True)))


TINY = {"model": {"preset": "tiny", "dtype": "float32", "device": "cpu"},
        "sampler": {"steps": 1, "width": W, "height": H}}


@pytest.fixture(scope="module")
def tiny_flux2():
    return api.load(api.parse_config(TINY), host=api.PluginHost(allow=[])).stages.model


@pytest.mark.parametrize("name, inputs, groups", [
    ("inpaint", {"image": "image.png", "mask": "mask.png"}, "inpaint, mask"),
    ("control", {"image": "control.png"}, "control"),
])
def test_a_family_without_channels_is_refused_naming_the_conditioner(tiny_flux2, name, inputs, groups):
    from fluxframe.conditioning.control import ControlConditioner
    from fluxframe.conditioning.inpaint import InpaintConditioner
    from fluxframe.core.types import Conditioning, GenerationRequest
    from fluxframe.plugin import ChannelConditioned

    model = tiny_flux2
    assert not isinstance(model, ChannelConditioned)
    # from the config, before any weights load: the conditioner names the families it works with
    with pytest.raises(ConfigError, match=f"conditioner '{name}' works with model families flex2, not with 'flux2'"):
        api.check_config(api.parse_config({**TINY, "conditioners": [{"name": name}]}), host=api.PluginHost(allow=[]))
    # and the conditioner itself, handed such a model, refuses it before any work (the files need not exist)
    conditioner = {"inpaint": InpaintConditioner, "control": ControlConditioner}[name]()
    conditioning = Conditioning()
    with pytest.raises(RequestError, match=f"the {name} conditioner fills extra input channels \\({groups}\\); "
                                           f"model family 'flux2' takes none") as err:
        conditioner.prepare(model, GenerationRequest(prompt="x", seed=1, width=W, height=H), inputs, conditioning)
    assert err.value.field == f"conditioning.{name}"
    assert not conditioning.channels and not conditioning.step_hooks
