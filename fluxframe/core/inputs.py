"""Request inputs, read once.

A file a request names (a reference image, an inpaint image or mask, a control image, a prompt embeddings file)
is read into memory exactly once, before any filter runs. The filters, the audit line's hashes and the model all
use that one copy, so replacing the file on disk while a request runs changes nothing: what was checked is what
was used. ``InputFile.sha256`` is the SHA-256 of the file's bytes as read.
"""

from __future__ import annotations

import contextvars
import io
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxframe.core.hashing import sha256_bytes
from fluxframe.errors import RequestError

#: The largest input file read into memory (an image or embeddings file; LoRA files are read by their own loader).
MAX_INPUT_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, eq=False)
class InputFile:
    """One input file's bytes, as read once; ``name`` is the path it was given as (for messages)."""

    name: str
    data: bytes = field(repr=False)

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.data)

    def image(self, where: str):
        """The bytes decoded as an image (fully loaded), or a RequestError naming ``where``."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(self.data)) as image:
                image.load()
                return image.copy()
        except Image.DecompressionBombError as exc:
            raise RequestError(f"{self.name}: refused, too many pixels ({exc})", field=where) from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise RequestError(f"{self.name}: not a readable image ({exc})", field=where) from None


_NO_PATHS: contextvars.ContextVar[str | None] = contextvars.ContextVar("fluxframe_no_paths", default=None)


@contextmanager
def no_paths(why: str) -> Iterator[None]:
    """Within this block (this thread or task), ``read_input`` refuses every path: what a service runs for remote
    clients takes their uploads only, so no input a client names, declared by its conditioner or not, can make the
    server read one of its own files. ``why`` says so in the RequestError."""
    token = _NO_PATHS.set(why)
    try:
        yield
    finally:
        _NO_PATHS.reset(token)


def read_input(path: str | Path, where: str, *, max_bytes: int = MAX_INPUT_BYTES) -> InputFile:
    """Read the file at ``path`` once, whole; a RequestError naming ``where`` if it is absent, not a regular
    file, unreadable or over ``max_bytes`` (or if paths are refused here: ``no_paths``)."""
    if (why := _NO_PATHS.get()) is not None:
        raise RequestError(f"a file path is not accepted here ({why}); send the file itself", field=where)
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO given as an input must not hang the run before fstat can refuse it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise RequestError(f"{path}: no such file", field=where) from None
    except OSError as exc:
        raise RequestError(f"{path}: cannot read ({exc.strerror or exc})", field=where) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise RequestError(f"{path}: is {kind}, not an input file", field=where)
    with os.fdopen(fd, "rb") as fh:
        try:
            data = fh.read(max_bytes + 1)
        except OSError as exc:
            raise RequestError(f"{path}: cannot read ({exc.strerror or exc})", field=where) from None
    if len(data) > max_bytes:
        raise RequestError(f"{path}: larger than {max_bytes} bytes", field=where)
    return InputFile(str(path), data)


def read_file_inputs(keys: tuple[str, ...], inputs: dict[str, Any], where: str) -> dict[str, Any]:
    """``inputs`` with every value under ``keys`` that is a path (or a list of paths) replaced by its InputFile.
    Images and InputFiles given in memory are kept as they are."""
    out = dict(inputs)
    for key in keys:
        value = out.get(key)
        if isinstance(value, (str, Path)):
            out[key] = read_input(value, f"{where}.{key}")
        elif isinstance(value, (list, tuple)):
            out[key] = [read_input(v, f"{where}.{key}[{i}]") if isinstance(v, (str, Path)) else v
                        for i, v in enumerate(value)]
    return out
