"""The command line end to end: the tiny preset writes a PNG; bad input is a message, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fluxframe.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = '[model]\npreset = "tiny"\ndtype = "float32"\ndevice = "cpu"\n[sampler]\nsteps = 2\nwidth = 64\nheight = 32\n'


def fluxframe(*args, cwd=None):
    """Run the installed console script in a subprocess, as a user would."""
    exe = Path(sys.executable).with_name("fluxframe")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, env=os.environ.copy(),
                          timeout=300)


def test_generate_with_the_tiny_preset_writes_a_png(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY + f'[output]\ndir = "{tmp_path / "out"}"\n')
    proc = fluxframe("generate", "--config", str(config), "--prompt", "a red circle", "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.parent == tmp_path / "out" and path.suffix == ".png"
    assert Image.open(path).size == (64, 32)
    assert "random weights" in proc.stderr  # the preset says plainly what it is
    assert "seed 5" in proc.stderr


def test_generate_options_override_the_config(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "x.jpg"
    code = main(["generate", "--config", str(config), "--prompt", "p", "--seed", "1", "--steps", "1",
                 "--width", "48", "--height", "80", "--guidance", "2.5", "--output", str(out), "--no-progress"])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(out)
    image = Image.open(out)
    assert image.format == "JPEG" and image.size == (48, 80)


@pytest.mark.parametrize("args,words", [
    (["generate", "--prompt", "x"], "required: --config"),
    (["generate", "--config", "c.toml", "--prompt", "x", "--steps", "many"], "--steps must be a number"),
    (["generate", "--config", "c.toml", "--prompt", "x", "--steps", "0"], "--steps must be at least 1"),
    (["generate", "--config", "c.toml", "--prompt", "x", "--width", "8"], "--width must be at least 16"),
    (["paint"], "invalid choice: 'paint'"),
    ([], "required: COMMAND"),
])
def test_bad_arguments_give_a_usage_error(args, words, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and words in err and "Traceback" not in err


@pytest.mark.parametrize("body,extra,words", [
    (TINY, ["--width", "50"], "width: must be a multiple of 16, got 50"),
    ('[model]\npreset = "tiny"\nbogus = 1\n', [], "model.bogus: unknown key"),
    ('[model]\npath = "nowhere"\n', [], "checkpoint folder does not exist"),
])
def test_errors_exit_1_with_a_message(tmp_path, body, extra, words, capsys):
    config = tmp_path / "c.toml"
    config.write_text(body)
    assert main(["generate", "--config", str(config), "--prompt", "x", "--no-progress", *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fluxframe: error:") and words in err and "Traceback" not in err


def test_config_check_command(tmp_path, capsys):
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(TINY)
    bad.write_text('[model]\npreset = "tiny"\n[sampler]\nsteps = "x"\n')
    assert main(["config", "check", str(good)]) == 0
    captured = capsys.readouterr()
    assert "ok" in captured.out and "random weights" in captured.err
    assert main(["config", "check", str(bad)]) == 1
    assert "sampler.steps" in capsys.readouterr().err


def test_missing_weights_in_a_folder_are_named(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    for part in ("transformer", "vae", "text_encoder", "tokenizer"):
        (folder / part).mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "Flux2Pipeline"}')
    (folder / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\npath = "{folder}"\n')
    assert main(["config", "check", str(config)]) == 1
    err = capsys.readouterr().err
    assert "diffusion_pytorch_model.bin" in err and "pickle" in err.lower()


def test_blocked_generate_exits_3_with_the_reason_and_writes_nothing(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(TINY + f'[output]\ndir = "{tmp_path / "out"}"\n[safety]\nrequire = ["prompt-nsfw"]\n'
                      f'audit_log = "{tmp_path / "audit.jsonl"}"\n')
    assert main(["generate", "--config", str(config), "--prompt", "a nude woman", "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "fluxframe: blocked:" in err and "prompt-nsfw" in err and "Traceback" not in err
    assert not any((tmp_path / "out").iterdir())  # made and checked at start-up; nothing written
    assert '"action":"block"' in (tmp_path / "audit.jsonl").read_text().replace(" ", "")


def test_generate_warns_when_safety_and_provenance_are_absent(tmp_path, capsys, caplog):
    config = tmp_path / "c.toml"
    config.write_text(TINY)
    assert main(["generate", "--config", str(config), "--prompt", "p", "--no-progress",
                 "--output", str(tmp_path / "a.png")]) == 0
    assert "no [safety] section" in caplog.text and "no [provenance] section" in caplog.text
    assert main(["config", "check", str(config)]) == 0
    err = capsys.readouterr().err
    assert "no [safety] section" in err and "no [provenance] section" in err
