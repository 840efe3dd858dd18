"""The example third-party conditioner (examples/fluxframe-example-conditioner) as a user installs it: pip-installed
into this environment, found through its entry point, and run from a config alone; plus the CLI's per-request
conditioning flags."""

from __future__ import annotations

import json
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from flex2_helpers import build_flux_folder
from PIL import Image

from fluxframe import api
from fluxframe.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fluxframe-example-conditioner"
W, H = 64, 48


@pytest.fixture(scope="module")
def installed():
    pip = [sys.executable, "-m", "pip"]
    proc = subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-e",
                           str(EXAMPLE)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    site.addsitedir(sysconfig.get_paths()["purelib"])  # let this process see the new .pth, as a fresh one would
    yield
    subprocess.run([*pip, "uninstall", "-y", "-q", "fluxframe-example-conditioner"], capture_output=True, timeout=300)
    for name in [m for m in sys.modules if m.startswith("fluxframe_palette")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_flux_folder(tmp_path_factory.mktemp("flex2-example"), in_channels=196)


def _config(folder, **extra):
    return api.parse_config({
        "model": {"family": "flex2", "path": str(folder), "dtype": "float32", "device": "cpu"},
        "sampler": {"steps": 2, "guidance": 3.5, "width": W, "height": H}, **extra})


def test_example_is_small():
    lines = (EXAMPLE / "fluxframe_palette" / "__init__.py").read_text().splitlines()
    assert len(lines) < 60


def test_installed_example_runs_from_config(installed, folder):
    config = _config(folder, conditioners=[{"name": "palette", "colors": ["#ff0000", "#0000ff"], "strength": 0.8,
                                            "stop": 0.5}])
    pipeline = api.load(config)  # a host from the installed entry points, as the CLI builds it
    assert pipeline.host.info["palette"].source == "fluxframe-example-conditioner 0.1.0"
    assert not pipeline.host.info["palette"].builtin
    model = pipeline.stages.model
    seen = []
    original = model.transformer.forward
    model.transformer.forward = lambda img, *a, **k: (seen.append(img.clone()), original(img, *a, **k))[1]
    try:
        result = pipeline.generate(api.GenerationRequest(prompt="a red circle", seed=2), write=False)
    finally:
        del model.transformer.forward
    layout = Image.new("RGB", (W, H), "#0000ff")
    layout.paste((255, 0, 0), (0, 0, W // 2, H))
    from fluxframe.core.images import from_pil
    from fluxframe.plugins.flex2.family import pack

    expected = pack(model.encode_latents(from_pil(layout))) * 0.8
    assert torch.allclose(seen[0][..., 132:], expected, atol=1e-6)
    assert torch.equal(seen[1][..., 132:], torch.zeros_like(expected))  # stop 0.5 of 2 steps
    assert result.image.size == (W, H)


def test_installed_example_runs_from_the_generic_cli_form(installed, folder, tmp_path, capsys):
    """`--cond palette.colors=...` gives the example its colours per request: the same image as those colours in the
    config; a bad per-request value is a one-line error naming the conditioner."""
    from fluxframe.cli import main

    colors = ["#ff0000", "#0000ff"]
    configured = api.load(_config(folder, conditioners=[{"name": "palette", "colors": colors}]))
    expected = np.asarray(configured.generate(api.GenerationRequest(prompt="a cat", seed=4), write=False).image)
    default = api.load(_config(folder)).generate(api.GenerationRequest(prompt="a cat", seed=4,
                                                                       conditioning={"palette": {}}), write=False)
    assert not np.array_equal(np.asarray(default.image), expected)  # the colours matter
    config = tmp_path / "flex2.toml"
    config.write_text(f'[model]\nfamily = "flex2"\npath = "{folder}"\ndtype = "float32"\ndevice = "cpu"\n'
                      f'[sampler]\nsteps = 2\nguidance = 3.5\nwidth = {W}\nheight = {H}\n'
                      f'[output]\ndir = "{tmp_path / "out"}"\n')
    argv = ["generate", "--config", str(config), "--prompt", "a cat", "--seed", "4", "--no-progress"]
    assert main([*argv, "--cond", f"palette.colors={json.dumps(colors)}"]) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.array_equal(np.asarray(Image.open(out)), expected)
    assert main([*argv, "--cond", "palette.colors=[]"]) == 1
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fluxframe:")]
    assert "conditioning.palette" in error and "colors" in error and "given by --cond palette.colors" in error


def test_bad_example_option_names_conditioner_and_option(installed, folder):
    with pytest.raises(ConfigError, match="palette: colors") as err:
        api.check_config(_config(folder, conditioners=[{"name": "palette", "colors": ["not-a-colour"]}]))
    assert err.value.key == "conditioners.0.colors"


def test_cli_conditioning_flags(folder, tmp_path, capsys):
    from fluxframe.cli import main

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    mask = Image.new("L", (W, H), 0)
    mask.paste(255, (8, 8, 40, 32))
    mask.save(tmp_path / "mask.png")
    config = tmp_path / "flex2.toml"
    config.write_text(f'[model]\nfamily = "flex2"\npath = "{folder}"\ndtype = "float32"\ndevice = "cpu"\n'
                      f'[sampler]\nsteps = 2\nwidth = {W}\nheight = {H}\n[output]\ndir = "{tmp_path / "out"}"\n')
    code = main(["generate", "--config", str(config), "--prompt", "a cat", "--seed", "1",
                 "--inpaint-image", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png"),
                 "--control", str(tmp_path / "photo.png"), "--control-kind", "line", "--control-strength", "0.5",
                 "--control-stop", "0.5"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert Image.open(Path(out.out.strip().splitlines()[-1])).size == (W, H)
    code = main(["generate", "--config", str(config), "--prompt", "a cat", "--control", str(tmp_path / "photo.png"),
                 "--control-stop", "2"])
    err = capsys.readouterr().err
    assert code != 0 and "stop" in err and "Traceback" not in err
