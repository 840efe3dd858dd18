"""register_commands: every command group joins the CLI through the hook (built-ins by the same path as a
third party's); clashes and broken plugins are recorded and leave the rest of the CLI working; command modules
import nothing heavy."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fluxframe import hookimpl
from fluxframe.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


class Hello:
    """A third-party plugin adding `fluxframe hello`."""

    @hookimpl
    def register_commands(self, register):
        def setup(parser):
            parser.add_argument("--name", required=True)

        def run(args):
            print(f"hello {args.name}")
            return 7

        register("hello", setup, run, help="say hello")


def test_register_commands(host, capsys):
    host.add(Hello(), name="hello-plugin")
    assert main(["hello", "--name", "ada"], host=host) == 7
    assert capsys.readouterr().out == "hello ada\n"
    with pytest.raises(SystemExit):
        main(["--help"], host=host)
    assert "say hello" in capsys.readouterr().out
    assert main(["plugins"], host=host) == 0
    out = capsys.readouterr().out
    assert "hello-plugin" in out and "command:hello" in out


def test_builtin_command_groups_come_through_the_hook(host):
    commands = host.collect("command")
    assert {name: r.plugin for name, r in commands.items()} == {
        "check": "safety", "audit": "safety", "verify": "provenance", "certs": "provenance", "train-demo": "demo",
        "train-lora": "demo", "demo-data": "demo"}
    parser = build_parser(host)
    args = parser.parse_args(["audit", "verify", "log.jsonl"])
    assert args.fluxframe_command is commands["audit"].factory.run
    # the demo registers through an entry point like the safety and provenance layers
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["fluxframe"]
    assert entry_points["demo"] == "fluxframe.demo"


def test_clashing_and_broken_commands_are_recorded_and_the_rest_works(host, capsys):
    class Clash:
        @hookimpl
        def register_commands(self, register):
            register("verify", lambda p: None, lambda a: 0)  # provenance's

    class Core:
        @hookimpl
        def register_commands(self, register):
            register("generate", lambda p: None, lambda a: 0)  # fluxframe's own

    class Raises:
        @hookimpl
        def register_commands(self, register):
            register("fine", lambda p: None, lambda a: 0)
            raise RuntimeError("boom")

    class BadSetup:
        @hookimpl
        def register_commands(self, register):
            register("bad-setup", lambda p: p.add_argument("--x", typo=1), lambda a: 0)

    for plugin in (Clash(), Core(), Raises(), BadSetup(), Hello()):
        host.add(plugin, name=type(plugin).__name__.lower())
    assert main(["hello", "--name", "x"], host=host) == 7
    capsys.readouterr()
    assert host.collect("command")["verify"].plugin == "provenance"
    assert "fine" not in host.collect("command")  # a plugin that fails registers nothing
    errors = {f.plugin: f.error for f in host.failures}
    assert "'verify' is registered by both 'provenance' and 'clash'" in errors["clash"]
    assert "'generate' is fluxframe's own" in errors["core"]
    assert "failed in register_commands: RuntimeError: boom" in errors["raises"]
    assert "'bad-setup'" in errors["badsetup"] and "TypeError" in errors["badsetup"]
    with pytest.raises(SystemExit):
        main(["bad-setup"], host=host)
    assert "invalid choice: 'bad-setup'" in capsys.readouterr().err
    assert main(["plugins"], host=host) == 0
    out = capsys.readouterr().out
    for name in ("clash", "core", "raises", "badsetup"):
        assert f"{name} " in out and "FAILED" in out


def test_command_modules_import_nothing_heavy():
    """`fluxframe --help` stays fast: building the commands of the built-in command groups loads no torch."""
    code = ("import sys; from fluxframe.core.plugins import PluginHost; from fluxframe.cli import build_parser\n"
            "import fluxframe.safety, fluxframe.provenance, fluxframe.demo\n"
            "h = PluginHost(load_entry_points=False)\n"
            "for m in (fluxframe.safety, fluxframe.provenance, fluxframe.demo): h.add(m, name=m.__name__)\n"
            "build_parser(h).format_help()\n"
            "heavy = [m for m in ('torch', 'PIL', 'numpy', 'c2pa', 'onnxruntime', 'cryptography')\n"
            "         if m in sys.modules]\n"
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
