"""``[model] compile = true``: regional compilation of a DiT. The ``forward`` of each block of ``double_blocks`` and
``single_blocks`` is compiled with ``torch.compile``; torch inlines the block's modules and treats their weights
as inputs, so all the blocks of one class share one compiled graph: a class compiles once, on its first call, and
steps, seeds and same-shaped batches reuse it. Only ``forward`` is compiled, not the module call
(``nn.Module.compile`` would compile ``_call_impl``): forward hooks — ``group-offload``'s onload and offload of a
block's weights — run eagerly around the compiled graph instead of being traced into it, where their
``tensor.data`` swaps split the graph into pieces (graph breaks). The rest of the model (embedders, modulation,
final layer: a few percent of the work) stays eager, and so does FLUX.2's last single block, whose forward takes
the text-token skip (a different graph it would compile for one call a step).

Before compiling, a two-line function is compiled and run on the model's device: where that fails (no C++
compiler for inductor on the CPU, no triton on CUDA, a torch built without dynamo), the blocks run uncompiled and
the reason is logged and recorded (``ModelFamily.describe()["compile"]``, so the result and the C2PA assertion
carry it).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger("fluxframe")

#: The torch.compile backend; tests swap in one that fails to see the fallback.
BACKEND: Any = "inductor"


def compiler_problem(device: torch.device, backend: Any = None) -> str | None:
    """Why torch cannot compile for ``device`` here (compiling and running a tiny function), or None."""
    backend = BACKEND if backend is None else backend
    try:
        fn = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend=backend, fullgraph=True)
        x = torch.ones(4, device=device)
        if not torch.allclose(fn(x), torch.sin(x) * 2 + 1):
            return "the compiled test function gave a wrong answer"
    except Exception as exc:  # any failure of the toolchain means: run uncompiled
        return _reason(exc)
    return None


def _reason(exc: BaseException) -> str:
    """The root cause of a compile failure in one line (dynamo wraps the backend's own error)."""
    root = getattr(exc, "inner_exception", None) or exc
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    return f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__


def compile_blocks(transformer: nn.Module, device: torch.device) -> dict[str, Any]:
    """Compile the DiT's repeated blocks in place (see the module docstring); returns the record of what was done:
    ``{"enabled": True, "backend", "blocks": {class: count}}`` or ``{"enabled": False, "reason"}``."""
    backend = BACKEND
    problem = compiler_problem(device, backend)
    name = backend if isinstance(backend, str) else getattr(backend, "__name__", type(backend).__name__)
    if problem is not None:
        log.warning("[model] compile: torch cannot compile here (%s); the DiT runs uncompiled", problem)
        return {"enabled": False, "backend": name, "reason": problem}
    blocks = [b for kind in ("double_blocks", "single_blocks") for b in getattr(transformer, kind, ())]
    skipping = getattr(transformer, "eager_blocks", ())
    counts: dict[str, int] = {}
    for block in blocks:
        if any(block is b for b in skipping):
            continue
        block.forward = torch.compile(block.forward, backend=backend)  # hooks stay outside (module docstring)
        counts[type(block).__name__] = counts.get(type(block).__name__, 0) + 1
    return {"enabled": True, "backend": name, "blocks": counts}
