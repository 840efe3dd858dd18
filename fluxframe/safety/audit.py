"""The audit log: one JSON line per request, hash-chained, appended and flushed to disk before the image
is released.

Each line is a JSON object (keys sorted, no spaces) with ``seq`` (1, 2, ...) and ``prev``: the SHA-256 of
the previous line's bytes (without its newline), or 64 zeros on the first line. Editing, inserting or
deleting a line breaks the chain at the next line, so ``verify_log`` reports where.

Deleting the *last* lines leaves a shorter chain that is still consistent, so every append also
rewrites a small head file beside the log (``LOG.head``: the last seq and the last line's hash). A log
shorter than its head, or whose line at the head's seq has another hash, fails verification.

What a hash chain cannot show, and what closes the gap:
* Someone who can write the log can also rewrite it whole, recomputing every hash and the head.
  Give the log a secret key (``AuditLog(path, key=...)``, or FLUXFRAME_AUDIT_KEY for the CLI): every
  line and the head then carry an HMAC-SHA256 that cannot be recomputed without the key. Or copy the
  head hash somewhere the writer cannot change (a ticket, a signed e-mail, a WORM bucket) now and then.
* Deleting the last lines *and* rolling the head back to match is only caught with a key, or by
  comparison with a head hash kept elsewhere.
* The log records hashes of prompts and files, never their content: it proves what was checked, and
  which bytes were released, to someone who holds the prompt or the file.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
RESERVED = ("seq", "prev", "mac")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_image(image: Any) -> str:
    """Hash of a PIL image's pixels (mode and size included), for inputs that never were a file."""
    h = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    h.update(image.tobytes())
    return h.hexdigest()


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


def head_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".head")


def _key_bytes(key: str | bytes | None) -> bytes | None:
    if key is None or key == "" or key == b"":
        return None
    return key.encode("utf-8") if isinstance(key, str) else bytes(key)


def _last_line(f) -> bytes | None:
    """The last line of an open binary file (without its newline), read backwards from the end."""
    f.seek(0, os.SEEK_END)
    end = f.tell()
    if end == 0:
        return None
    f.seek(end - 1)
    if f.read(1) == b"\n":
        end -= 1
    pos, buf = end, b""
    while pos > 0:
        step = min(65536, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
        i = buf.rfind(b"\n")
        if i != -1:
            return buf[i + 1:]
    return buf


class AuditLog:
    """Append-only, hash-chained JSON-lines log; safe for several processes appending at once (flock)."""

    def __init__(self, path: str | Path, *, key: str | bytes | None = None):
        self.path = Path(path)
        self.key = _key_bytes(key)

    @property
    def head_path(self) -> Path:
        return head_path(self.path)

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write one record (adding ``time`` if absent, ``seq``, ``prev`` and with a key ``mac``), flushed and
        fsynced before returning; returns the record as written."""
        if not isinstance(record, dict):
            raise TypeError("an audit record is a dict")
        clash = [k for k in RESERVED if k in record]
        if clash:
            raise ValueError(f"audit record may not set {clash[0]!r}: the log sets it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        with os.fdopen(fd, "r+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                last = _last_line(f)
                f.seek(0, os.SEEK_END)
                size = f.tell()
                if last is None:
                    seq, prev = 1, GENESIS
                else:
                    try:
                        seq = int(json.loads(last)["seq"]) + 1
                    except (ValueError, KeyError, TypeError):
                        seq = _count_lines(f) + 1  # the last line is damaged; verify_log will say so
                    prev = sha256_bytes(last)
                written = dict(record)
                written.setdefault("time", _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds"))
                written["seq"] = seq
                written["prev"] = prev
                if self.key is not None:
                    written["mac"] = _mac(self.key, written)
                line = _encode(written)
                if size > 0:
                    f.seek(size - 1)
                    needs_newline = f.read(1) != b"\n"
                else:
                    needs_newline = False
                f.seek(0, os.SEEK_END)
                f.write((b"\n" if needs_newline else b"") + line + b"\n")
                f.flush()
                os.fsync(f.fileno())
                self._write_head(seq, sha256_bytes(line))
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return written

    def _write_head(self, seq: int, digest: str) -> None:
        head: dict[str, Any] = {"seq": seq, "hash": digest}
        if self.key is not None:
            head["mac"] = _mac(self.key, head)
        tmp = self.head_path.with_name(self.head_path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(_encode(head) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.head_path)
        try:
            dfd = os.open(self.head_path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _count_lines(f) -> int:
    f.seek(0)
    return sum(1 for _ in f)


@dataclass
class AuditCheck:
    ok: bool
    lines: int
    broken_at: int | None = None  # 1-based line number where the chain first fails
    reason: str = ""


def verify_log(path: str | Path, *, key: str | bytes | None = None, head: bool = True) -> AuditCheck:
    """Check the chain line by line, then the head file (unless ``head=False``). With ``key``, every line's
    and the head's HMAC must be valid too."""
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
    prev = GENESIS
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
        if key_b is not None:
            mac = record.get("mac")
            if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key_b, record)):
                return broken(number, "HMAC does not match: the line was forged or rewritten without the key")
        prev = sha256_bytes(raw)

    if not head:
        return AuditCheck(True, len(lines), None, f"{len(lines)} lines, chain intact (head file not checked)")
    hp = head_path(path)
    try:
        head_record = json.loads(hp.read_bytes())
        head_seq, head_hash = int(head_record["seq"]), str(head_record["hash"])
    except FileNotFoundError:
        if not lines:
            return AuditCheck(True, 0, None, "empty log")
        return AuditCheck(False, len(lines), len(lines), f"head file {hp.name} is missing: cannot tell whether "
                          "lines were deleted from the end (use --no-head to check the chain alone)")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return AuditCheck(False, len(lines), len(lines), f"head file {hp.name} is unreadable: {exc}")
    if key_b is not None:
        mac = head_record.get("mac")
        if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key_b, head_record)):
            return AuditCheck(False, len(lines), len(lines), f"head file {hp.name}: HMAC does not match")
    if head_seq > len(lines):
        return AuditCheck(False, len(lines), len(lines) + 1,
                          f"the log ends at line {len(lines)} but its head records {head_seq} lines: "
                          f"line {len(lines) + 1} onwards was deleted")
    if sha256_bytes(lines[head_seq - 1]) != head_hash:
        return AuditCheck(False, len(lines), head_seq, f"line {head_seq}: its hash differs from the one in the "
                          "head file: the line was edited")
    if head_seq < len(lines):
        # A crash between writing a line and updating the head leaves one unrecorded line; more is suspicious.
        note = f"{len(lines) - head_seq} line(s) after the head's seq {head_seq}"
        if len(lines) - head_seq > 1:
            return AuditCheck(False, len(lines), head_seq + 1, f"{note}: lines were appended outside fluxframe")
        return AuditCheck(True, len(lines), None, f"{len(lines)} lines, chain intact ({note}: the last write "
                          "did not update the head, e.g. after a crash)")
    return AuditCheck(True, len(lines), None, f"{len(lines)} lines, chain intact")
