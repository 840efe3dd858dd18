"""The audit log: one JSON line per request, hash-chained, appended and flushed to disk before the image
is released.

Each line is a JSON object (keys sorted, no spaces) with ``seq`` (1, 2, ...) and ``prev``: the SHA-256 of
the previous line's bytes (without its newline), or 64 zeros on the first line. Editing, inserting or
deleting a line breaks the chain at the next line, so ``verify_log`` reports where.

Deleting the *last* lines leaves a shorter chain that is still consistent, so every append also
rewrites a small head file beside the log (``LOG.head``: the last seq and the last line's hash, replaced
by a rename). A log shorter than its head, or whose line at the head's seq has another hash, fails
verification.

A log that cannot be appended safely is refused with ``AuditError`` (one line, naming the file), never
written to on trust. ``AuditLog.preflight()`` runs every check below at start-up, before weights load,
without writing a line; ``append`` runs them again under the log's lock, because the log can change
between start-up and a request:
* The log and its head are opened without following symlinks and must be regular files: a log that is
  a symlink to /dev/null, a directory, a FIFO or a device would swallow lines or hang. The log's folder
  must exist or be creatable, and be writable, since the head is replaced by a rename there; ``append``
  creates the head's temporary file *before* it writes the line, so a folder turned read-only stops the
  line as well, not only the head after it.
* The tail must verify: the log ends with a newline (a half-written last line is refused, not appended
  after), its last line is in the canonical form and follows the line before it, and the head agrees
  with it: same seq and hash, or one line behind (a crash between the line and the head). With a key,
  the last line and the head must carry valid MACs; a log written with a key is not appended to
  without one, nor a log written without a key with one. Only the last two lines are read, backwards
  from the end, so an append costs the same on a long log; ``verify_log`` checks the rest.
* A missing head beside a non-empty log (or a head beside an empty or missing log) is a refusal, not a
  fresh start: re-creating the head would hide the deletion of the log's last lines together with it. So a new
  log gets a genesis head (seq 0, the genesis hash, with a key its MAC) *before* its first line: a crash between
  that line and its own head leaves the head one line behind, as for any later line, and a crash before the line
  an empty log with a genesis head, which starts afresh (no weaker than deleting both files, which also does).

Re-anchoring is the one way past such a refusal that leaves a record (``AuditLog.reanchor(reason)``,
``fluxframe audit reanchor LOG --reason TEXT``). Under the lock, the whole chain must verify (with the
key, if the log has one); then a line ``{"event": "re-anchor", "reason", "previous_head", "lines",
"last_hash"}`` is appended, ``previous_head`` being what the head file said (null when it was missing),
and a new head is written. A log whose chain is broken is not re-anchored: whatever broke it must be
looked at first, and the log kept as evidence beside a new one. The one exception, only when asked
(``discard_incomplete_tail``), is a last line without its newline, a write cut short: those bytes never
became a record, so they are cut off and their length, hash and text are kept in the re-anchor line.
``verify_log`` accepts re-anchor lines like any other and lists them, with what each previous head
said, so a reviewer sees every one.

What a hash chain cannot show, and what closes the gap:
* Someone who can write the log can also rewrite it whole, recomputing every hash and the head.
  Give the log a secret key (``[safety] audit_key_env`` names the environment variable holding it;
  ``audit_log_for(config)`` builds the log with it; FLUXFRAME_AUDIT_KEY by default for ``audit verify``):
  every line and the head then carry an HMAC-SHA256 that cannot be recomputed without the key. Or copy
  the head hash somewhere the writer cannot change (a ticket, a signed e-mail, a WORM bucket) now and then.
* Deleting the last lines *and* rolling the head back to match is only caught with a key, or by
  comparison with a head hash kept elsewhere. So is a re-anchor line written by someone who can write
  the log: it is recorded and listed, not prevented.
* The log records hashes of prompts and files, never their content: it proves what was checked, and
  which bytes were released, to someone who holds the prompt or the file.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import glob
import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fluxframe.core.files import fsync_folder
from fluxframe.core.hashing import sha256_bytes
from fluxframe.errors import AuditError, ConfigError

if TYPE_CHECKING:
    from fluxframe.core.config import Config

GENESIS = "0" * 64
RESERVED = ("seq", "prev", "mac")
REANCHOR = "re-anchor"
DEFAULT_KEY_ENV = "FLUXFRAME_AUDIT_KEY"  # what `fluxframe audit verify` reads when told nothing else
MAX_LINE = 16 << 20  # a tail line longer than this is not one fluxframe wrote; reading stops there
_MAX_HEAD = 1 << 16
_NOFOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: opening a FIFO must not hang


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=_default).encode("utf-8")


def _default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to the audit log")


def _mac(key: bytes, record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "mac"}
    return hmac.new(key, _encode(body), hashlib.sha256).hexdigest()


def _mac_ok(key: bytes, record: dict[str, Any]) -> bool:
    mac = record.get("mac")
    return isinstance(mac, str) and hmac.compare_digest(mac, _mac(key, record))


def head_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".head")


def _key_bytes(key: str | bytes | None) -> bytes | None:
    if key is None or key == "" or key == b"":
        return None
    return key.encode("utf-8") if isinstance(key, str) else bytes(key)


def _parse_line(raw: bytes) -> dict[str, Any] | None:
    """A line as fluxframe writes it (canonical JSON object, int seq), or None."""
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or _encode(record) != raw:
        return None
    seq = record.get("seq")
    return record if isinstance(seq, int) and not isinstance(seq, bool) else None


def _why(exc: OSError) -> str:
    if exc.errno in (errno.ELOOP, errno.EMLINK):  # what O_NOFOLLOW gives for a symlink (EMLINK on BSDs)
        return "it is a symbolic link (the audit log and its head are never followed through links)"
    if exc.errno == errno.EISDIR:
        return "it is a directory"
    return exc.strerror or str(exc)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _open_log(path: Path, *, create: bool) -> int | None:
    """The log opened for appending (None if absent and not ``create``); refuses links and non-regular files."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | _NOFOLLOW | (os.O_CREAT if create else 0), 0o640)
    except FileNotFoundError:
        if not create:
            return None
        raise AuditError("cannot create the audit log: its folder is missing", path=str(path)) from None
    except OSError as exc:
        raise AuditError(f"cannot open the audit log for appending: {_why(exc)}", path=str(path)) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise AuditError(f"the audit log is {_kind(mode)}, not a regular file", path=str(path))
    os.set_blocking(fd, True)
    return fd


