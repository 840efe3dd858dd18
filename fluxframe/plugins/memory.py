"""Built-in memory strategies. ``none`` keeps every component on the device for the whole run."""

from __future__ import annotations

from fluxframe.core.hookspecs import hookimpl
from fluxframe.core.interfaces import MemoryStrategy


class KeepOnDevice(MemoryStrategy):
    name = "none"

    def place(self, component, module, device):
        return module.to(device)


@hookimpl(trylast=True)
def register_memory_strategies(register):
    register("none", KeepOnDevice)
