"""Applying LoRAs to a DiT without copying its weights, and taking them off again exactly.

Two ways, chosen per LoRA (``mode``), per layer for ``auto``:

- **fuse** (auto: plain floating-point linears): ``W += Σ scale · up @ down`` in place, computed in fp32 in
  bands of rows (so the temporary memory is bounded, not a copy of W). Subtracting the same update later
  gives back W except where the first rounding lost bits; those elements are found at fuse time (by doing
  the unfuse arithmetic once) and their original values kept, so ``remove`` restores W bit for bit. A
  checksum of W's bits taken before fusing guards the restore.
- **side** (auto: quantised linears, which cannot be changed without requantising): the layer is wrapped so
  it returns ``base(x) + (x @ downᵀ) @ upᵀ``; its weights are never touched, and removing the wrapper is the
  whole undo. All the LoRAs on a layer share one pair of matrices (their ranks concatenated), so a layer
  costs two thin GEMMs whatever the number of LoRAs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fluxframe.errors import CheckpointError, ConfigError

from .formats import load_lora
from .targets import Segment, rows_of

MODES = ("auto", "fuse", "side")
_CHUNK = 1 << 24  # elements of W updated per band in fuse/unfuse


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: its file, its weight, and how (``mode``); ``key`` names it in messages."""

    path: Path
    weight: float = 1.0
    mode: str = "auto"
    key: str = "lora"


