"""The service's durable state: jobs, their uploaded inputs and the token hashes, in one SQLite file.

A job is accepted only once its row is committed, so a process killed at any moment afterwards still has it.
States: ``queued`` → ``running`` → ``done`` | ``blocked`` | ``error`` | ``cancelled`` (a queued job can be
cancelled too). A ``running`` job whose worker died is put back to ``queued`` by ``recover`` (unless the audit
log shows it was already released or blocked: then it is finished from that record), so it runs again from the
start, never twice. Workers claim jobs in one ``BEGIN IMMEDIATE`` transaction, so several processes (Ray
replicas) can share the file; a worker holds a lease on what it runs and renews it while it runs.

Tokens are stored as SHA-256 hashes only; the token itself is shown once, when it is made.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxframe.core.hashing import sha256_text
from fluxframe.errors import FluxframeError

FINISHED = ("done", "blocked", "error", "cancelled")
STATUSES = ("queued", "running", *FINISHED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    client TEXT,
    batch_key TEXT NOT NULL,
    request TEXT NOT NULL,
    settings TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    lease_until REAL,
    cancel INTEGER NOT NULL DEFAULT 0,
    step INTEGER,
    steps INTEGER,
    reasons TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS inputs (
    job TEXT NOT NULL,
    conditioner TEXT NOT NULL,
    key TEXT NOT NULL,
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job, conditioner, key, position)
);
CREATE TABLE IF NOT EXISTS tokens (
    name TEXT PRIMARY KEY,
    sha256 TEXT UNIQUE NOT NULL,
    created REAL NOT NULL
);
"""


class StoreError(FluxframeError):
    """The job store cannot be opened or written (path, permissions, a corrupt file)."""


@dataclass
class Job:
    """One row of ``jobs``, decoded."""

    seq: int
    id: str
    status: str
    client: str | None
    batch_key: str
    request: dict[str, Any]
    settings: dict[str, Any] | None
    created: float
    started: float | None
    finished: float | None
    attempts: int
    worker: str | None
    cancel: bool
    step: int | None
    steps: int | None
    reasons: list[str]
    result: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        loads = lambda text: json.loads(text) if text else None  # noqa: E731
        return cls(seq=row["seq"], id=row["id"], status=row["status"], client=row["client"],
                   batch_key=row["batch_key"], request=json.loads(row["request"]), settings=loads(row["settings"]),
                   created=row["created"], started=row["started"], finished=row["finished"],
                   attempts=row["attempts"], worker=row["worker"], cancel=bool(row["cancel"]), step=row["step"],
                   steps=row["steps"], reasons=loads(row["reasons"]) or [], result=loads(row["result"]))


def new_job_id() -> str:
    """A job id, which is also its request id (so the audit line names the job): "j" and 24 hex digits."""
    return "j" + secrets.token_hex(12)


def token_hash(token: str) -> str:
    return sha256_text(token)


