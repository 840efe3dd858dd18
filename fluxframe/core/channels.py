"""What conditioners that fill a model's extra input channels (``Conditioning.channels``) share: the check that
the model has the groups they fill (``ChannelConditioned``), the step hook that switches a group off after a
fraction of the steps, and the checks of the two options every channel hint has (strength, stop). Built-in
(inpaint, control) and third-party conditioners use the same ones, through ``fluxframe.plugin``.
"""

from __future__ import annotations

import math
from typing import Any

from fluxframe.core.interfaces import ChannelConditioned
from fluxframe.errors import RequestError


def require_channels(model: Any, conditioner: str, *groups: str) -> ChannelConditioned:
    """``model``, if it is ChannelConditioned and its checkpoint reads every one of ``groups``; else a RequestError
    naming ``conditioner`` (``conditioning.<conditioner>``), raised before any work is done for it."""
    family = getattr(model, "name", type(model).__name__)
    field = f"conditioning.{conditioner}"
    if not isinstance(model, ChannelConditioned):
        raise RequestError(f"the {conditioner} conditioner fills extra input channels ({', '.join(groups)}); model "
                           f"family {family!r} takes none (it does not implement ChannelConditioned)", field=field)
    have = model.channel_groups
    missing = [group for group in groups if group not in have]
    if missing:
        takes = ", ".join(f"{name} ({width})" for name, width in have.items()) or "none"
        raise RequestError(f"the {conditioner} conditioner fills the {', '.join(missing)} channels, which this "
                           f"{family} checkpoint does not take (its channel groups: {takes})", field=field)
    return model


class ChannelStop:
    """A step hook: channel group ``group`` is ``channels`` for steps i < int(N·stop), zeros after.

    The zeros are made once, so the group is the same tensor on every step until the switch and another one after
    it: a step cache sees the conditioning change exactly once (see fluxframe.core.pipeline)."""

    def __init__(self, group: str, channels, stop: float):
        self.group, self.channels, self.stop = group, channels, stop
        self._zeros = None

    def __call__(self, step: int, num_steps: int, conditioning) -> None:
        if step < int(num_steps * self.stop):
            conditioning.channels[self.group] = self.channels
            return
        if self._zeros is None:
            self._zeros = self.channels.new_zeros(self.channels.shape)
        conditioning.channels[self.group] = self._zeros


def _number(conditioner: str, name: str, value: Any, low: float, high: float | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{conditioner}: {name} must be a number, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"in [{low:g}, {high:g}]" if high is not None else f"at least {low:g}"
        raise ValueError(f"{conditioner}: {name} must be {bounds}, got {value!r}")
    return float(value)


def check_strength(value: Any, conditioner: str) -> float:
    """A hint's strength (the factor on its latent): a number ≥ 0, else a ValueError naming the conditioner."""
    return _number(conditioner, "strength", value, 0.0, None)


def check_stop(value: Any, conditioner: str) -> float:
    """The fraction of the steps that see the hint: a number in [0, 1], else a ValueError naming the conditioner."""
    return _number(conditioner, "stop", value, 0.0, 1.0)
