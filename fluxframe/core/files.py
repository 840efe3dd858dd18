"""The one atomic writer: a file or a folder is made under a hidden temporary name beside its destination, then
renamed onto it in one step, so a reader (or a crash) never sees it half-written, and a failure leaves nothing.

Released images go through fluxframe.core.output.release, which adds the guarantees an output needs on top
(a private, locked temporaries folder; no overwrite unless asked; the audit line once the file is in place).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from fluxframe.errors import OutputError

#: The process's umask, read once (reading it means setting it): files and folders fluxframe makes under a private
#: temporary name get the mode a plain create would have given them before they are renamed into place.
UMASK = os.umask(0o022)
os.umask(UMASK)


def fsync_folder(folder: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; where a folder cannot be opened or synced, the rename
    has still happened, so this is best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary(path: Path, kind: str) -> Path:
    # Hidden, and never ending in the destination's suffix: a leftover is never taken for weights or an output.
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def atomic_write(path: str | Path, write: Callable[[Path], object], *, mode: int | None = None) -> Path:
    """``write(temporary path)`` beside ``path``, flushed to disk, then renamed onto it; ``mode`` (e.g. 0o600) is
    set before the rename. OutputError naming ``path`` if it cannot be written."""
    path = Path(path)
    tmp = _temporary(path, "tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_folder(path: str | Path, build: Callable[[Path], object], *, replace: bool = False) -> Path:
    """``build(temporary folder)`` beside ``path``, then renamed onto it. An existing ``path`` is kept (another
    builder won the race) unless ``replace``, when it is swapped out and removed."""
    path = Path(path)
    old = _temporary(path, "old")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{path.name}.build-", dir=path.parent))  # unique per builder
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    try:
        build(work)
        os.chmod(work, 0o777 & ~UMASK)  # mkdtemp's 0700 would become the folder's
        if replace and path.exists():
            os.replace(path, old)
        try:
            os.replace(work, path)
        except OSError:
            if replace or not path.is_dir():
                raise
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path
