"""Built-in memory strategies, selected by ``[memory] strategy``:

- ``none``: every component on the device for the whole run.
- ``model-offload``: components live in (pinned) CPU memory; one at a time is copied to the device when it runs.
- ``group-offload``: the DiT's blocks stream to the device in groups, the next group prefetched on a side
  CUDA stream while the current one computes.
- ``vae-tiling``: the autoencoder encodes and decodes large images in overlapping, blended tiles.
- ``quantize``: the DiT's block linears stored in 8 bits (int8, fp8) or 4 bits (nf4), dequantised per layer
  when they run; composed, it rewrites the DiT before an offloading strategy moves it (``"quantize+group-offload"``).

They compose: ``strategy = ["group-offload", "model-offload", "vae-tiling"]`` (or ``"group-offload+vae-tiling"``).
"""

from __future__ import annotations

import importlib

from fluxframe.core.hookspecs import hookimpl
from fluxframe.core.interfaces import MemoryStrategy

# The strategies' modules import torch: they load when a strategy is asked for, not when the plugin is found
# (so `fluxframe --help` does not pay for torch).
_LAZY = {"GroupOffload": ".offload", "ModelOffload": ".offload", "Quantize": ".quantize", "VaeTiling": ".tiling"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class KeepOnDevice(MemoryStrategy):
    name = "none"

    def place(self, component, module, device):
        return module.to(device)


@hookimpl(trylast=True)
def register_memory_strategies(register):
    from .offload import GroupOffload, ModelOffload
    from .quantize import Quantize
    from .tiling import VaeTiling

    register("none", KeepOnDevice)
    register("model-offload", ModelOffload)
    register("group-offload", GroupOffload)
    register("vae-tiling", VaeTiling)
    register("quantize", Quantize)


__all__ = ["GroupOffload", "KeepOnDevice", "ModelOffload", "Quantize", "VaeTiling", "register_memory_strategies"]
