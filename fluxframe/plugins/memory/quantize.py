"""Weight-only quantisation of the DiT: every ``nn.Linear`` inside its double and single blocks becomes a
``QuantLinear`` that stores its weight in 8 or 4 bits and dequantises it, one layer at a time, when the layer
runs (plain torch, so the CPU runs it too). Biases, norms and everything outside the blocks (embedders,
shared modulation, final layer: a few percent of the bytes, and the layers every block's input passes
through) keep their dtype.

Formats (``[memory.quantize] format``):

- ``int8``: a scale per output channel (absmax / 127), values rounded to [-127, 127].
- ``fp8``: float8 e4m3 values with a scale per output channel (absmax / 448); needs ``torch.float8_e4m3fn``.
- ``nf4``: 4-bit NormalFloat (QLoRA's 16 levels, quantiles of a normal distribution) with an absmax scale
  per ``group_size`` consecutive inputs of a row; two codes a byte.

Scales are float32. ``QuantLinear.weight`` is a property returning the dequantised weight in the layer's
original dtype, so code that reads weights directly (FLUX.2's SingleBlock slices ``linear1.weight``) keeps
working unchanged. The quantised tensors are buffers, so offloading strategies move them like any other
tensor; composed, ``quantize`` runs before the placing strategy (``rewrites_weights``), so ``quantize+
group-offload`` streams the quantised blocks.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fluxframe.core.interfaces import MemoryStrategy

#: The 16 NF4 levels (Dettmers et al., QLoRA, 2023), ascending.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
FORMATS = ("int8", "fp8", "nf4")
_TINY = 1e-12  # scale floor: an all-zero row or group quantises to zeros, not NaN


def _has_fp8() -> bool:
    return hasattr(torch, "float8_e4m3fn")


# Rows are quantised in bands of about this many weights: 1 MB of float32 temporaries. Bands of 16 MB made the
# peak of a quantising load vary from run to run (0.61x-0.79x of a 1.91 GB checkpoint): once glibc's dynamic mmap
# threshold has risen past them, they are carved from the heap between long-lived codes and fragment it; at 1 MB
# the peak was 0.59x in 10 runs of 10, and the load no slower.
_CHUNK_ELEMENTS = 1 << 18


def quantize_weight(w: torch.Tensor, fmt: str, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, float32 scales) of a 2-D weight (out, in). Every scale covers part of one row, so the rows are
    quantised in bands: the float32 temporaries stay small whatever the layer's size."""
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    rows = max(1, _CHUNK_ELEMENTS // max(1, w.shape[1]))
    if w.shape[0] <= rows:
        return _quantize_rows(w, fmt, group_size)
    parts = [_quantize_rows(w[i:i + rows], fmt, group_size) for i in range(0, w.shape[0], rows)]
    return torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])


