"""`fluxframe generate --cond NAME.INPUT=VALUE` / `--cond-json`: any conditioner's per-request inputs from the command
line, merged with the shortcut flags; files given this way are read once like the shortcuts'; errors name the flag
and the input."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import pytest
from PIL import Image

from fluxframe import hookimpl
from fluxframe.cli import build_parser, main, request_conditioning
from fluxframe.core.interfaces import Conditioner
from fluxframe.errors import RequestError

TINY = '[model]\npreset = "tiny"\ndtype = "float32"\ndevice = "cpu"\n[sampler]\nsteps = 1\nwidth = 64\nheight = 64\n'


class Echo(Conditioner):
    """A third-party conditioner that says what it was given (as a note the CLI prints)."""

    name = "echo"
    file_inputs = ("image",)

    def prepare(self, model, request, inputs, conditioning):
        unknown = sorted(set(inputs) - {"image", "level"})
        if unknown:
            raise RequestError("unknown input (echo takes image, level)", field=f"conditioning.echo.{unknown[0]}")
        image = inputs["image"]
        conditioning.info["echo"] = {"notes": [f"echo: image {type(image).__name__} {image.sha256}, "
                                               f"level {inputs.get('level')!r}"]}


@hookimpl
def register_conditioners(register):
    register("echo", Echo)


@pytest.fixture
def installed(monkeypatch):
    """This module, installed as a third-party plugin: an entry point like a pip-installed package's."""
    real = importlib.metadata.entry_points
    ours = importlib.metadata.EntryPoint(name="cond-test", value=__name__, group="fluxframe")

    def fake(**kwargs):
        found = real(**kwargs)
        return [*found, ours] if kwargs.get("group") == "fluxframe" else found

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)


def conditioning(host, *flags):
    args = build_parser(host).parse_args(["generate", "--config", "c.toml", "--prompt", "p", *flags])
    return request_conditioning(args)[0]


def test_cond_values_are_json_when_they_parse_else_text(host):
    got = conditioning(host, "--cond", 'palette.colors=["#fff", "#000"]', "--cond", "control.strength=0.5",
                       "--cond", "reference.images=a.png", "--cond", "control.kind=line", "--cond", "x.on=true",
                       "--cond", "x.none=null", "--cond", 'x.text="1"', "--cond", "x.nan=NaN", "--cond", "x.eq=a=b")
    assert got == {"palette": {"colors": ["#fff", "#000"]}, "control": {"strength": 0.5, "kind": "line"},
                   "reference": {"images": "a.png"}, "x": {"on": True, "none": None, "text": "1", "nan": "NaN",
                                                            "eq": "a=b"}}


def test_cond_json_and_the_shortcuts_merge(host):
    got = conditioning(host, "--control", "c.png", "--control-strength", "0.8",
                       "--cond-json", json.dumps({"palette": {"colors": ["#fff"]}, "control": {"stop": 0.5}}),
                       "--cond", "palette.strength=0.3")
    assert got == {"control": {"image": Path("c.png"), "strength": 0.8, "stop": 0.5},
                   "palette": {"colors": ["#fff"], "strength": 0.3}}


@pytest.mark.parametrize(("flags", "words"), [
    (["--reference", "a.png", "--cond", "reference.images=b.png"],
     "--cond reference.images: also given by --reference"),
    (["--cond", "x.y=1", "--cond", "x.y=2"], "--cond x.y: also given by --cond x.y"),
    (["--cond-json", '{"x": {"y": 1}}', "--cond", "x.y=2"], "--cond x.y: also given by --cond-json x.y"),
])
def test_an_input_given_twice_names_both_flags(host, flags, words):
    with pytest.raises(RequestError, match=words):
        conditioning(host, *flags)


@pytest.mark.parametrize(("flags", "words"), [
    (["--cond", "control=1"], "--cond 'control=1': expected CONDITIONER.INPUT=VALUE"),
    (["--cond", "control.strength"], "--cond 'control.strength': expected CONDITIONER.INPUT=VALUE"),
    (["--cond-json", "[1]"], "--cond-json: expected an object"),
    (["--cond-json", '{"x": 1}'], "--cond-json x: expected an object of inputs"),
    (["--cond-json", "{nope"], "--cond-json: not valid JSON"),
])
def test_malformed_cond_flags_are_usage_errors(host, flags, words, capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--config", "c.toml", "--prompt", "p", *flags], host=host)
    assert info.value.code == 2 and words in capsys.readouterr().err


def test_third_party_conditioner_inputs_from_the_command_line(installed, tmp_path, capsys):
    """The file goes through the runner's read-once path (the conditioner gets an InputFile, hashed as read)."""
    config = tmp_path / "c.toml"
    config.write_text(TINY)
    image = tmp_path / "in.png"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(image)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    base = ["generate", "--config", str(config), "--prompt", "p", "--seed", "1", "--no-progress"]
    assert main([*base, "--output", str(tmp_path / "a.png"), "--cond", f"echo.image={image}",
                 "--cond", "echo.level=3"]) == 0
    assert f"echo: image InputFile {digest}, level 3" in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "b.png"), "--cond-json",
                 json.dumps({"echo": {"image": str(image), "levl": 3}})]) == 1
    err = capsys.readouterr().err
    assert "conditioning.echo.levl: unknown input" in err and "(given by --cond-json echo.levl)" in err
    assert main([*base, "--output", str(tmp_path / "c.png"), "--cond", f"echo.image={tmp_path / 'none.png'}"]) == 1
    err = capsys.readouterr().err
    assert "conditioning.echo.image" in err and "no such file" in err and "(given by --cond echo.image)" in err


def test_builtin_conditioners_through_cond(tmp_path, capsys):
    """--cond reference.images gives what --reference gives; a conditioner the model cannot take names the flag."""
    config = tmp_path / "c.toml"
    config.write_text(TINY)
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "ref.png")
    base = ["generate", "--config", str(config), "--prompt", "p", "--seed", "2", "--no-progress"]
    assert main([*base, "--reference", str(tmp_path / "ref.png"), "--output", str(tmp_path / "a.png")]) == 0
    assert main([*base, "--cond", f'reference.images=["{tmp_path / "ref.png"}"]',
                 "--output", str(tmp_path / "b.png")]) == 0
    assert Image.open(tmp_path / "a.png").tobytes() == Image.open(tmp_path / "b.png").tobytes()
    capsys.readouterr()
    assert main([*base, "--cond", "control.strength=0.5", "--output", str(tmp_path / "c.png")]) == 1
    err = capsys.readouterr().err
    assert "works with model families flex2" in err and "(given by --cond control.strength)" in err
