"""LoRA files in the formats people publish them in, read into one form: per layer a down (rank, in) and an up
(out, rank) matrix and an optional alpha.

Recognised key layouts (the module part may use either diffusers' names or the original ones):

- diffusers / PEFT: ``[transformer.|base_model.model.]<module>.lora_A[.default].weight`` and ``lora_B``;
- kohya: ``lora_unet_<module with _ for .>.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``;
- ai-toolkit and other trainers writing original names: ``[diffusion_model.]<module>.lora_A.weight`` /
  ``lora_down`` ..., with or without ``.alpha``.

The scale of a layer is ``weight · alpha / rank`` where the file gives an alpha, else ``weight`` (PEFT files
from diffusers carry no alpha: their updates are stored at scale 1). Anything else in the file (DoRA
magnitudes, bias deltas, full weight diffs) is refused with its key named, rather than silently skipped, and
so are matrices holding NaN or infinite values (they would turn every image into noise or NaNs).

A file is read into memory once (``load_lora``): its SHA-256 (what the audit line and the manifest record) is
computed from those bytes and the tensors are decoded from the same bytes, so the LoRA recorded is the LoRA
applied even if the file is replaced meanwhile. Pickled files are refused by name, before anything is read.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxframe.core.checkpoint import PICKLE_SUFFIXES
from fluxframe.core.hashing import sha256_bytes
from fluxframe.errors import CheckpointError

PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_",
            "lora_transformer_")
DOWN = (".lora_A.default.weight", ".lora_A.weight", ".lora_down.weight")
UP = (".lora_B.default.weight", ".lora_B.weight", ".lora_up.weight")
ALPHA = (".alpha",)


@dataclass
class LoraLayer:
    """One adapted layer as the file names it (prefix and LoRA suffix removed)."""

    name: str
    key: str  # the file's key of the down matrix, for messages
    down: torch.Tensor  # (rank, in)
    up: torch.Tensor  # (out, rank)
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def scale(self, weight: float) -> float:
        return weight * (self.alpha / self.rank if self.alpha is not None else 1.0)


def _split(key: str) -> tuple[str, str] | None:
    """(module name, role) of a LoRA key, role one of down/up/alpha; None for keys that are none of them."""
    for role, suffixes in (("down", DOWN), ("up", UP), ("alpha", ALPHA)):
        for suffix in suffixes:
            if key.endswith(suffix):
                name = key[: -len(suffix)]
                for prefix in PREFIXES:
                    if name.startswith(prefix):
                        name = name[len(prefix):]
                        break
                return name, role
    return None


@dataclass
class LoraFile:
    """A LoRA file as read, once: its layers, the SHA-256 of the very bytes they were decoded from
    (``"sha256:<hex>"``), and the ``__metadata__`` of its header."""

    path: Path
    sha256: str
    layers: list[LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)


def _read_once(path: Path) -> bytes:
    """The whole file, from one open; a pickle (by suffix) is refused before it is opened at all."""
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        raise CheckpointError("pickled LoRA files are refused: unpickling can run arbitrary code. Convert it to "
                              "safetensors in a trusted environment", file=str(path))
    try:
        # O_NONBLOCK: a FIFO named as a LoRA must not hang start-up before fstat can refuse it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CheckpointError("LoRA file does not exist", file=str(path)) from None
    except OSError as exc:
        raise CheckpointError(f"cannot open: {exc.strerror or exc}", file=str(path)) from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise CheckpointError("not a file", file=str(path))
        try:
            return fh.read()
        except OSError as exc:
            raise CheckpointError(f"cannot read: {exc.strerror or exc}", file=str(path)) from None


def _tensors(data: bytes, file: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of safetensors ``data``. The header is checked here first (8-byte little-endian
    length, then JSON) so that a truncated file names the first tensor it cuts into; safetensors then decodes
    the tensors (and refuses anything else malformed)."""
    from safetensors.torch import load

    if len(data) < 8:
        raise CheckpointError(f"only {len(data)} bytes: empty or truncated, not a safetensors file", file=file)
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise CheckpointError(f"header claims {n} bytes but the file has {len(data)}: truncated, or not a "
                              "safetensors file", file=file)
    try:
        header = json.loads(data[8: 8 + n])
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"header is not valid JSON ({exc}): corrupt, or not a safetensors file",
                              file=file) from None
    if not isinstance(header, dict):
        raise CheckpointError("header is not a JSON object: corrupt, or not a safetensors file", file=file)
    metadata = header.pop("__metadata__", None) or {}
    for key, entry in header.items():
        try:
            end = 8 + n + int(entry["data_offsets"][1])
        except (TypeError, KeyError, IndexError, ValueError):
            continue  # malformed entry: safetensors names the problem below
        if end > len(data):
            raise CheckpointError(f"file is truncated: this tensor's data ends at byte {end}, the file has "
                                  f"{len(data)} bytes", file=file, key=key)
    try:
        tensors = load(data)  # each tensor in memory of its own, copied out of ``data``
    except Exception as exc:  # SafetensorError is a plain Exception subclass
        raise CheckpointError(f"not a valid safetensors file: {exc}", file=file) from None
    return tensors, dict(metadata) if isinstance(metadata, dict) else {}


