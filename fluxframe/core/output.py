"""Where outputs go, and how a finished image is released.

Three promises, each against a way an output could destroy evidence or escape:

* **An output is never a file the deployment reads or writes.** ``OutputGuard`` knows the config file, the audit
  log and its head, the C2PA certificate and key, the checkpoint (every file under a checkpoint folder), the LoRA
  files and every file a plugin's options name; an output path that is one of them (also through a symlink or a
  hard link), or lies inside a guarded folder, is refused before any model work.
* **Template outputs stay in the output folder.** ``[output] name`` may use only ``TEMPLATE_FIELDS``, as plain
  ``{field}`` (no attribute access, index, conversion or format spec); the name it gives is one file name, never a
  path, and a request id is a plain token. An existing file is never replaced unless the request says
  ``overwrite``.
* **Nothing half-done is left where outputs are collected.** An image is encoded and signed in a folder of its own
  under ``<output folder>/.fluxframe-tmp/`` (owner-only, locked by the writing process), then linked into place
  in one step; the release is audited only once the file is in place, and a file whose audit line cannot be
  written is taken back. Folders whose writer died (``kill -9``) are removed at the next start or write, and the
  removal is audited (``sweep_stale``).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import re
import shutil
import stat
import string
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fluxframe.core.files import UMASK, fsync_folder
from fluxframe.core.hashing import sha256_bytes, sha256_file
from fluxframe.errors import OutputError, RequestError

TMP_DIR = ".fluxframe-tmp"
#: What ``[output] name`` may use: the request id, the seed, and the UTC date (YYYYMMDD) and time (HHMMSS).
TEMPLATE_FIELDS = ("request_id", "seed", "date", "time")
#: The formats fluxframe writes, by file suffix.
SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
#: A temporaries folder younger than this is never swept: its writer may not hold its lock yet.
SWEEP_GRACE_S = 30.0


def template_problem(name: str) -> str | None:
    """Why ``name`` is not a valid ``[output] name`` template, or None."""
    try:
        parts = list(string.Formatter().parse(name))
    except ValueError as exc:
        return f"not a valid template: {exc}"
    for literal, field, spec, conversion in parts:
        if any(c in literal for c in "/\\\0"):
            return "must be a file name, not a path (no / or \\)"
        if field is None:
            continue
        if field not in TEMPLATE_FIELDS:
            return f"unknown field {{{field}}}: the fields are " + ", ".join(f"{{{f}}}" for f in TEMPLATE_FIELDS)
        if spec or conversion:
            return f"{{{field}}} takes no conversion or format spec"
    if name.startswith(".") or not name.strip():
        return "must not be empty or start with '.' (hidden files are not outputs)"
    return None


def check_request_id(request_id: Any) -> str:
    if not isinstance(request_id, str) or not REQUEST_ID.match(request_id):
        raise RequestError(f"must be 1-128 letters, digits, '-' or '_' (starting with a letter or digit), "
                           f"got {request_id!r}", field="request_id")
    return request_id


def template_name(template: str, *, request_id: str, seed: int, fmt: str, now: datetime.datetime | None = None) -> str:
    """The file name ``[output] name`` gives for one request (the template was checked when the config loaded)."""
    now = now or datetime.datetime.now(datetime.UTC)
    name = template.format(request_id=check_request_id(request_id), seed=seed, date=now.strftime("%Y%m%d"),
                           time=now.strftime("%H%M%S"))
    return f"{name}.{EXTENSIONS[fmt]}"


def format_of(path: Path, suffixes: dict[str, str] | None = None) -> str:
    """The format an output path's suffix names (among ``suffixes``, default the image formats); a RequestError
    for any other suffix."""
    suffixes = SUFFIXES if suffixes is None else suffixes
    fmt = suffixes.get(path.suffix.lower())
    if fmt is None:
        raise RequestError(f"{path}: fluxframe writes {', '.join(sorted(suffixes))} files here; the suffix "
                           f"{path.suffix or '(none)'!r} names none of them", field="output")
    return fmt


class OutputGuard:
    """The files and folders a deployment reads or writes: no output may be one of them or lie inside them."""

    def __init__(self, files: Iterable[Path] = (), folders: Iterable[Path] = ()):
        self.files = {_real(p) for p in files}
        self.folders = {_real(p) for p in folders}

    def add(self, path: Path) -> None:
        """Guard ``path``: a folder guards everything inside it."""
        (self.folders if Path(path).is_dir() else self.files).add(_real(path))

    def problem(self, path: Path) -> str | None:
        """Why ``path`` may not be written as an output, or None."""
        real = _real(path)
        for folder in self.folders:
            if real == folder or real.is_relative_to(folder):
                return f"lies inside {folder}, which this deployment reads (a checkpoint or plugin folder)"
        for file in self.files:
            if real == file or _same_file(real, file):
                return f"is {file}, a file this deployment reads or writes (config, audit log, key, checkpoint...)"
        return None


def _real(path: Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # a hard link to a guarded file is that file
    except OSError:
        return False


def check_folder(folder: Path, *, create: bool) -> None:
    """An output folder must be a writable folder (created when ``create``; else its nearest existing parent must
    be writable). OutputError naming the folder otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: the output folder is a file, not a folder")
    if not folder.exists():
        if not create:  # config check: prove the folder could be made, and leave nothing behind
            parent = next((p for p in folder.parents if p.exists()), None)
            try:
                if parent is None or not parent.is_dir():
                    raise NotADirectoryError(parent)
                os.rmdir(tempfile.mkdtemp(prefix=".fluxframe-probe-", dir=parent))
            except OSError:
                raise OutputError(f"{folder}: the output folder does not exist and cannot be created") from None
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None
    try:  # access() can lie (root, read-only mounts): try what a release does
        fd, probe = tempfile.mkstemp(prefix=".fluxframe-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{folder}: the output folder is not writable ({exc.strerror or exc})") from None


