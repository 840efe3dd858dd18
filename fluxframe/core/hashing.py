"""Every hash fluxframe records, in one place, each with its exact byte formula, so anyone holding the prompt, the
file or the config can recompute what an audit line or a C2PA manifest says. All are SHA-256, written as 64
lowercase hex digits.

=====================  =======================================================================================
``sha256_text``        the text's UTF-8 bytes. A command-line argument that was not valid UTF-8 reaches Python as
                       lone surrogates (PEP 383); it is hashed as the original bytes it was given as.
``sha256_bytes``       the bytes, as they are (input files, prompt-embeddings files, released output files).
``sha256_file``        the file's bytes, read whole (the same value as ``sha256_bytes`` of its contents).
``sha256_image``       the ASCII header ``"{mode} {width}x{height}\\n"`` (e.g. ``"RGB 1024x768\\n"``) followed by
                       the raw pixel bytes (PIL ``Image.tobytes()``: rows top to bottom, channels interleaved).
                       Independent of how the image was encoded: the pixels as the model saw them.
``sha256_json``        the value as canonical JSON: keys sorted, separators ``","`` and ``":"``, non-ASCII
                       characters written as themselves, UTF-8 (the config: ``config.model_dump(mode="json")``).
=====================  =======================================================================================
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_bytes(text: str) -> bytes:
    """A text's bytes as hashed: UTF-8, with an undecodable command-line argument's original bytes restored."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates not from a command line: keep them visible rather than fail
        return text.encode("utf-8", "surrogatepass")


def sha256_text(text: str) -> str:
    return sha256_bytes(text_bytes(text))


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def sha256_image(image: Any) -> str:
    """A PIL image's pixels with its mode and size (see the table above)."""
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode("ascii"))
    digest.update(image.tobytes())
    return digest.hexdigest()


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_json(value: Any) -> str:
    return sha256_bytes(canonical_json(value))
