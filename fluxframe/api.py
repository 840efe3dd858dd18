"""The Python API: what the CLI does, callable from code and tests.

    from fluxframe import api
    pipeline = api.load("deploy.toml")
    result = pipeline.generate(api.GenerationRequest(prompt="a red circle", seed=1))
    result.image.save("out.png")  # or result.path, written by the pipeline
"""

from __future__ import annotations

from pathlib import Path

from fluxframe.core.config import Config, LoraSettings, load_config, parse_config
from fluxframe.core.pipeline import Pipeline, check_output, config_warnings
from fluxframe.core.plugins import PluginHost
from fluxframe.core.types import GenerationRequest, GenerationResult

__all__ = ["Config", "GenerationRequest", "GenerationResult", "Pipeline", "PluginHost", "check_config", "check_output",
           "encode",
           "load", "load_config", "parse_config", "with_loras"]


def load(config: Config | str | Path, *, host: PluginHost | None = None, replica: str | None = None) -> Pipeline:
    """Build a pipeline from a config file or a parsed Config (validated in full before weights load). ``replica``:
    one replica of a scaled-out deployment, with its own audit log (see ``Pipeline.from_config``)."""
    if not isinstance(config, Config):
        config = load_config(config)
    return Pipeline.from_config(config, host or PluginHost.for_config(config), replica=replica)


def with_loras(config: Config | str | Path, loras: list[tuple[str | Path, float]]) -> Config:
    """The config with these LoRAs (path, weight) applied after its own ``[[lora]]`` entries; relative paths
    are taken from the current directory (as a command line gives them), not from the config's folder.
    An entry that is not valid (a weight that is not a finite number) is a ConfigError naming it as the
    ``--lora`` argument it came from."""
    from pydantic import ValidationError

    from fluxframe.errors import ConfigError

    if not isinstance(config, Config):
        config = load_config(config)
    extra = []
    for path, weight in loras:
        key = f"--lora {path}:{weight}"
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(f"the weight must be a number, got {weight!r}", key=key) from None
        try:
            extra.append(LoraSettings(path=str(Path(path).expanduser().absolute()), weight=value))
        except ValidationError as exc:  # e.g. a weight of nan or inf: LoraSettings wants a finite number
            raise ConfigError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                                        for e in exc.errors()), key=key) from None
    return config.model_copy(update={"lora": [*config.lora, *extra]})


def encode(config: Config | str | Path, prompt: str, output: str | Path, *, negative_prompt: str | None = None,
           host: PluginHost | None = None, overwrite: bool = False) -> Path:
    """Run only the model's text encoder and write the prompt embeddings to ``output`` (safetensors, with the
    prompt and the encoder's identity in its metadata), for ``GenerationRequest(prompt_embeds=output)`` later.
    The prompt filters run again on the stored prompt when the file is used."""
    from fluxframe.errors import RequestError

    if not isinstance(config, Config):
        config = load_config(config)
    if not isinstance(prompt, str):
        raise RequestError(f"must be text, got {type(prompt).__name__}", field="prompt")
    # the same rules as an image output: never a file the deployment uses, never an existing file unless asked
    output = check_output(config, output, overwrite=overwrite, suffixes={".safetensors": "safetensors"})
    family = (host or PluginHost.for_config(config)).get("model_family", config.model.family).factory
    family.check(config)
    return family.encode_to_file(config, prompt, output, negative_prompt)


def check_config(config: Config | str | Path, *, host: PluginHost | None = None) -> list[str]:
    """Validate a config and check it against the installed plugins and the checkpoint's files,
    without loading weights. Returns warnings; raises a FluxframeError naming what is wrong."""
    if not isinstance(config, Config):
        config = load_config(config)
    return config_warnings(config, host or PluginHost.for_config(config))