def load_lora(path: Path) -> LoraFile:
    """Read a LoRA safetensors file once and return its layers (in key order) with the SHA-256 of the bytes
    they came from. CheckpointError naming the file and key for a key that is not a LoRA matrix, a down without
    its up (or the reverse), matrices whose ranks differ or that are not floating point, a matrix holding NaN
    or infinite values, or an alpha that is not one finite number."""
    path = Path(path)
    file = str(path)
    data = _read_once(path)
    sha256 = "sha256:" + sha256_bytes(data)
    tensors, metadata = _tensors(data, file)
    del data  # the tensors own copies; the file's bytes are not kept alive beside them
    if not tensors:
        raise CheckpointError("the LoRA file holds no tensors", file=file)
    parts: dict[str, dict[str, str]] = {}
    for key in sorted(tensors):
        split = _split(key)
        if split is None:
            raise CheckpointError(
                "not a LoRA matrix fluxframe can apply (expected lora_A/lora_B, lora_down/lora_up or alpha "
                "keys; DoRA, bias and full-weight deltas are not supported)", file=file, key=key)
        name, role = split
        if role in parts.setdefault(name, {}):
            raise CheckpointError(f"a second {role} matrix for layer {name!r} (also {parts[name][role]!r})",
                                  file=file, key=key)
        parts[name][role] = key
    layers = []
    for name, roles in parts.items():
        for needed in ("down", "up"):
            if needed not in roles:
                other = next(iter(roles.values()))
                raise CheckpointError(f"layer {name!r} has no {needed} matrix", file=file, key=other)
        down, up = tensors[roles["down"]], tensors[roles["up"]]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise CheckpointError(
                f"down {tuple(down.shape)} and up {tuple(up.shape)} are not the two factors of a rank-r "
                "update of a linear layer (down (r, in), up (out, r))", file=file, key=roles["down"])
        if not (down.is_floating_point() and up.is_floating_point()):
            raise CheckpointError(f"LoRA matrices must be floating point, got {down.dtype}", file=file,
                                  key=roles["down"])
        for role, matrix in (("down", down), ("up", up)):
            # .float(): isfinite is not implemented for every dtype a file may hold (float8)
            if not torch.isfinite(matrix.float()).all():
                raise CheckpointError("holds NaN or infinite values: a corrupt or diverged LoRA", file=file,
                                      key=roles[role])
        alpha = None
        if "alpha" in roles:
            value = tensors[roles["alpha"]]
            if value.numel() != 1 or not torch.isfinite(value.float()).all():
                raise CheckpointError("alpha must be one finite number", file=file, key=roles["alpha"])
            alpha = float(value.float().item())
        layers.append(LoraLayer(name=name, key=roles["down"], down=down, up=up, alpha=alpha))
    return LoraFile(path, sha256, layers, metadata)


def read_lora(path: Path) -> list[LoraLayer]:
    """The layers of a LoRA file (see ``load_lora``, which also gives the SHA-256 of the bytes read)."""
    return load_lora(path).layers
