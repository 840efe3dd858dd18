"""The built-in step caches: ``[sampler.cache] method = "first-block"`` (First-Block-Cache, as ParaAttention and
diffusers' FirstBlockCache do it, here for FLUX.2 and Flex.2 blocks) and ``method = "teacache"`` (TeaCache-style,
see ``TeaCache``).

Each step the model family runs its DiT's first block and hands what that block changed (its residual) to
``FirstBlockRun.run``. When the residual's relative L1 change since the last step computed in full is under
``threshold``, the remaining blocks are skipped and the residual they added on that step is added again;
otherwise they run and their residual is stored. Decisions are per image of the batch and per stream (the
positive and negative passes of true CFG), so an image in a batch takes the steps it would take alone. The
runner invalidates an image's state when its conditioning changes between steps (Flex.2 control switching
off): that step is computed in full.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fluxframe.core.interfaces import StepCache, StepCacheRun

#: Relative changes are fractions of the residual's size: over 1 the "cache" would reuse almost every step.
MAX_THRESHOLD = 1.0


class _Stream:
    """One stream's state: per image, the probe to compare the next one with (first-block: at the last full step;
    teacache: at the last step), the residual of the blocks the cache skips at the last full step, and (teacache)
    the change accumulated since that step."""

    def __init__(self, batch: int):
        self.probe: list[torch.Tensor | None] = [None] * batch
        self.residual: list[torch.Tensor | None] = [None] * batch
        self.accumulated = [0.0] * batch


def _relative_l1(now: torch.Tensor, before: torch.Tensor) -> float:
    before = before.float()
    return float((now.float() - before).abs().mean() / before.abs().mean().clamp_min(1e-12))


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold: must be a number, got {threshold!r}")
    if not 0 < threshold <= MAX_THRESHOLD:
        raise ValueError(f"threshold: must be above 0 and at most {MAX_THRESHOLD:g} (a relative change), "
                         f"got {threshold!r}")
    return float(threshold)


class FirstBlockRun(StepCacheRun):
    #: What the model family hands ``run`` as the probe (see ``StepCacheRun.probe``).
    probe = "first-block"

    def __init__(self, batch: int, threshold: float):
        self.batch, self.threshold = batch, threshold
        self.streams: dict[str, _Stream] = {}
        self.computed = [0] * batch
        self.reused = [0] * batch
        self.by_stream: dict[str, list[int]] = {}  # stream -> [computed, reused], over the batch

    def change(self, stream: _Stream, k: int, probe: torch.Tensor) -> float:
        """The relative L1 change of image k's probe since its last full step (inf: there is none)."""
        prev = stream.probe[k]
        if prev is None or stream.residual[k] is None:
            return math.inf
        return _relative_l1(probe[k], prev)

    def reuse(self, stream: _Stream, k: int, probe: torch.Tensor | None) -> bool:
        """Whether image k of this stream reuses the stored residual on this step."""
        return probe is not None and self.change(stream, k, probe) < self.threshold

    def remember(self, stream: _Stream, k: int, probe: torch.Tensor | None, computed: bool) -> None:
        """After the step: first-block keeps the probe of full steps only (it compares with the last full step)."""
        if computed:
            stream.probe[k] = None if probe is None else probe[k].clone()

    def run(self, stream, probe, hidden, rest):
        batch = hidden.shape[0]
        if batch != self.batch:
            raise ValueError(f"step cache started for {self.batch} images got a batch of {batch}")
        state = self.streams.setdefault(stream, _Stream(batch))
        counts = self.by_stream.setdefault(stream, [0, 0])
        reuse = [self.reuse(state, k, probe) for k in range(batch)]
        compute = [k for k in range(batch) if not reuse[k]]
        if len(compute) == batch:
            out = rest(None)
        else:
            out = torch.stack([hidden[k] + state.residual[k] if reuse[k] else hidden[k] for k in range(batch)])
            if compute:
                rows = torch.tensor(compute, device=hidden.device)
                out[rows] = rest(rows)
        for k in range(batch):
            if reuse[k]:
                self.reused[k] += 1
                counts[1] += 1
            else:
                self.computed[k] += 1
                counts[0] += 1
                state.residual[k] = out[k] - hidden[k]
            self.remember(state, k, probe, not reuse[k])
        return out

    def invalidate(self, rows: Sequence[int]) -> None:
        for state in self.streams.values():
            for k in rows:
                state.probe[k] = state.residual[k] = None
                state.accumulated[k] = 0.0

    def counts(self) -> list[dict[str, Any]]:
        return [{"computed": c, "reused": r} for c, r in zip(self.computed, self.reused, strict=True)]


class FirstBlockCache(StepCache):
    """Reuse the DiT's remaining blocks' residual while the first block's output changes by less than
    ``threshold`` (relative L1 change since the last step computed in full; 0 < threshold ≤ 1)."""

    name = "first-block"

    def __init__(self, threshold: float = 0.1):
        self.threshold = _check_threshold(threshold)

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, "threshold": self.threshold}

    def start(self, batch: int) -> FirstBlockRun:
        return FirstBlockRun(batch, self.threshold)


class TeaCacheRun(FirstBlockRun):
    probe = "modulated-input"

    def reuse(self, stream: _Stream, k: int, probe: torch.Tensor | None) -> bool:
        prev = stream.probe[k]
        if probe is None or prev is None or stream.residual[k] is None:
            return False
        stream.accumulated[k] += _relative_l1(probe[k], prev)
        return stream.accumulated[k] < self.threshold

    def remember(self, stream: _Stream, k: int, probe: torch.Tensor | None, computed: bool) -> None:
        """Every step's probe is kept (the change is measured step to step); a full step restarts the sum."""
        stream.probe[k] = None if probe is None else probe[k].clone()
        if computed:
            stream.accumulated[k] = 0.0


class TeaCache(StepCache):
    """TeaCache-style (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model"): the
    probe is the first double block's timestep-modulated image input (adaLN of the image tokens, scaled and
    shifted by the step's modulation), which costs no block at all. Its relative L1 change from one step to the
    next is summed since the last step computed in full; while the sum stays under ``threshold`` every block is
    skipped and the residual of all of them at that step is added again, else all run and the sum restarts. The
    paper's model-specific polynomial rescaling of the change is not applied (no fitted coefficients for these
    models): ``threshold`` bounds the raw change."""

    name = "teacache"

    def __init__(self, threshold: float = 0.1):
        self.threshold = _check_threshold(threshold)

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, "threshold": self.threshold}

    def start(self, batch: int) -> TeaCacheRun:
        return TeaCacheRun(batch, self.threshold)