def temporaries(folder: Path) -> Path:
    """The owner-only folder where outputs for ``folder`` are made before release (created if missing)."""
    root = Path(folder) / TMP_DIR
    try:
        root.mkdir(mode=0o700, exist_ok=True)
    except FileExistsError:
        pass
    if root.is_symlink() or not root.is_dir():
        raise OutputError(f"{root}: expected fluxframe's temporaries folder, found something else")
    return root


def check_target(path: Path, *, overwrite: bool, guard: OutputGuard, suffixes: dict[str, str] | None = None) -> None:
    """Refuse, before any model work, an output path that cannot or may not be written."""
    if (why := guard.problem(path)) is not None:
        raise OutputError(f"{path}: refused as an output: it {why}")
    format_of(path, suffixes)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputError(f"{path}: exists; refusing to replace it (ask for overwrite: --overwrite)")
    if path.name.startswith("."):
        raise OutputError(f"{path}: hidden file names are not outputs")
    check_folder(path.parent, create=True)


def sweep_stale(folder: Path, *, grace: float | None = None) -> list[dict[str, Any]]:
    """Remove the temporaries of writers that died (their folder is not locked) under ``folder``'s temporaries
    folder; returns what was removed (name, bytes, sha256 of each file), for the audit log. Folders younger than
    ``grace`` seconds (default SWEEP_GRACE_S) are left alone."""
    grace = SWEEP_GRACE_S if grace is None else grace
    root = Path(folder) / TMP_DIR
    if not root.is_dir() or root.is_symlink():
        return []
    removed = []
    now = time.time()
    for entry in sorted(root.iterdir()):
        try:
            st = entry.lstat()
        except FileNotFoundError:
            continue
        if now - st.st_mtime < grace:
            continue
        if stat.S_ISDIR(st.st_mode):
            try:
                fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a live writer holds it
                os.close(fd)
                continue
            try:
                files = [_describe(f) for f in sorted(entry.iterdir()) if f.is_file()]
                shutil.rmtree(entry, ignore_errors=True)
            finally:
                os.close(fd)
            removed.append({"folder": str(entry), "files": files})
        else:
            files = [_describe(entry)] if stat.S_ISREG(st.st_mode) else []
            entry.unlink(missing_ok=True)
            removed.append({"folder": str(root), "files": files})
    _remove_if_empty(root)
    return removed


def _describe(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"name": path.name, "bytes": len(data), "sha256": sha256_bytes(data)}


@contextmanager
def workspace(folder: Path) -> Iterator[Path]:
    """A private folder under ``folder``'s temporaries, locked while the caller works in it, removed after (and
    the temporaries folder with it when no other writer uses it, so finished runs leave nothing behind)."""
    for _ in range(5):
        root = temporaries(folder)
        try:
            work = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
            break
        except FileNotFoundError:  # another writer removed the empty temporaries folder meanwhile
            continue
    else:
        raise OutputError(f"{folder / TMP_DIR}: cannot create a folder to write in")
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(fd)
        _remove_if_empty(root)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (another writer, or leftovers for the next sweep), or gone
        pass


def release(make: Callable[[Path], None], path: Path, *, overwrite: bool,
            record: Callable[[str], None]) -> str:
    """Make the output in a private temporaries folder (``make(tmp)`` writes and finishes it: encode, sign),
    link it into place at ``path`` in one step, then ``record(sha256)`` (the audit line). If recording fails,
    the released file is taken back. Returns the sha256 of the released bytes."""
    path = Path(path)
    with workspace(path.parent) as work:
        tmp = work / f"output{path.suffix.lower()}"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # owner-only until released
            make(tmp)
            digest = sha256_file(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~UMASK)
            if overwrite:
                os.replace(tmp, path)
            else:
                _link(tmp, path)
        except FileExistsError:
            raise OutputError(f"{path}: exists (it appeared while the image was made); not replaced") from None
        except OSError as exc:
            raise OutputError(f"{path}: cannot write the image: {exc.strerror or exc}") from exc
        fsync_folder(path.parent)
        try:
            record(digest)
        except BaseException:
            _take_back(path, work, tmp, overwrite)
            raise
    return digest


def _link(tmp: Path, path: Path) -> None:
    """Put ``tmp`` at ``path`` unless something is there: a hard link fails rather than replace a file that
    appeared meanwhile. Where the file system has no hard links, the check and the rename are two steps."""
    try:
        os.link(tmp, path)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        if path.exists() or path.is_symlink():
            raise FileExistsError(path) from None
        os.rename(tmp, path)


def _take_back(path: Path, work: Path, tmp: Path, overwrite: bool) -> None:
    try:
        if overwrite or os.path.samefile(path, tmp):
            path.unlink()
            fsync_folder(path.parent)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise OutputError(f"{path}: released without its audit line and could not be removed: {exc}") from exc
