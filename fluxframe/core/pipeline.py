"""The pipeline runner: walks one request through the stages, in this order and no other.

request → validate → input filters → text encoding → conditioners → sampler loop → decode →
output filters → postprocessors (watermark, then metadata/signing) → atomic write → audit record.

A block at any filter writes no image. The runner knows only the core interfaces; the model
family, sampler, conditioners, filters and postprocessors come from plugins by name.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxframe.core.config import Config
from fluxframe.core.interfaces import Conditioner, Filter, ModelFamily, OutputContext, Postprocessor, Sampler
from fluxframe.core.plugins import PluginHost
from fluxframe.core.types import Conditioning, GenerationRequest, GenerationResult, StepInfo
from fluxframe.errors import PluginError, RequestError

log = logging.getLogger("fluxframe")


@dataclass
class Stages:
    """Everything a run needs, resolved from the config once."""

    model: ModelFamily
    sampler: Sampler
    conditioners: dict[str, Conditioner] = field(default_factory=dict)
    filters: list[Filter] = field(default_factory=list)
    postprocessors: list[Postprocessor] = field(default_factory=list)


def config_warnings(config: Config, host: PluginHost) -> list[str]:
    """Check the config against the installed plugins without loading weights."""
    family = host.get("model_family", config.model.family).factory
    host.get("sampler", config.sampler.name)
    host.get("memory_strategy", config.memory.strategy)
    return list(family.check(config))


class Pipeline:
    """A loaded deployment: build once from a config, then call ``generate`` for each request."""

    def __init__(self, config: Config, stages: Stages, host: PluginHost):
        self.config = config
        self.stages = stages
        self.host = host

    @classmethod
    def from_config(cls, config: Config, host: PluginHost | None = None) -> Pipeline:
        if host is None:
            host = PluginHost(block=config.plugins.block, allow=config.plugins.allow, required=config.plugins.require)
        for warning in config_warnings(config, host):
            log.warning(warning)
        memory = host.get("memory_strategy", config.memory.strategy).factory()
        family = host.get("model_family", config.model.family).factory
        model = family.load(config, memory)
        sampler = host.get("sampler", config.sampler.name).factory()
        return cls(config, Stages(model=model, sampler=sampler), host)

    # -- the run ------------------------------------------------------------------------------

    def _settings(self, request: GenerationRequest) -> dict[str, Any]:
        s = self.config.sampler
        limits = self.stages.model.limits
        settings = {
            "seed": request.seed if request.seed is not None else (s.seed if s.seed is not None else secrets.randbelow(2**32)),
            "steps": request.steps if request.steps is not None else s.steps,
            "guidance": request.guidance if request.guidance is not None else s.guidance,
            "width": request.width if request.width is not None else s.width,
            "height": request.height if request.height is not None else s.height,
        }
        if not isinstance(request.prompt, str):
            raise RequestError(f"must be text, got {type(request.prompt).__name__}", field="prompt")
        if not 0 <= settings["seed"] < 2**63:
            raise RequestError(f"must be between 0 and 2**63 - 1, got {settings['seed']}", field="seed")
        if not 1 <= settings["steps"] <= 1000:
            raise RequestError(f"must be between 1 and 1000, got {settings['steps']}", field="steps")
        if not 0 <= settings["guidance"] <= 100:
            raise RequestError(f"must be between 0 and 100, got {settings['guidance']}", field="guidance")
        for key in ("width", "height"):
            value = settings[key]
            if not limits.min_size <= value <= limits.max_size:
                raise RequestError(f"must be between {limits.min_size} and {limits.max_size}, got {value}", field=key)
            if value % limits.pixel_multiple:
                raise RequestError(f"must be a multiple of {limits.pixel_multiple}, got {value}", field=key)
        unknown = set(request.conditioning) - set(self.stages.conditioners)
        if unknown:
            raise PluginError(f"request uses conditioner(s) not configured: {', '.join(sorted(unknown))}",
                              plugin=sorted(unknown)[0])
        return settings

    def output_path(self, request: GenerationRequest) -> Path:
        if request.output is not None:
            return Path(request.output)
        name = self.config.output.name.format(request_id=request.request_id)
        return self.config.output_dir / f"{name}.{ 'jpg' if self.config.output.format == 'jpeg' else self.config.output.format}"

    def generate(self, request: GenerationRequest, *, progress: Callable[[StepInfo], None] | None = None,
                 write: bool = True) -> GenerationResult:
        import torch

        from fluxframe.core.images import MEDIA_TYPES, format_for, to_pil, write_atomic

        timings: dict[str, float] = {}
        started = time.perf_counter()
        model, stages = self.stages.model, self.stages
        settings = self._settings(request)

        with torch.inference_mode():
            t0 = time.perf_counter()
            text = model.encode_prompts([request.prompt])
            timings["text_encoding"] = time.perf_counter() - t0

            conditioning = Conditioning()
            for name, inputs in request.conditioning.items():
                stages.conditioners[name].prepare(model, request, inputs, conditioning)

            latents = model.initial_noise(settings["seed"], settings["width"], settings["height"])
            sigmas = model.sigmas(settings["steps"], latents.tokens.shape[1])

            def velocity(x, sigma, step):
                for hook in conditioning.step_hooks:
                    hook(step, settings["steps"], conditioning)
                return model.predict(x, latents.ids, sigma, text, conditioning, settings["guidance"])

            t0 = time.perf_counter()
            latents.tokens = stages.sampler.sample(latents.tokens, sigmas, velocity, progress)
            timings["denoising"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            image = to_pil(model.decode(latents))[0]
            timings["decoding"] = time.perf_counter() - t0

        context = OutputContext(request=request, model=model.describe(), config=self.config)
        for post in sorted(stages.postprocessors, key=lambda p: p.order):
            image = post.process_image(image, context)

        path = None
        if write:
            path = self.output_path(request)
            fmt = format_for(path, self.config.output.format)

            def finish(tmp: Path) -> None:
                for post in sorted(stages.postprocessors, key=lambda p: p.order):
                    post.process_file(tmp, MEDIA_TYPES[fmt], context)

            write_atomic(image, path, fmt, finish)
        timings["total"] = time.perf_counter() - started

        return GenerationResult(
            request_id=request.request_id, image=image, path=path, prompt=request.prompt,
            model_family=model.name, timings=timings, latents=latents.tokens, **settings,
        )
