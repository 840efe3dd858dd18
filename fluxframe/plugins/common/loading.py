"""What loading a model family needs beyond ``fluxframe.core.checkpoint``: the config's dtype names as torch
dtypes, the config's device resolved, and the safetensors-only rule for text encoder folders (transformers reads
those, not the core's checkpoint reader, so the rule is checked here before transformers sees the folder).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxframe.core.checkpoint import PICKLE_SUFFIXES
from fluxframe.errors import CheckpointError, ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``[model] device``: "auto" is CUDA where there is one, else the CPU; CUDA asked for must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine", key="model.device")
    return device


def require_safetensors(folder: Path) -> None:
    """A CheckpointError unless ``folder`` holds .safetensors weights: unpickling can run arbitrary code."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(
            f"only pickled weights ({', '.join(pickled)}); fluxframe loads safetensors only, since unpickling "
            "can run arbitrary code. Convert the checkpoint to .safetensors",
            file=str(folder),
        )
    raise CheckpointError("no .safetensors weights in the text encoder folder", file=str(folder))