def _quantize_rows(w: torch.Tensor, fmt: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.detach().float()
    if fmt == "int8":
        scale = (w.abs().amax(1) / 127).clamp_min(_TINY)
        return (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8), scale
    if fmt == "fp8":
        scale = (w.abs().amax(1) / torch.finfo(torch.float8_e4m3fn).max).clamp_min(_TINY)
        return (w / scale[:, None]).to(torch.float8_e4m3fn), scale
    if fmt == "nf4":
        pad = -w.shape[1] % group_size
        groups = F.pad(w, (0, pad)).view(-1, group_size)
        scale = groups.abs().amax(1).clamp_min(_TINY)
        levels = NF4_LEVELS.to(w.device)
        index = torch.bucketize(groups / scale[:, None], (levels[1:] + levels[:-1]) / 2)  # the nearest level
        pairs = index.view(-1, 2).to(torch.uint8)
        return pairs[:, 0] << 4 | pairs[:, 1], scale
    raise AssertionError(fmt)


def _nf4_byte_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 2): the two levels a packed byte stands for (high nibble first)."""
    codes = torch.arange(256, device=device)
    return NF4_LEVELS.to(device, dtype)[torch.stack([codes >> 4, codes & 15], 1)]


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored quantised and dequantised when it is used."""

    def __init__(self, linear: nn.Linear, fmt: str, group_size: int = 64):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.format, self.group_size, self.dtype = fmt, group_size, linear.weight.dtype
        codes, scale = quantize_weight(linear.weight, fmt, group_size)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_parameter("bias", linear.bias)
        # nf4's byte -> two levels table, built here rather than on first use: a buffer moves with the codes (the
        # offloading strategies move buffers), and ``torch.compile`` traces a forward that only reads it (setting
        # an attribute from None to a tensor inside a compiled forward fails dynamo's guards). Not saved.
        table = _nf4_byte_table(self.dtype, codes.device) if fmt == "nf4" else None
        self.register_buffer("table", table, persistent=False)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (out, in), in the original dtype, on the device the codes are on."""
        scale = self.scale.to(self.dtype)
        if self.format != "nf4":
            return self.codes.to(self.dtype) * scale[:, None]
        groups = self.table[self.codes.int()].view(-1, self.group_size) * scale[:, None]
        return groups.view(self.out_features, -1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return _Dequantized.apply(x, self.bias, self)  # training through a frozen quantised layer
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.format == "nf4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}{group}"


class _Dequantized(torch.autograd.Function):
    """``F.linear(x, layer.weight, bias)`` whose backward pass dequantises the weight again instead of keeping
    the forward pass's copy: gradients flowing through a frozen quantised layer (a LoRA trained on a quantised
    base, ``fluxframe train-lora --quantize``) cost the layer's input, not a full-precision copy of every
    weight held until the backward pass. The weight itself gets no gradient (its codes are buffers)."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer, ctx.has_bias = layer, bias is not None
        return F.linear(x, layer.weight, bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad @ ctx.layer.weight if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None


def _block_linears(module: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) for every nn.Linear inside the DiT's double and single blocks."""
    lists = [getattr(module, name) for name in ("double_blocks", "single_blocks")
             if isinstance(getattr(module, name, None), nn.ModuleList)]
    if not lists:
        raise ValueError(f"quantize rewrites the blocks of a DiT with double_blocks/single_blocks; "
                         f"{type(module).__name__} has neither")
    found = []
    for blocks in lists:
        for parent in blocks.modules():
            for name, child in parent.named_children():
                if type(child) is nn.Linear:
                    found.append((parent, name, child))
    return found


def _new_stats() -> dict[str, int]:
    return {"layers": 0, "bytes_before": 0, "bytes_after": 0}


def _replace(parent: nn.Module, name: str, linear: nn.Linear, fmt: str, group_size: int, stats: dict) -> None:
    with torch.no_grad():
        layer = QuantLinear(linear, fmt, group_size)
    setattr(parent, name, layer)
    stats["layers"] += 1
    stats["bytes_before"] += linear.weight.numel() * linear.weight.element_size()
    stats["bytes_after"] += layer.nbytes


def quantize_blocks(module: nn.Module, fmt: str, group_size: int = 64, stats: dict | None = None) -> dict[str, int]:
    """Replace the block linears of a DiT in place; returns {"layers", "bytes_before", "bytes_after"} of the
    replaced weights (added to ``stats`` if given)."""
    stats = _new_stats() if stats is None else stats
    for parent, name, linear in _block_linears(module):
        _replace(parent, name, linear, fmt, group_size, stats)
    return stats


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc
        return None


def _release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing). Without it a
    full-precision weight freed after quantisation stays in the process's heap between the codes allocated
    after it, and the resident size of a quantising load climbs towards the full-precision model's anyway."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def quantize_while_loading(module: nn.Module, fmt: str, group_size: int = 64,
                           stats: dict | None = None) -> Callable[[str], None]:
    """For a DiT built on the meta device: a ``load_into`` ``on_loaded`` hook that quantises each block linear
    as soon as its weight (and bias) are loaded, so the loader's peak memory is the quantised model plus one
    full-precision tensor, not the full-precision model."""
    stats = _new_stats() if stats is None else stats
    paths = {id(m): path for path, m in module.named_modules()}
    pending: dict[str, tuple[nn.Module, str, nn.Linear, set[str]]] = {}
    for parent, name, linear in _block_linears(module):
        tensors = {n for n, p in linear.named_parameters(recurse=False) if p is not None}
        pending[paths[id(linear)]] = (parent, name, linear, tensors)

    def loaded(key: str) -> None:
        path, _, leaf = key.rpartition(".")
        entry = pending.get(path)
        if entry is None:
            return
        parent, name, linear, waiting = entry
        waiting.discard(leaf)
        if not waiting:
            del pending[path]
            _replace(parent, name, linear, fmt, group_size, stats)
            del entry, linear
            _release_freed_memory()

    return loaded


class Quantize(MemoryStrategy):
    """``[memory] strategy = "quantize"``: the DiT's block linears stored in ``format`` (int8, fp8, nf4) and
    dequantised per layer at matmul time. It places nothing itself: alone, the DiT is loaded and quantised on
    the CPU (its full-precision weights never reach the device), then every component goes to the device as
    with ``none``; composed (``"quantize+group-offload"``, ``"quantize+model-offload"``), it rewrites the DiT
    where the placing strategy loaded it, before that strategy moves it."""

    name = "quantize"
    placement = False
    rewrites_weights = True

    def __init__(self, format: str = "int8", group_size: int = 64):  # noqa: A002 - the config key
        if format not in FORMATS:
            raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
        if format == "fp8" and not _has_fp8():
            raise ValueError("format: fp8 needs a torch with float8_e4m3fn")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
            raise ValueError(f"group_size: expected a positive even integer, got {group_size!r}")
        self.format, self.group_size = format, group_size
        self.stats = _new_stats()
        self._loading: nn.Module | None = None  # the DiT while_loading is quantising

    def load_device(self, component, device):
        return torch.device("cpu") if component == "transformer" else device

    def while_loading(self, component, module):
        if component != "transformer":
            return None
        self.stats = _new_stats()
        self._loading = module
        return quantize_while_loading(module, self.format, self.group_size, self.stats)

    def place(self, component, module, device):
        if component == "transformer":  # whatever was not quantised while loading (a family without the hook)
            if self._loading is not module:
                self.stats = _new_stats()
            self._loading = None
            quantize_blocks(module, self.format, self.group_size, self.stats)
        return module