class Store:
    """The SQLite file at ``path`` (made with its folder when absent). Thread-safe: one connection, one lock."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed job survives kill -9
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"{self.path}: cannot open the job store ({exc})") from None

    @classmethod
    def for_config(cls, config) -> Store:
        """The deployment's store: ``jobs.sqlite`` in its [serve] state folder."""
        return cls(config.serve_state_dir / "jobs.sqlite")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from None

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, tuple(params)).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from None

    # -- jobs -----------------------------------------------------------------------------------------

    def add(self, job_id: str, *, request: dict[str, Any], settings: dict[str, Any], batch_key: str,
            client: str | None, files: list[tuple[str, str, int, str, bytes]] = (), max_queue: int | None = None,
            ) -> int | None:
        """Queue a job with its uploaded ``files`` ((conditioner, key, position, name, bytes) each); its queue
        position, or None (nothing stored) when ``max_queue`` jobs are already queued."""
        with self._write() as db:
            if max_queue is not None:
                (queued,) = db.execute("SELECT COUNT(*) FROM jobs WHERE status='queued'").fetchone()
                if queued >= max_queue:
                    return None
            cursor = db.execute(
                "INSERT INTO jobs (id, status, client, batch_key, request, settings, created) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, client, batch_key, json.dumps(request), json.dumps(settings), time.time()))
            db.executemany("INSERT INTO inputs (job, conditioner, key, position, name, data) VALUES (?, ?, ?, ?, ?, ?)",
                           [(job_id, *f) for f in files])
            (ahead,) = db.execute("SELECT COUNT(*) FROM jobs WHERE status='queued' AND seq < ?",
                                  (cursor.lastrowid,)).fetchone()
        return ahead

    def get(self, job_id: str) -> Job | None:
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(rows[0]) if rows else None

    def position(self, job: Job) -> int | None:
        """How many queued jobs are ahead of ``job`` (None unless it is queued)."""
        if job.status != "queued":
            return None
        return self._read("SELECT COUNT(*) FROM jobs WHERE status='queued' AND seq < ?", (job.seq,))[0][0]

    def jobs(self, *, client: str | None = None, limit: int = 50, any_client: bool = False) -> list[Job]:
        """The newest jobs first: ``client``'s, or everyone's with ``any_client``."""
        if any_client:
            rows = self._read("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,))
        else:
            rows = self._read("SELECT * FROM jobs WHERE client IS ? ORDER BY seq DESC LIMIT ?", (client, limit))
        return [Job.from_row(r) for r in rows]

    def inputs(self, job_id: str) -> list[tuple[str, str, int, str, bytes]]:
        rows = self._read("SELECT conditioner, key, position, name, data FROM inputs WHERE job = ? "
                          "ORDER BY conditioner, key, position", (job_id,))
        return [tuple(r) for r in rows]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for status, n in self._read("SELECT status, COUNT(*) FROM jobs GROUP BY status"):
            counts[status] = n
        return counts

    def active(self, client: str | None) -> int:
        """``client``'s jobs queued or running."""
        return self._read("SELECT COUNT(*) FROM jobs WHERE client IS ? AND status IN ('queued', 'running')",
                          (client,))[0][0]

    def next_batch(self, worker: str, limit: int, *, wait: float = 0.0, lease: float = 60.0) -> list[Job]:
        """Claim the oldest queued job and up to ``limit - 1`` more with its batch key, oldest first, for
        ``worker``. With ``wait`` seconds, a batch short of ``limit`` is claimed only once its oldest job has
        waited that long (so jobs arriving together run together). Empty when nothing is ready."""
        with self._write() as db:
            first = db.execute("SELECT * FROM jobs WHERE status='queued' ORDER BY seq LIMIT 1").fetchone()
            if first is None:
                return []
            rows = db.execute("SELECT * FROM jobs WHERE status='queued' AND batch_key = ? ORDER BY seq LIMIT ?",
                              (first["batch_key"], limit)).fetchall()
            now = time.time()
            if len(rows) < limit and now < first["created"] + wait:
                return []
            ids = [r["id"] for r in rows]
            db.execute(f"UPDATE jobs SET status='running', started=?, attempts=attempts+1, worker=?, lease_until=?, "
                       f"step=0 WHERE id IN ({','.join('?' * len(ids))})", (now, worker, now + lease, *ids))
            rows = db.execute(f"SELECT * FROM jobs WHERE id IN ({','.join('?' * len(ids))}) ORDER BY seq",
                              ids).fetchall()
        return [Job.from_row(r) for r in rows]

    def claim(self, ids: Iterable[str], worker: str, *, lease: float = 60.0) -> list[Job]:
        """Claim those of the jobs ``ids`` that are still queued for ``worker`` (a job pushed to one worker may
        have been claimed by another meanwhile); the claimed jobs, oldest first."""
        ids = list(ids)
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self._write() as db:
            now = time.time()
            db.execute(f"UPDATE jobs SET status='running', started=?, attempts=attempts+1, worker=?, lease_until=?, "
                       f"step=0 WHERE status='queued' AND id IN ({marks})", (now, worker, now + lease, *ids))
            rows = db.execute(f"SELECT * FROM jobs WHERE status='running' AND worker=? AND started=? AND id IN "
                              f"({marks}) ORDER BY seq", (worker, now, *ids)).fetchall()
        return [Job.from_row(r) for r in rows]

    def renew(self, worker: str, *, lease: float = 60.0) -> int:
        """Renew the lease of every job ``worker`` is running (a heartbeat: a live worker keeps its jobs between
        steps too); how many."""
        with self._write() as db:
            return db.execute("UPDATE jobs SET lease_until=? WHERE status='running' AND worker=?",
                              (time.time() + lease, worker)).rowcount

    def progress(self, ids: Iterable[str], step: int, steps: int, *, lease: float = 60.0) -> None:
        """The running jobs ``ids`` are at ``step`` of ``steps``; their lease is renewed."""
        ids = list(ids)
        if ids:
            with self._write() as db:
                db.execute(f"UPDATE jobs SET step=?, steps=?, lease_until=? WHERE status='running' "
                           f"AND id IN ({','.join('?' * len(ids))})", (step, steps, time.time() + lease, *ids))

    def cancel_requested(self, ids: Iterable[str]) -> set[str]:
        ids = list(ids)
        if not ids:
            return set()
        rows = self._read(f"SELECT id FROM jobs WHERE cancel=1 AND id IN ({','.join('?' * len(ids))})", ids)
        return {r[0] for r in rows}

    def finish(self, job_id: str, status: str, *, reasons: list[str] = (), result: dict[str, Any] | None = None,
               worker: str | None = None) -> bool:
        """Record a job's end; False when it is no longer ``worker``'s running job (given back meanwhile)."""
        assert status in FINISHED, status
        with self._write() as db:
            where, params = "id = ? AND status = 'running'", [job_id]
            if worker is not None:
                where += " AND worker = ?"
                params.append(worker)
            cursor = db.execute(f"UPDATE jobs SET status=?, finished=?, reasons=?, result=?, lease_until=NULL "
                                f"WHERE {where}", (status, time.time(), json.dumps(list(reasons)),
                                                   json.dumps(result) if result is not None else None, *params))
            if cursor.rowcount:
                db.execute("DELETE FROM inputs WHERE job = ?", (job_id,))  # uploads are kept only while needed
        return bool(cursor.rowcount)

    def cancel(self, job_id: str) -> str | None:
        """Cancel a job: a queued one is cancelled at once, a running one is asked to stop at its next step.
        Its status after the call (None for an unknown job)."""
        with self._write() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["status"] == "queued":
                db.execute("UPDATE jobs SET status='cancelled', finished=?, reasons=? WHERE id = ?",
                           (time.time(), json.dumps(["cancelled before it ran"]), job_id))
                db.execute("DELETE FROM inputs WHERE job = ?", (job_id,))
                return "cancelled"
            if row["status"] == "running":
                db.execute("UPDATE jobs SET cancel=1 WHERE id = ?", (job_id,))
            return row["status"]

    def stale(self, *, worker: str | None = None) -> list[Job]:
        """Running jobs whose worker is gone: ``worker``'s (a restart of that worker), else those whose lease
        ran out."""
        if worker is not None:
            rows = self._read("SELECT * FROM jobs WHERE status='running' AND worker IS ?", (worker,))
        else:
            rows = self._read("SELECT * FROM jobs WHERE status='running' AND lease_until < ?", (time.time(),))
        return [Job.from_row(r) for r in rows]

    def requeue(self, job_id: str, *, worker: str | None) -> bool:
        """Put a running job of ``worker`` back in the queue, in its old place (it runs again from the start)."""
        with self._write() as db:
            cursor = db.execute("UPDATE jobs SET status='queued', worker=NULL, lease_until=NULL, step=NULL "
                                "WHERE id = ? AND status='running' AND worker IS ?", (job_id, worker))
        return bool(cursor.rowcount)

    def expired(self, before: float) -> list[Job]:
        rows = self._read("SELECT * FROM jobs WHERE status IN ('done', 'blocked', 'error', 'cancelled') "
                          "AND finished < ?", (before,))
        return [Job.from_row(r) for r in rows]

    def remove(self, job_id: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM inputs WHERE job = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    # -- tokens ---------------------------------------------------------------------------------------

    def add_token(self, name: str) -> str:
        """A new token for ``name`` (returned once; only its hash is kept). StoreError if the name is taken."""
        token = "ff_" + secrets.token_urlsafe(32)
        with self._write() as db:
            if db.execute("SELECT 1 FROM tokens WHERE name = ?", (name,)).fetchone():
                raise StoreError(f"a token named {name!r} exists already (remove it first)")
            db.execute("INSERT INTO tokens (name, sha256, created) VALUES (?, ?, ?)",
                       (name, token_hash(token), time.time()))
        return token

    def remove_token(self, name: str) -> bool:
        with self._write() as db:
            return bool(db.execute("DELETE FROM tokens WHERE name = ?", (name,)).rowcount)

    def token_names(self) -> list[str]:
        return [r[0] for r in self._read("SELECT name FROM tokens ORDER BY name")]

    def token_name(self, token: str) -> str | None:
        """The name of ``token``, or None when it is not one of ours."""
        rows = self._read("SELECT name FROM tokens WHERE sha256 = ?", (token_hash(token),))
        return rows[0][0] if rows else None
