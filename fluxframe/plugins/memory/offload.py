"""Offloading: weights live on an offload device (the CPU, pinned when the compute device is CUDA) and are
copied to the compute device only for the time they are needed.

Weights never change at inference, so offloading never copies back: each tensor keeps its host copy, an
onload points the tensor's ``.data`` at a fresh device copy, and an offload points it back at the host copy
(the device copy is freed). The same code runs on the CPU, where the "device copy" is a second CPU tensor,
so tests exercise every move; only the side stream and pinned memory are CUDA-only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fluxframe.core.interfaces import MemoryStrategy


def _device(value: Any, what: str) -> torch.device:
    try:
        return torch.device(value)
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"{what}: not a device: {value!r}") from exc


def _torch_modules(obj: Any) -> list[nn.Module]:
    """The torch modules holding a component's weights: the component itself, or, for a wrapper that is not a
    module (the FLUX.2 prompt encoders), the modules among its attributes."""
    if isinstance(obj, nn.Module):
        return [obj]
    found = [value for value in vars(obj).values() if isinstance(value, nn.Module)]
    if not found:
        raise ValueError(f"cannot offload {type(obj).__name__}: it holds no torch modules")
    return found


class TensorGroup:
    """The parameters and buffers of some modules, moved together (shared tensors counted once)."""

    def __init__(self, modules: list[nn.Module], offload_device: torch.device, pin: bool):
        seen: dict[int, torch.Tensor] = {}
        for module in (m for obj in modules for m in _torch_modules(obj)):
            for tensor in (*module.parameters(), *module.buffers()):
                seen.setdefault(id(tensor), tensor)
        self.tensors = list(seen.values())
        self.host: list[torch.Tensor] = []
        for tensor in self.tensors:
            data = tensor.data.to(offload_device)
            if pin and data.device.type == "cpu" and not data.is_pinned():
                data = data.pin_memory()
            tensor.data = data
            self.host.append(data)
        self.on_device = False
        self.ready: torch.cuda.Event | None = None  # set when an onload runs on a side stream

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host)

    def onload(self, device: torch.device, stream: Any = None) -> None:
        """Copy every tensor to ``device``; on ``stream`` (a side CUDA stream) without waiting for it."""
        # Each copy is made in the mode its host copy was (an inference tensor where the component was loaded
        # under torch.inference_mode), so the module sees the same kind of tensor as without offloading.
        if stream is None:
            for tensor, host in zip(self.tensors, self.host):
                with torch.inference_mode(host.is_inference()):
                    tensor.data = torch.empty_like(host, device=device).copy_(host, non_blocking=host.is_pinned())
            self.ready = None
        else:
            compute = torch.cuda.current_stream(device)
            with torch.cuda.stream(stream):
                for tensor, host in zip(self.tensors, self.host):
                    with torch.inference_mode(host.is_inference()):
                        copy = torch.empty_like(host, device=device).copy_(host, non_blocking=True)
                    copy.record_stream(compute)  # freed at offload only once the compute stream is done with it
                    tensor.data = copy
                self.ready = torch.cuda.Event()
                self.ready.record(stream)
        self.on_device = True

    def wait(self) -> None:
        """Make the current stream wait for a side-stream onload."""
        if self.ready is not None:
            torch.cuda.current_stream().wait_event(self.ready)
            self.ready = None

    def offload(self) -> None:
        for tensor, host in zip(self.tensors, self.host):
            tensor.data = host
        self.on_device = False
        self.ready = None


class _Offloading(MemoryStrategy):
    def __init__(self, offload_device: str = "cpu", pin_memory: bool = True):
        self.offload_device = _device(offload_device, "offload_device")
        if not isinstance(pin_memory, bool):
            raise ValueError(f"pin_memory: expected true or false, got {pin_memory!r}")
        self.pin_memory = pin_memory
        self.stats = {"onloads": 0, "offloads": 0, "prefetches": 0, "onloaded_bytes": 0}

    def _pin(self, device) -> bool:
        return self.pin_memory and torch.device(device).type == "cuda" and self.offload_device.type == "cpu"

    def _onload(self, group: TensorGroup, device, stream=None) -> None:
        group.onload(torch.device(device), stream)
        self.stats["onloads"] += 1
        self.stats["onloaded_bytes"] += group.nbytes

    def _offload(self, group: TensorGroup) -> None:
        group.offload()
        self.stats["offloads"] += 1


class ModelOffload(_Offloading):
    """Each component lives on the offload device and is copied to the device when it is used. It stays there
    until another component is needed (so the DiT is not copied again for every step), which offloads it: at
    most one component's weights are on the device at a time."""

    name = "model-offload"

    def __init__(self, offload_device: str = "cpu", pin_memory: bool = True):
        super().__init__(offload_device, pin_memory)
        self.groups: dict[int, TensorGroup] = {}  # id(module) -> its tensors
        self.resident: TensorGroup | None = None

    def load_device(self, component, device):
        return self.offload_device

    def place(self, component, module, device):
        self.groups[id(module)] = TensorGroup([module], self.offload_device, self._pin(device))
        return module

    def before_use(self, component, module, device):
        group = self.groups.get(id(module))
        if group is None or group is self.resident:
            return
        if self.resident is not None:
            self._offload(self.resident)
        self._onload(group, device)
        self.resident = group

    def offload_all(self) -> None:
        if self.resident is not None:
            self._offload(self.resident)
            self.resident = None


