"""The Python API: what the CLI does, callable from code and tests.

    from fluxframe import api
    pipeline = api.load("deploy.toml")
    result = pipeline.generate(api.GenerationRequest(prompt="a red circle", seed=1))
    result.image.save("out.png")  # or result.path, written by the pipeline
"""

from __future__ import annotations

from pathlib import Path

from fluxframe.core.config import Config, load_config, parse_config
from fluxframe.core.pipeline import Pipeline, config_warnings
from fluxframe.core.plugins import PluginHost
from fluxframe.core.types import GenerationRequest, GenerationResult

__all__ = ["Config", "GenerationRequest", "GenerationResult", "Pipeline", "PluginHost", "check_config", "load",
           "load_config", "parse_config"]


def _host_for(config: Config) -> PluginHost:
    return PluginHost(block=config.plugins.block, allow=config.plugins.allow, required=config.plugins.require)


def load(config: Config | str | Path, *, host: PluginHost | None = None) -> Pipeline:
    """Build a pipeline from a config file or a parsed Config (validated in full before weights load)."""
    if not isinstance(config, Config):
        config = load_config(config)
    return Pipeline.from_config(config, host or _host_for(config))


def check_config(config: Config | str | Path, *, host: PluginHost | None = None) -> list[str]:
    """Validate a config and check it against the installed plugins and the checkpoint's files,
    without loading weights. Returns warnings; raises a FluxframeError naming what is wrong."""
    if not isinstance(config, Config):
        config = load_config(config)
    return config_warnings(config, host or _host_for(config))
