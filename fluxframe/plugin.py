"""The one import surface for plugin authors: a plugin package imports from here and nothing else of fluxframe.

    from fluxframe.plugin import Conditioner, RequestError, hookimpl

What it offers:

* ``hookimpl`` — marks a hook implementation; the hooks are the ``register_*`` collectors of
  ``fluxframe.core.hookspecs`` (README, "Plugin hooks").
* The interfaces a plugin implements or is handed: ``ModelFamily`` and its ``ModelLimits``; ``ChannelConditioned``
  (a family with extra input channels per token, e.g. Flex.2's inpaint / mask / control); ``Conditioner``,
  ``Sampler``, ``Postprocessor`` with its ``OutputContext``, ``Filter`` with its ``Verdict``, ``MemoryStrategy``,
  ``StepCache`` with the per-run ``StepCacheRun`` a family's ``predict`` receives.
* The data passed between stages: ``GenerationRequest``, ``TextConditioning``, ``Latents``, ``Conditioning``,
  ``StepInfo``.
* The errors to raise: ``FluxframeError`` and ``ConfigError``, ``PluginError``, ``CheckpointError``,
  ``RequestError``, ``OutputError``, ``SafetyError``, ``ProvenanceError``. (A conditioner's or sampler's factory
  raises ValueError for a bad option; fluxframe turns it into a ConfigError naming the config key.)
* Helpers for conditioners: ``InputFile`` (a request's input file, read once), ``open_image`` (a path, InputFile
  or PIL image as a PIL image, or a RequestError naming the input), ``from_pil`` (a PIL image as the (1, 3, H, W)
  tensor in [-1, 1] models encode); for channel hints: ``require_channels`` (the model is ChannelConditioned with
  the groups a conditioner fills), ``ChannelStop`` (a step hook switching a group off after a fraction of the
  steps), ``check_strength`` and ``check_stop`` (the two options every channel hint has).

Importing this module is cheap (no torch): the data types, ``open_image`` and ``from_pil`` load torch on first
use, so import them inside the hook or method that needs them (or under ``TYPE_CHECKING``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fluxframe.core.channels import ChannelStop, check_stop, check_strength, require_channels
from fluxframe.core.hookspecs import hookimpl
from fluxframe.core.inputs import InputFile
from fluxframe.core.interfaces import (
    ChannelConditioned,
    Conditioner,
    Filter,
    MemoryStrategy,
    ModelFamily,
    ModelLimits,
    OutputContext,
    Postprocessor,
    Sampler,
    StepCache,
    StepCacheRun,
    Verdict,
)
from fluxframe.errors import (
    CheckpointError,
    ConfigError,
    FluxframeError,
    OutputError,
    PluginError,
    ProvenanceError,
    RequestError,
    SafetyError,
)

if TYPE_CHECKING:
    from fluxframe.core.images import from_pil, open_image
    from fluxframe.core.types import Conditioning, GenerationRequest, Latents, StepInfo, TextConditioning

# Names whose modules import torch: loaded on first access (PEP 562), so importing a plugin stays cheap.
_LAZY = {
    **dict.fromkeys(("Conditioning", "GenerationRequest", "Latents", "StepInfo", "TextConditioning"),
                    "fluxframe.core.types"),
    **dict.fromkeys(("from_pil", "open_image"), "fluxframe.core.images"),
}

__all__ = [
    "hookimpl",
    "ModelFamily", "ModelLimits", "ChannelConditioned", "Conditioner", "Sampler", "Postprocessor", "OutputContext",
    "Filter", "Verdict", "MemoryStrategy", "StepCache", "StepCacheRun",
    "Conditioning", "GenerationRequest", "Latents", "StepInfo", "TextConditioning",
    "FluxframeError", "ConfigError", "PluginError", "CheckpointError", "RequestError", "OutputError", "SafetyError",
    "ProvenanceError",
    "InputFile", "open_image", "from_pil", "require_channels", "ChannelStop", "check_strength", "check_stop",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
