"""The plugin host: a second model family from a test plugin, broken plugins named, clashes refused,
every hook documented."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import torch

from fluxframe import api, hookimpl
from fluxframe.core import hookspecs
from fluxframe.core.interfaces import ModelFamily, ModelLimits
from fluxframe.core.plugins import PluginHost
from fluxframe.core.types import Latents, TextConditioning
from fluxframe.errors import PluginError


class SolidColour(ModelFamily):
    """A model family that needs no weights: it paints the image one colour, whatever the prompt."""

    name = "solid"
    limits = ModelLimits(latent_channels=3, pixel_multiple=8)

    @classmethod
    def load(cls, config, memory):
        return cls()

    @property
    def checkpoint_id(self):
        return "solid:1"

    def encode_prompts(self, prompts):
        return TextConditioning(embeds=torch.zeros(len(prompts), 1, 1), ids=torch.zeros(1, 4))

    def initial_noise(self, seed, width, height):
        grid = (height // 8, width // 8)
        return Latents(tokens=torch.zeros(1, grid[0] * grid[1], 3), ids=torch.zeros(1, 4), grid=grid)

    def sigmas(self, steps, image_tokens):
        return torch.linspace(1, 0, steps + 1)

    def predict(self, latents, latent_ids, sigma, text, conditioning, guidance):
        return torch.full_like(latents, -0.5)  # integrates from 0 to +0.5

    def encode_image(self, images):
        raise NotImplementedError

    def decode(self, latents):
        h, w = latents.grid
        return latents.tokens.transpose(1, 2).reshape(1, 3, h, w).repeat_interleave(8, 2).repeat_interleave(8, 3)


class SolidPlugin:
    @hookimpl
    def register_model_families(self, register):
        register("solid", SolidColour)


def test_second_model_family_is_selected_by_config(host, tmp_path):
    host.add(SolidPlugin(), name="solid-plugin")
    config = api.parse_config({"model": {"family": "solid", "path": str(tmp_path)},
                               "sampler": {"steps": 2, "width": 32, "height": 16}})
    result = api.load(config, host=host).generate(api.GenerationRequest(prompt="anything", seed=3),
                                                  write=False)
    assert result.model_family == "solid"
    assert result.image.size == (32, 16)
    assert result.image.getpixel((5, 5)) == (191, 191, 191)  # 0.5 in [-1, 1] -> 191


def test_clash_names_both_plugins(host):
    class Clash:
        @hookimpl
        def register_model_families(self, register):
            register("flux2", SolidColour)

    host.add(Clash(), name="clash")
    with pytest.raises(PluginError, match="'flux2' is registered by both 'flux2' and 'clash'"):
        host.registry


def test_hook_typo_is_an_error(host):
    class Typo:
        @hookimpl
        def register_model_familys(self, register):
            pass

    with pytest.raises(PluginError, match="typo.*register_model_familys"):
        host.add(Typo(), name="typo")


def test_plugin_that_raises_in_its_hook_is_named(host):
    class Raises:
        @hookimpl
        def register_samplers(self, register):
            raise RuntimeError("boom")

    host.add(Raises(), name="raises")
    with pytest.raises(PluginError, match="plugin 'raises' failed in register_samplers: RuntimeError: boom"):
        host.registry


@pytest.fixture
def broken_entry_point(monkeypatch):
    """An installed plugin whose import fails, next to the real entry points."""
    real = importlib.metadata.entry_points
    broken = importlib.metadata.EntryPoint(name="broken-plugin", value="fluxframe_no_such_module_xyz",
                                           group="fluxframe")

    def fake(**kwargs):
        found = real(**kwargs)
        return list(found) + [broken] if kwargs.get("group") == "fluxframe" else found

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)


def test_broken_plugin_is_reported_by_name_and_others_still_load(broken_entry_point):
    host = PluginHost()
    assert [f.plugin for f in host.failures] == ["broken-plugin"]
    assert "ModuleNotFoundError" in host.failures[0].error
    assert "flux2" in host.registry["model_family"]


def test_broken_plugin_that_is_required_stops_start_up(broken_entry_point):
    with pytest.raises(PluginError, match="required plugin.*broken-plugin: ModuleNotFoundError"):
        PluginHost(required=["broken-plugin"])


def test_blocked_plugin_is_not_loaded():
    host = PluginHost(block=["samplers"])
    assert "samplers" not in host.info
    with pytest.raises(PluginError, match="no sampler named 'flow-euler'"):
        host.get("sampler", "flow-euler")


def test_plugins_command_lists_sources_and_failures(broken_entry_point, capsys):
    from fluxframe.cli import main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"flux2\s+built-in\s+fluxframe \d", out)
    assert "model_family:flux2" in out
    assert re.search(r"broken-plugin\s+FAILED.*ModuleNotFoundError", out)


def test_every_hook_is_documented_in_the_readme():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("register_")]
    assert len(hooks) == 7
    for name in hooks:
        assert f"`{name}(register)`" in readme, f"hook {name} is not documented in README.md"


def test_trace_plugins_prints_every_hook_call_through_pluggy(host, monkeypatch, capsys):
    """FLUXFRAME_TRACE_PLUGINS=1: each collector hook is called through pluggy, once per plugin, and the trace names
    the plugin each `register` belongs to."""
    monkeypatch.setenv("FLUXFRAME_TRACE_PLUGINS", "1")
    from fluxframe.core.plugins import KINDS, PluginHost

    traced = PluginHost()
    traced.registry
    err = capsys.readouterr().err
    for kind, hook in KINDS.items():
        assert f"  {hook} [hook]" in err and f"finish {hook}" in err
    assert "<register model_family for plugin 'flux2'>" in err
    assert "<register filter for plugin 'safety'>" in err
    calls = err.count("register_model_families [hook]")
    assert calls == len(traced.pm.hook.register_model_families.get_hookimpls())


def test_trace_plugins_from_the_command_line():
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("fluxframe")
    proc = subprocess.run([str(exe), "plugins"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FLUXFRAME_TRACE_PLUGINS": "1"})
    assert proc.returncode == 0 and "register_conditioners [hook]" in proc.stderr
    assert "<register conditioner for plugin" in proc.stderr
