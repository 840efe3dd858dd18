"""Prompt embeddings files: what `fluxframe encode` writes and `generate --prompt-embeds` reads.

A safetensors file with ``prompt_embeds`` (1, L, D) and, for models that run true classifier-free guidance,
``negative_prompt_embeds``; its metadata holds the prompt text(s), the identity of the encoder that made it
(JSON) and that identity's sha256, so embeddings from another encoder are refused before any weight loads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from fluxframe import __version__
from fluxframe.core.files import atomic_write
from fluxframe.core.inputs import InputFile, read_input
from fluxframe.errors import CheckpointError

FORMAT = "fluxframe-prompt-embeds/1"


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save(path: Path, identity: dict, prompt: str, embeds: torch.Tensor, negative_prompt: str | None = None,
         negative_embeds: torch.Tensor | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {"prompt_embeds": embeds.detach().to("cpu").contiguous()}
    metadata = {"format": FORMAT, "prompt": prompt, "encoder": json.dumps(identity, sort_keys=True),
                "encoder_sha256": identity_hash(identity), "fluxframe_version": __version__}
    if negative_embeds is not None:
        tensors["negative_prompt_embeds"] = negative_embeds.detach().to("cpu").contiguous()
        metadata["negative_prompt"] = negative_prompt or ""
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load(source: Path | InputFile, identity: dict, width: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of an embeddings file made by the encoder ``identity``, ``width`` wide. ``source``
    is the file's bytes as the runner read them once (a path is read here, the same way)."""
    import struct

    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    from fluxframe.errors import RequestError

    if not isinstance(source, InputFile):
        try:
            source = read_input(source, "prompt_embeds")
        except RequestError as exc:
            raise CheckpointError(str(exc).removeprefix("prompt_embeds: "), file=str(source)) from None
    path, data = source.name, source.data
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        metadata = header.get("__metadata__") or {}
        tensors = load_tensors(data)
    except (SafetensorError, struct.error, ValueError, AttributeError) as exc:
        raise CheckpointError(f"not a safetensors file: {exc}", file=path) from None
    if not isinstance(metadata, dict):
        raise CheckpointError("not a safetensors file: its metadata is not a table", file=path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"not a fluxframe prompt embeddings file (metadata format is {metadata.get('format')!r}, "
                              f"expected {FORMAT!r})", file=path, key="format")
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        t = tensors.get(key)
        if t is None and key == "prompt_embeds":
            raise CheckpointError("has no prompt_embeds tensor", file=path, key=key)
        if t is not None and (t.ndim != 3 or t.shape[-1] != width):
            raise CheckpointError(f"{key} has shape {tuple(t.shape)}; this model takes (1, L, {width}) embeddings",
                                  file=path, key=key)
    stored = metadata.get("encoder_sha256")
    if stored != identity_hash(identity):
        try:
            theirs = json.loads(metadata.get("encoder", "null"))
        except ValueError:
            theirs = None
        raise CheckpointError(
            f"made by another text encoder than this config's ({theirs or 'unknown'}; this model uses {identity})",
            file=path, key="encoder_sha256")
    return tensors, metadata