class LoraLinear(nn.Module):
    """A linear layer plus a low-rank side path: ``base(x) + (x @ downᵀ) @ upᵀ`` (the LoRA scales are in up)."""

    def __init__(self, base: nn.Module, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("down", down)
        self.register_buffer("up", up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = F.linear(x.to(self.down.dtype), self.down).reshape(-1, self.down.shape[0])
        if y.dtype == self.up.dtype and y.is_contiguous():  # accumulate into y: no output-sized temporary
            y.view(-1, self.out_features).addmm_(h, self.up.t())
            return y
        return y + (h @ self.up.t()).view(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.down.shape[0]}"


def _bits(w: torch.Tensor) -> torch.Tensor:
    return w.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[w.element_size()])


def _checksum(w: torch.Tensor) -> int:
    return int(_bits(w).to(torch.int64).sum().item())


def _bands(w: torch.Tensor):
    step = max(1, _CHUNK // max(1, w.shape[1]))
    for r0 in range(0, w.shape[0], step):
        yield slice(r0, min(r0 + step, w.shape[0]))


@dataclass
class _Fused:
    """What ``unfuse`` needs: the update's factors (fp32, on W's device) and the elements to put back."""

    down: torch.Tensor
    up: torch.Tensor
    fix_index: torch.Tensor
    fix_value: torch.Tensor
    checksum: int


@torch.no_grad()
def fuse(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> _Fused:
    """``weight += up @ down`` in place (fp32 arithmetic, rounded to weight's dtype); returns the unfuse record."""
    down, up = down.to(weight.device, torch.float32), up.to(weight.device, torch.float32)
    checksum = _checksum(weight)
    bits = _bits(weight).view(-1)
    index, value = [], []
    for band in _bands(weight):
        w = weight[band]
        delta = up[band] @ down
        fused = (w.float() + delta).to(weight.dtype)
        back = (fused.float() - delta).to(weight.dtype)
        lost = (_bits(back) != _bits(w)).view(-1).nonzero().view(-1) + band.start * weight.shape[1]
        index.append(lost.to(torch.int32) if weight.numel() < 2**31 else lost)
        value.append(bits[lost])  # advanced indexing copies
        w.copy_(fused)
    return _Fused(down, up, torch.cat(index), torch.cat(value), checksum)


@torch.no_grad()
def unfuse(weight: torch.Tensor, record: _Fused) -> None:
    """Undo ``fuse`` bit for bit; a RuntimeError if the weight does not come back to what it was."""
    for band in _bands(weight):
        w = weight[band]
        w.copy_((w.float() - record.up[band] @ record.down).to(weight.dtype))
    _bits(weight).view(-1)[record.fix_index.long()] = record.fix_value
    if _checksum(weight) != record.checksum:
        raise RuntimeError("unfusing a LoRA did not restore the weights exactly (they were changed while it "
                           "was fused)")


@dataclass
class _Layer:
    """The LoRA updates bound for one module: factors per mode, concatenated over LoRAs."""

    parent: nn.Module
    attr: str
    module: nn.Module
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=lambda: {"fuse": [], "side": []})


@dataclass
class AppliedLoras:
    """LoRAs on a model; ``remove()`` takes them all off, restoring every weight and module exactly."""

    records: list[dict]
    _fused: list[tuple[torch.Tensor, _Fused]]
    _wrapped: list[tuple[nn.Module, str, nn.Module]]

    def remove(self) -> None:
        for weight, record in reversed(self._fused):
            unfuse(weight, record)
        for parent, attr, original in reversed(self._wrapped):
            setattr(parent, attr, original)
        self._fused, self._wrapped = [], []


def _first(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _plan(model: nn.Module, targets: dict[str, list[Segment]], specs: list[LoraSpec], what: str):
    """Read and check every LoRA; nothing in the model changes here. Returns (layers by module, records)."""
    modules = dict(model.named_modules())
    layers: dict[str, _Layer] = {}
    records = []
    for spec in specs:
        if spec.mode not in MODES:
            raise ConfigError(f"must be one of {', '.join(MODES)}, got {spec.mode!r}", key=f"{spec.key}.mode")
        if not isinstance(spec.weight, int | float) or not torch.isfinite(torch.tensor(float(spec.weight))):
            raise ConfigError(f"must be a finite number, got {spec.weight!r}", key=f"{spec.key}.weight")
        file = str(spec.path)
        lora = load_lora(spec.path)  # read once: the sha256 recorded is of the bytes the tensors came from
        found = lora.layers
        unmatched = [layer.name for layer in found if layer.name not in targets]
        if unmatched:
            first = next(layer.key for layer in found if layer.name == unmatched[0])
            raise CheckpointError(
                f"{len(unmatched)} of {len(found)} LoRA layers match nothing in the {what}: {_first(unmatched)} "
                "(a LoRA for another model, or for its text encoder?)", file=file, key=first)
        modes = {"fuse": 0, "side": 0}
        for layer in found:
            segments = targets[layer.name]
            module = modules[segments[0].module]
            if layer.down.shape[1] != module.in_features or layer.up.shape[0] != rows_of(segments):
                raise CheckpointError(
                    f"an update of shape ({layer.up.shape[0]}, {layer.down.shape[1]}) does not fit layer "
                    f"{layer.name!r}, which needs ({rows_of(segments)}, {module.in_features}): a LoRA for another "
                    "size of model?", file=file, key=layer.key)
            up = torch.zeros(module.out_features, layer.rank)
            for s in segments:
                up[s.row: s.row + s.rows] = layer.up[s.src: s.src + s.rows].float()
            up *= layer.scale(float(spec.weight))
            plain = type(module) is nn.Linear and module.weight.is_floating_point()
            mode = ("fuse" if plain else "side") if spec.mode == "auto" else spec.mode
            if mode == "fuse" and not plain:
                raise ConfigError(f"layer {segments[0].module!r} is {type(module).__name__}, whose weights cannot "
                                  "be fused (quantised?): use mode \"side\" or \"auto\"", key=f"{spec.key}.mode")
            parent_name, _, attr = segments[0].module.rpartition(".")
            entry = layers.setdefault(segments[0].module,
                                      _Layer(modules[parent_name] if parent_name else model, attr, module))
            entry.parts[mode].append((layer.down.float(), up))
            modes[mode] += 1
        records.append({"file": spec.path.name, "sha256": lora.sha256, "weight": float(spec.weight),
                        "mode": spec.mode, "layers": len(found), "fused": modes["fuse"], "side": modes["side"]})
    return layers, records


def apply_loras(model: nn.Module, targets: dict[str, list[Segment]], specs: list[LoraSpec], *,
                device: torch.device | str, what: str = "DiT") -> AppliedLoras:
    """Apply ``specs`` to ``model`` (see the module docstring). Every file is read and checked before the
    model is touched; if applying fails part-way, what was applied is taken off again."""
    layers, records = _plan(model, targets, specs, what)
    applied = AppliedLoras(records, [], [])
    try:
        for layer in layers.values():
            if layer.parts["fuse"]:
                downs, ups = zip(*layer.parts["fuse"])
                weight = layer.module.weight
                applied._fused.append((weight, fuse(weight.data, torch.cat(downs), torch.cat(ups, dim=1))))
            if layer.parts["side"]:
                downs, ups = zip(*layer.parts["side"])
                dtype = getattr(layer.module, "dtype", None) or layer.module.weight.dtype
                wrapper = LoraLinear(layer.module, torch.cat(downs).to(device, dtype),
                                     torch.cat(ups, dim=1).to(device, dtype))
                setattr(layer.parent, layer.attr, wrapper)
                applied._wrapped.append((layer.parent, layer.attr, layer.module))
    except BaseException:
        applied.remove()
        raise
    return applied