def _read_head(path: Path) -> bytes | None:
    """The head file's bytes, None if there is none; refuses a link, a directory or any other non-regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"cannot read the audit log's head file: {_why(exc)}", path=str(path)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise AuditError(f"the audit log's head file is {_kind(mode)}, not a regular file", path=str(path))
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(_MAX_HEAD)
    except OSError as exc:
        raise AuditError(f"cannot read the audit log's head file: {_why(exc)}", path=str(path)) from None
    finally:
        os.close(fd)


def _parse_head(raw: bytes) -> dict[str, Any] | None:
    try:
        head = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(head, dict) or not isinstance(head.get("hash"), str):
        return None
    return head if isinstance(head.get("seq"), int) and not isinstance(head.get("seq"), bool) else None


def _tail(f, size: int) -> tuple[bytes | None, bytes]:
    """The line before the last (None if there is one line) and the last line of a file of ``size`` bytes that
    ends with a newline, read backwards from the end."""
    pos, buf, newlines = size - 1, b"", 0  # size - 1: the final newline is not part of the last line
    while pos > 0 and newlines < 2:
        step = min(65536, pos)
        pos -= step
        f.seek(pos)
        chunk = f.read(step)
        newlines += chunk.count(b"\n")
        buf = chunk + buf
        if len(buf) > 2 * MAX_LINE:
            raise ValueError(f"the last lines are over {MAX_LINE >> 20} MiB")
    parts = buf.split(b"\n")
    return (parts[-2] if len(parts) > 1 else None), parts[-1]


@dataclass
class AuditCheck:
    ok: bool
    lines: int
    broken_at: int | None = None  # 1-based line number where the chain first fails
    reason: str = ""
    reanchors: list[int] = field(default_factory=list)  # line numbers of re-anchor lines


class AuditLog:
    """Append-only, hash-chained JSON-lines log; safe for several processes appending at once (flock)."""

    def __init__(self, path: str | Path, *, key: str | bytes | None = None):
        self.path = Path(path)
        self.key = _key_bytes(key)

    @property
    def head_path(self) -> Path:
        return head_path(self.path)

    # -- the checks ------------------------------------------------------------------------------

    def preflight(self) -> None:
        """Check that a line could be appended now, without writing one: the folder exists (it is created if
        missing) and is writable, the log and the head are regular files (or absent, together), and the tail
        verifies against the head and the key. Raises AuditError saying what is wrong."""
        self._make_folder()
        fd = self._open(create=False)
        try:
            self._probe_folder()
            if fd is None:
                return
            with os.fdopen(os.dup(fd), "rb") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH)  # appenders hold LOCK_EX while line and head disagree
                try:
                    self._check_tail(f)
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        finally:
            if fd is not None:
                os.close(fd)

    def _open(self, *, create: bool) -> int | None:
        """The log opened for appending, created if absent and ``create``; a missing log beside a head is refused
        rather than created, since a new log would hide the old one's deletion."""
        fd = _open_log(self.path, create=False)
        if fd is None and _read_head(self.head_path) is not None:
            raise self._refusal(f"the log is missing but its head file {self.head_path.name} is there: it was "
                                "deleted, or moved without its head", "restore the log, or move the head aside "
                                "too to start a new log (rotate the two together)")
        return _open_log(self.path, create=True) if fd is None and create else fd

    def _make_folder(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AuditError(f"cannot create the audit log's folder {self.path.parent}: {_why(exc)}",
                             path=str(self.path)) from None

    def _head_tmp(self) -> tuple[int, Path]:
        """A new temporary file beside the head, for the next head (replaced into place by a rename)."""
        tmp = self.head_path.with_name(f"{self.head_path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640), tmp
        except OSError as exc:
            raise AuditError(f"the audit log's folder {self.path.parent} is not writable, so its head file cannot "
                             f"be replaced: {_why(exc)}", path=str(self.path)) from None

    def _probe_folder(self) -> None:
        fd, tmp = self._head_tmp()
        os.close(fd)
        tmp.unlink(missing_ok=True)

    def _refusal(self, what: str, hint: str | None = None) -> AuditError:
        if hint is None:
            hint = ("see `fluxframe audit verify LOG`; once understood, `fluxframe audit reanchor LOG --reason TEXT` "
                    "records it and a new head (a broken chain: keep the log as evidence and start a new one)")
        return AuditError(f"{what}; refusing to append ({hint})", path=str(self.path))

    def _check_tail(self, f) -> tuple[dict[str, Any] | None, bytes | None]:
        """Check the log's end against its head and key (see the module docstring); returns the last record and
        its bytes (None, None for an empty log). Called with the log locked."""
        size = f.seek(0, os.SEEK_END)
        head_raw = _read_head(self.head_path)
        if size == 0:
            if head_raw is not None and not self._is_genesis(head_raw):  # a genesis head: died before line 1
                raise self._refusal(f"the log is empty but its head file {self.head_path.name} is there: the log "
                                    "was truncated or replaced")
            return None, None
        f.seek(size - 1)
        if f.read(1) != b"\n":
            raise self._refusal("the last line is incomplete (no newline): a write was cut short or the file was "
                                "edited", "see `fluxframe audit verify LOG`; `fluxframe audit reanchor LOG "
                                "--discard-incomplete-tail --reason TEXT` cuts it off, recorded")
        try:
            before, last = _tail(f, size)
        except ValueError as exc:
            raise self._refusal(f"{exc}: not lines fluxframe wrote") from None
        record = _parse_line(last)
        if record is None:
            raise self._refusal("the last line is not in the log's canonical form (JSON, keys sorted, an int seq): "
                                "it was edited or damaged")
        seq = record["seq"]
        earlier = _parse_line(before) if before is not None else None
        if before is None and (seq != 1 or record.get("prev") != GENESIS):
            raise self._refusal(f"the only line has seq {seq} and does not start the chain: the log was cut or "
                                "edited")
        if before is not None and (earlier is None or record.get("prev") != sha256_bytes(before)
                                   or seq != earlier["seq"] + 1):
            raise self._refusal("the last line does not follow the line before it: the log was edited")
        if self.key is None and "mac" in record:
            raise self._refusal("the log's lines carry an HMAC but no key is configured: appending would leave "
                                "lines nobody can check", "set [safety] audit_key_env to the variable holding "
                                "the log's key")
        if self.key is not None and "mac" not in record:
            raise self._refusal("a key is configured but the last line has no HMAC: the log was written without "
                                "the key", "move this log aside and start a new one, or remove audit_key_env")
        if self.key is not None and not _mac_ok(self.key, record):
            raise self._refusal("the last line's HMAC does not match the configured key: a wrong key, or the line "
                                "was forged")
        if head_raw is None:
            raise self._refusal(f"the head file {self.head_path.name} is missing beside a non-empty log: lines may "
                                "have been deleted from the end together with it")
        head = _parse_head(head_raw)
        if head is None:
            raise self._refusal(f"the head file {self.head_path.name} is not a head (JSON with an int seq and a "
                                "hash)")
        if self.key is not None and not _mac_ok(self.key, head):
            raise self._refusal(f"the head file {self.head_path.name} has no HMAC or one that does not match the "
                                "configured key")
        at = (head["seq"], head["hash"])
        behind = (seq - 1, sha256_bytes(before) if before is not None else GENESIS)
        if at == (seq, sha256_bytes(last)) or at == behind:
            return record, last  # in step, or one line behind after a crash between the line and the head
        if head["seq"] > seq:
            raise self._refusal(f"the head records seq {head['seq']} but the log ends at seq {seq}: lines were "
                                "deleted from the end")
        raise self._refusal(f"the head (seq {head['seq']}) does not match the log's last line (seq {seq}): the log "
                            "or its head was edited")

    # -- writing ---------------------------------------------------------------------------------

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write one record (adding ``time`` if absent, ``seq``, ``prev`` and with a key ``mac``), flushed and
        fsynced before returning; returns the record as written. Raises AuditError, writing nothing, where
        ``preflight`` would."""
        if not isinstance(record, dict):
            raise TypeError("an audit record is a dict")
        clash = [k for k in RESERVED if k in record]
        if clash:
            raise ValueError(f"audit record may not set {clash[0]!r}: the log sets it")
        if record.get("event") == REANCHOR:
            raise ValueError("re-anchor lines are written by AuditLog.reanchor only")
        self._make_folder()
        fd = self._open(create=True)
        assert fd is not None
        with os.fdopen(fd, "r+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                last_record, last = self._check_tail(f)
                return self._write(f, record, last_record, last)
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def reanchor(self, reason: str, *, discard_incomplete_tail: bool = False) -> dict[str, Any]:
        """Record a new head for a log whose chain verifies but whose tail was refused (head missing, behind,
        ahead or edited): appends a re-anchor line saying what the head said, then writes a new head. With
        ``discard_incomplete_tail``, a last line without its newline is cut off first and recorded."""
        if not isinstance(reason, str) or not reason.strip():
            raise AuditError("a re-anchor needs a reason (who, why, what was checked)", path=str(self.path))
        fd = _open_log(self.path, create=False)
        if fd is None:
            raise AuditError("there is no audit log here to re-anchor", path=str(self.path))
        with os.fdopen(fd, "r+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                f.seek(0)
                data = f.read()
                cut = data.rfind(b"\n") + 1
                fragment = data[cut:]
                if fragment and not discard_incomplete_tail:
                    raise AuditError("the last line is incomplete (no newline): pass --discard-incomplete-tail "
                                     "(discard_incomplete_tail=True) to cut it off; its bytes are recorded",
                                     path=str(self.path))
                lines = data[:cut].split(b"\n")[:-1]
                check = _verify_chain(lines, self.key)
                if not check.ok:
                    raise AuditError(f"the chain does not verify ({check.reason}); a log whose chain is broken is "
                                     "not re-anchored: keep it as evidence and start a new log", path=str(self.path))
                last_record = json.loads(lines[-1]) if lines else None
                if self.key is None and last_record is not None and "mac" in last_record:
                    raise AuditError("the log's lines carry an HMAC: re-anchor it with its key (--key-env VAR)",
                                     path=str(self.path))
                head_raw = _read_head(self.head_path)
                if head_raw is None and not lines and not fragment:
                    raise AuditError("the log is empty and has no head: nothing to re-anchor (a new log needs none)",
                                     path=str(self.path))
                previous: Any = None
                if head_raw is not None:
                    try:
                        previous = json.loads(head_raw)
                    except (ValueError, UnicodeDecodeError):
                        previous = {"unreadable": head_raw.decode("utf-8", "replace")}
                line: dict[str, Any] = {"event": REANCHOR, "reason": reason, "previous_head": previous,
                                        "lines": len(lines), "last_hash": sha256_bytes(lines[-1]) if lines else None}
                if fragment:
                    line["discarded_tail"] = {"bytes": len(fragment), "sha256": sha256_bytes(fragment),
                                              "text": fragment[:4096].decode("utf-8", "replace")}
                return self._write(f, line, last_record, lines[-1] if lines else None,
                                   truncate_to=cut if fragment else None)
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _is_genesis(self, raw: bytes) -> bool:
        """``raw`` is the head a new log gets before its first line (seq 0, the genesis hash; with a key, its MAC)."""
        head = _parse_head(raw)
        return head is not None and (head["seq"], head["hash"]) == (0, GENESIS) and (
            self.key is None or _mac_ok(self.key, head))

    def _put_genesis_head(self) -> None:
        """Before a new log's first line, a head at seq 0: a crash between that line and its own head then leaves
        a head one line behind, as for any later line, instead of a log without a head (which is refused)."""
        head: dict[str, Any] = {"seq": 0, "hash": GENESIS}
        if self.key is not None:
            head["mac"] = _mac(self.key, head)
        fd, tmp = self._head_tmp()
        try:
            self._install_head(fd, tmp, head)
            fsync_folder(self.head_path.parent)
        except OSError as exc:
            raise AuditError(f"cannot write the new log's head file: {_why(exc)}", path=str(self.head_path)) from None
        finally:
            tmp.unlink(missing_ok=True)

    def _install_head(self, fd: int, tmp: Path, head: dict[str, Any]) -> None:
        """Write ``head`` to the temporary file ``tmp`` (open as ``fd``; this closes it), fsync it and rename it
        over the head file."""
        with os.fdopen(fd, "wb") as t:
            t.write(_encode(head) + b"\n")
            t.flush()
            os.fsync(t.fileno())
        os.replace(tmp, self.head_path)

    def _write(self, f, record: dict[str, Any], last_record: dict[str, Any] | None, last: bytes | None, *,
               truncate_to: int | None = None) -> dict[str, Any]:
        """Append ``record`` after ``last`` and replace the head; called with the log locked and its tail checked."""
        written = dict(record)
        written.setdefault("time", _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds"))
        written["seq"] = 1 if last_record is None else last_record["seq"] + 1
        written["prev"] = GENESIS if last is None else sha256_bytes(last)
        if self.key is not None:
            written["mac"] = _mac(self.key, written)
        line = _encode(written)  # before anything is touched: an unencodable record writes nothing
        head: dict[str, Any] = {"seq": written["seq"], "hash": sha256_bytes(line)}
        if self.key is not None:
            head["mac"] = _mac(self.key, head)
        if last is None and truncate_to is None:
            self._put_genesis_head()
        tmp_fd, tmp = self._head_tmp()  # first: a folder where the head cannot be replaced gets no line either
        try:
            fd = f.fileno()
            if truncate_to is not None:
                try:
                    os.ftruncate(fd, truncate_to)
                except OSError as exc:
                    raise AuditError(f"cannot cut off the incomplete last line: {_why(exc)}",
                                     path=str(self.path)) from None
            size = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(line + b"\n")  # os.write, not the buffered file: nothing is left to flush later
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as exc:
                try:  # take back what part of the line got written (a full disk), so the tail stays whole
                    os.ftruncate(fd, size)
                except OSError:
                    pass
                raise AuditError(f"cannot append to the audit log: {_why(exc)}", path=str(self.path)) from None
            try:
                owned, tmp_fd = tmp_fd, -1
                self._install_head(owned, tmp, head)
            except OSError as exc:
                raise AuditError(f"the line (seq {written['seq']}) was written but the head file could not be "
                                 f"replaced: {_why(exc)}", path=str(self.head_path)) from None
        finally:
            if tmp_fd != -1:
                os.close(tmp_fd)
            tmp.unlink(missing_ok=True)
        fsync_folder(self.head_path.parent)
        return written


# -- the deployment's log ----------------------------------------------------------------------------


def audit_log_for(config: Config, environ: Mapping[str, str] | None = None, *,
                  replica: str | None = None) -> AuditLog | None:
    """The deployment's audit log (None without ``[safety] audit_log``), keyed from the environment variable
    ``[safety] audit_key_env`` names. Raises ConfigError (key safety.audit_key_env) when that variable is unset
    or empty: a deployment meant to sign its log must not quietly write an unsigned one. With ``replica``, that
    replica's own log beside it (``replica_log_path``), same key: one process, one hash chain."""
    environ = os.environ if environ is None else environ
    safety = config.safety
    name = safety.audit_key_env if safety is not None else None
    if safety is None or safety.audit_log is None:
        if name is not None:  # the config validator refuses this too; a Config built otherwise lands here
            raise ConfigError("audit_key_env is set but there is no audit_log to key", path=config.source,
                              key="safety.audit_key_env")
        return None
    key = None
    if name is not None:
        key = environ.get(name)
        if not key:
            raise ConfigError(f"the environment variable {name} is {'empty' if key == '' else 'not set'}: it must "
                              "hold the audit log's HMAC key", path=config.source, key="safety.audit_key_env")
    path = config.resolve(safety.audit_log)
    return AuditLog(path if replica is None else replica_log_path(path, replica), key=key)


def replica_log_path(path: str | Path, replica: str) -> Path:
    """The audit log a replica of a scaled-out deployment writes (``fluxframe serve --ray``): beside the
    configured log, named ``<stem>-<replica><suffix>`` (audit.jsonl → audit-ab12cd.jsonl), its own hash chain."""
    path = Path(path)
    if not replica or not all(c.isalnum() or c in "_.-" for c in replica) or replica.startswith("."):
        raise ValueError(f"a replica name is letters, digits, '_', '-' and '.', got {replica!r}")
    return path.with_name(f"{path.stem}-{replica}{path.suffix}")


def replica_logs(path: str | Path) -> list[Path]:
    """The configured log and every replica's log beside it (``replica_log_path``) that exists: what a lookup of
    what the deployment released must read (fluxframe.core.batch.audited)."""
    path = Path(path)
    found = [p for p in sorted(path.parent.glob(f"{glob.escape(path.stem)}-*{glob.escape(path.suffix)}"))
             if p.is_file() and not p.name.endswith(".head")]
    return ([path] if path.is_file() else []) + found


def audit_key_warnings(config: Config, environ: Mapping[str, str] | None = None) -> list[str]:
    """Key settings that look like a mistake without being an error: FLUXFRAME_AUDIT_KEY set (the variable
    `fluxframe audit verify` reads by default) while the config writes the log without a key, or with a key
    from another variable holding a different value."""
    environ = os.environ if environ is None else environ
    safety = config.safety
    default = environ.get(DEFAULT_KEY_ENV)
    if safety is None or safety.audit_log is None or not default:
        return []
    if safety.audit_key_env is None:
        return [f"{DEFAULT_KEY_ENV} is set but [safety] has no audit_key_env: the audit log is written without an "
                f"HMAC (set audit_key_env = \"{DEFAULT_KEY_ENV}\" to sign it)"]
    key = environ.get(safety.audit_key_env)
    if safety.audit_key_env != DEFAULT_KEY_ENV and key and key != default:
        return [f"{DEFAULT_KEY_ENV} and {safety.audit_key_env} hold different keys: the log is written with "
                f"{safety.audit_key_env}, and `fluxframe audit verify` without --config or --key-env would check "
                f"it with {DEFAULT_KEY_ENV} and fail"]
    return []


# -- verifying ---------------------------------------------------------------------------------------


def _describe_reanchor(number: int, record: dict[str, Any]) -> str:
    head, lines = record.get("previous_head"), record.get("lines")
    if head is None:
        said = "the head was missing"
    elif isinstance(head, dict) and isinstance(head.get("seq"), int) and isinstance(lines, int):
        seq = head["seq"]
        if seq > lines:
            said = f"the head recorded seq {seq}: lines {lines + 1}..{seq} were lost"
        elif seq < lines:
            said = f"the head recorded seq {seq}, {lines - seq} line(s) before the end"
        elif head.get("hash") != record.get("last_hash"):
            said = f"the head recorded seq {seq} with another hash: line {seq} or the head was edited"
        else:
            said = "the head agreed with the log"
    else:
        said = "the head was unreadable"
    if "discarded_tail" in record:
        said += ", an incomplete last line was cut off"
    return f"line {number}: {said}"


def _verify_chain(lines: list[bytes], key_b: bytes | None) -> AuditCheck:
    prev = GENESIS
    reanchors: list[int] = []
    for number, raw in enumerate(lines, 1):
        def broken(at: int, why: str) -> AuditCheck:
            return AuditCheck(False, len(lines), at, f"line {at}: {why}")

        try:
            record = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return broken(number, "not valid JSON: the line was edited or damaged")
        if not isinstance(record, dict) or _encode(record) != raw:
            return broken(number, "not in the log's canonical form: the line was edited")
        seq = record.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            return broken(number, f"seq is {seq!r}: the line was edited")
        if record.get("prev") != prev:
            if seq > number:
                return broken(number, f"seq is {seq}: line(s) {number}..{seq - 1} of the original log were "
                              "deleted before this line")
            if seq == number and number > 1:
                return broken(number - 1, f"its hash does not match prev recorded in line {number}: line "
                              f"{number - 1} was edited (or line {number}'s prev was)")
            if seq == number:
                return broken(number, "prev is not the genesis value: the line was edited")
            if seq == number - 1 and number > 1:
                return broken(number - 1, f"line {number} continues from seq {seq}: line {number - 1} was "
                              "inserted")
            return broken(number, f"seq {seq} and prev do not follow line {number - 1}: the line was inserted "
                          "or moved")
        if seq != number:
            return broken(number, f"seq is {seq}, expected {number}: the line was edited or inserted")
        if key_b is not None and not _mac_ok(key_b, record):
            return broken(number, "HMAC does not match: the line was forged or rewritten without the key")
        if record.get("event") == REANCHOR:
            reanchors.append(number)
        prev = sha256_bytes(raw)
    notes = [_describe_reanchor(n, json.loads(lines[n - 1])) for n in reanchors]
    reason = f"; {len(notes)} re-anchor{'s' if len(notes) > 1 else ''} ({'; '.join(notes)})" if notes else ""
    return AuditCheck(True, len(lines), None, reason, reanchors)


def verify_logs(folder: str | Path, *, pattern: str = "*.jsonl", key: str | bytes | None = None,
                head: bool = True) -> list[tuple[Path, AuditCheck]]:
    """``verify_log`` for each log in ``folder`` whose name matches ``pattern`` (not recursive; head files and
    their temporaries are not logs): one (path, check) per log, sorted by name; empty when there is none. The
    folder of a scaled-out deployment holds one log per replica, each its own chain (``replica_log_path``)."""
    folder = Path(folder)
    logs = sorted(p for p in folder.glob(pattern) if p.is_file() and ".head" not in p.name)
    return [(p, verify_log(p, key=key, head=head)) for p in logs]


def verify_log(path: str | Path, *, key: str | bytes | None = None, head: bool = True) -> AuditCheck:
    """Check the chain line by line, then the head file (unless ``head=False``). With ``key``, every line's
    and the head's HMAC must be valid too. Re-anchor lines are listed in the reason and in ``reanchors``."""
    path = Path(path)
    key_b = _key_bytes(key)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return AuditCheck(False, 0, None, f"cannot read {path}: {exc}")
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines and lines[-1] != b"":
        if data:
            return AuditCheck(False, len(lines), len(lines), "the last line is incomplete (no newline): a write "
                              "was cut short or the file was edited")
    chain = _verify_chain(lines, key_b)
    if not chain.ok:
        return chain
    anchors = chain.reanchors

    def ok(text: str) -> AuditCheck:
        return AuditCheck(True, len(lines), None, text + chain.reason, anchors)

    if not head:
        return ok(f"{len(lines)} lines, chain intact (head file not checked)")
    hp = head_path(path)
    try:
        head_record = json.loads(hp.read_bytes())
        head_seq, head_hash = int(head_record["seq"]), str(head_record["hash"])
    except FileNotFoundError:
        if not lines:
            return AuditCheck(True, 0, None, "empty log")
        return AuditCheck(False, len(lines), len(lines), f"head file {hp.name} is missing: cannot tell whether "
                          "lines were deleted from the end (use --no-head to check the chain alone)", anchors)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return AuditCheck(False, len(lines), len(lines), f"head file {hp.name} is unreadable: {exc}", anchors)
    if key_b is not None and not _mac_ok(key_b, head_record):
        return AuditCheck(False, len(lines), len(lines), f"head file {hp.name}: HMAC does not match", anchors)
    if (head_seq, head_hash) == (0, GENESIS) and len(lines) <= 1:  # a new log's head, written before line 1
        if not lines:
            return AuditCheck(True, 0, None, "empty log (its head is a new log's, from before its first line)")
        return ok("1 line, chain intact (1 line(s) after the head's seq 0: the first write did not update the head, "
                  "e.g. after a crash)")
    if head_seq > len(lines):
        return AuditCheck(False, len(lines), len(lines) + 1,
                          f"the log ends at line {len(lines)} but its head records {head_seq} lines: "
                          f"line {len(lines) + 1} onwards was deleted", anchors)
    if head_seq < 1 or sha256_bytes(lines[head_seq - 1]) != head_hash:
        return AuditCheck(False, len(lines), max(head_seq, 1), f"line {head_seq}: its hash differs from the one in "
                          "the head file: the line was edited", anchors)
    if head_seq < len(lines):
        # A crash between writing a line and updating the head leaves one unrecorded line; more is suspicious.
        note = f"{len(lines) - head_seq} line(s) after the head's seq {head_seq}"
        if len(lines) - head_seq > 1:
            return AuditCheck(False, len(lines), head_seq + 1, f"{note}: lines were appended outside fluxframe",
                              anchors)
        return ok(f"{len(lines)} lines, chain intact ({note}: the last write did not update the head, e.g. after "
                  "a crash)")
    return ok(f"{len(lines)} lines, chain intact")
