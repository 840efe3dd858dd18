"""Where a LoRA layer lands in fluxframe's DiT.

fluxframe's DiTs use the original (single-file) module names, where q, k and v share one projection and the
final modulation has its halves swapped relative to diffusers. A LoRA trained on diffusers' separate
``to_q``/``to_k``/``to_v`` therefore updates a band of rows of fluxframe's fused layer. The map is derived
from the family's own key table (``keymap.rules``), the same one the checkpoint loader reads through, so a
LoRA lands exactly where the weights it was trained against were loaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

SAME, CAT, SWAP = "same", "cat", "swap"  # the kinds of keymap.rules


@dataclass(frozen=True)
class Segment:
    """Rows ``row:row+rows`` of module ``module`` receive rows ``src:src+rows`` of the LoRA's up matrix."""

    module: str
    row: int
    src: int
    rows: int


def lora_targets(rules: Iterable[tuple[str, tuple[str, ...], str]], model: nn.Module,
                 hidden_size: int) -> dict[str, list[Segment]]:
    """Every name a LoRA may use for a linear layer of ``model`` -> the segments it writes.

    Names: fluxframe's (original) module names, diffusers' names, and both with "_" for "." (kohya).
    ``rules`` yields (fluxframe key, diffusers keys, kind) like the family's keymap; concatenated parts are
    ``hidden_size`` rows each except the last, which takes the rest (q, k, v [, mlp-in]).
    """
    modules = dict(model.named_modules())
    targets: dict[str, list[Segment]] = {}
    for ours, theirs, kind in rules:
        if not ours.endswith(".weight"):
            continue
        name = ours[: -len(".weight")]
        module = modules.get(name)
        out = getattr(module, "out_features", None)
        if out is None:  # a norm scale, not a linear layer
            continue
        targets[name] = [Segment(name, 0, 0, out)]
        their_names = [t[: -len(".weight")] for t in theirs]
        if kind == SAME:
            targets[their_names[0]] = [Segment(name, 0, 0, out)]
        elif kind == SWAP:
            half = out // 2
            targets[their_names[0]] = [Segment(name, half, 0, half), Segment(name, 0, half, half)]
        elif kind == CAT:
            row = 0
            for i, their in enumerate(their_names):
                rows = hidden_size if i < len(their_names) - 1 else out - row
                targets[their] = [Segment(name, row, 0, rows)]
                row += rows
        else:
            raise ValueError(f"unknown key rule kind {kind!r} for {ours}")
    for name in list(targets):
        alias = name.replace(".", "_")
        if alias != name:
            if alias in targets and targets[alias] != targets[name]:
                raise ValueError(f"kohya name {alias!r} is ambiguous in this model")
            targets[alias] = targets[name]
    return targets


def rows_of(segments: list[Segment]) -> int:
    """Rows the LoRA's up matrix must have for these segments."""
    return max(s.src + s.rows for s in segments)