def _block_lists(module: nn.Module) -> list[str]:
    names = [name for name in ("double_blocks", "single_blocks") if isinstance(getattr(module, name, None), nn.ModuleList)]
    if not names:
        raise ValueError(f"group-offload streams the blocks of a DiT with double_blocks/single_blocks; "
                         f"{type(module).__name__} has neither")
    return names


class GroupOffload(_Offloading):
    """The DiT's blocks (double, then single, in the order they run) in groups of ``blocks_per_group`` stay on
    the offload device; a group is copied to the device just before its first block runs and dropped after its
    last block ran. With ``prefetch`` the next group's copy starts as the current group starts, on a side CUDA
    stream from pinned memory, so copies overlap compute (on the CPU the same calls run without a stream). The
    DiT's other layers (embedders, modulation, final layer) stay on the device. Other components are kept on
    the device, or, composed after it, placed by the next strategy (e.g. ``model-offload``).

    ``resident_blocks`` keeps the first that many blocks on the device for good, so a card with room for part of
    the DiT streams only the rest: fewer bytes copied per step, and the first streamed group is prefetched
    while the resident blocks run (so with prefetch no copy is waited for at the start of a forward)."""

    name = "group-offload"

    def __init__(self, blocks_per_group: int = 1, prefetch: bool = True, offload_device: str = "cpu",
                 pin_memory: bool = True, resident_blocks: int = 0):
        super().__init__(offload_device, pin_memory)
        if not isinstance(blocks_per_group, int) or isinstance(blocks_per_group, bool) or blocks_per_group < 1:
            raise ValueError(f"blocks_per_group: expected a positive integer, got {blocks_per_group!r}")
        if not isinstance(prefetch, bool):
            raise ValueError(f"prefetch: expected true or false, got {prefetch!r}")
        if not isinstance(resident_blocks, int) or isinstance(resident_blocks, bool) or resident_blocks < 0:
            raise ValueError(f"resident_blocks: expected a whole number of blocks (0 or more), got {resident_blocks!r}")
        self.blocks_per_group = blocks_per_group
        self.prefetch = prefetch
        self.resident_blocks = resident_blocks
        self.groups: list[TensorGroup] = []
        self._stream = None
        self._hooks: list[Any] = []

    def handles(self, component):
        return component == "transformer"

    def load_device(self, component, device):
        return self.offload_device if component == "transformer" else device

    def place(self, component, module, device):
        if component != "transformer":
            return module.to(device)
        device = torch.device(device)
        lists = _block_lists(module)
        blocks = [block for name in lists for block in getattr(module, name)]
        resident, streamed = blocks[: self.resident_blocks], blocks[self.resident_blocks :]
        for name, child in module.named_children():
            if name not in lists:
                child.to(device)
        for block in resident:
            block.to(device)
        for tensors in (module._parameters, module._buffers):
            for key, tensor in tensors.items():
                if tensor is not None:
                    tensor.data = tensor.data.to(device)
        chunks = [streamed[i : i + self.blocks_per_group] for i in range(0, len(streamed), self.blocks_per_group)]
        pin = self._pin(device)
        self.groups = [TensorGroup(chunk, self.offload_device, pin) for chunk in chunks]
        if device.type == "cuda" and self.prefetch:
            self._stream = torch.cuda.Stream(device)
        if resident and chunks and self.prefetch:  # the first streamed group copies while the resident blocks run
            self._hooks.append(resident[0].register_forward_pre_hook(lambda _m, _a: self._prefetch(0, device)))
        for index, chunk in enumerate(chunks):
            self._hooks.append(chunk[0].register_forward_pre_hook(self._pre_hook(index, device)))
            self._hooks.append(chunk[-1].register_forward_hook(self._post_hook(index)))
        return module

    def _prefetch(self, index: int, device: torch.device) -> None:
        if not self.groups[index].on_device:
            self._onload(self.groups[index], device, self._stream)
            self.stats["prefetches"] += 1

    def _pre_hook(self, index: int, device: torch.device):
        def hook(_module, _args):
            group = self.groups[index]
            if group.on_device:
                group.wait()
            else:
                self._onload(group, device)
            if self.prefetch and index + 1 < len(self.groups):
                self._prefetch(index + 1, device)

        return hook

    def _post_hook(self, index: int):
        def hook(_module, _args, _output):
            self._offload(self.groups[index])

        return hook

    def after_use(self, component, module, device):
        # A forward that raised midway leaves its groups on the device; drop them (a no-op after a normal forward).
        if component == "transformer":
            for group in self.groups:
                if group.on_device:
                    self._offload(group)
