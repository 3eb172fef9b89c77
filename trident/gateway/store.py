"""The gateway's job store: SQLite (stdlib ``sqlite3``, WAL) plus output files on disk.

``STATE_DIR/jobs.sqlite3`` holds one row per video job (and per image kept for a
``url`` response); ``STATE_DIR/outputs/`` holds their files. Both outlive the process:
a restarted gateway serves the same jobs, and runs again the ones that were queued or
running. Several gateway processes on one host may share a state directory: a job is
run by the gateway holding its **lease** (``owner``, ``lease_until``), renewed while
it runs; a lease that lapses (its gateway died) lets another gateway, or the same one
restarted, claim the job. A gateway that stops cleanly hands its jobs back at once.

Finished rows and their files are deleted ``retention_s`` after they finished
(``expires_at``); a DELETE removes them sooner.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ACTIVE", "FINISHED", "Job", "JobStore"]

ACTIVE = ("queued", "in_progress")
FINISHED = ("completed", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    expires_at INTEGER,
    request TEXT NOT NULL,
    info TEXT NOT NULL DEFAULT '{}',
    error_code TEXT,
    error_message TEXT,
    output TEXT,
    owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (kind, status, seq);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at);
"""


@dataclass
class Job:
    id: str
    kind: str  # "video" | "image"
    model: str
    status: str
    created_at: int
    request: dict[str, Any]  # what is sent to the scheduler (SDK generate() arguments)
    info: dict[str, Any] = field(default_factory=dict)  # size, seconds, fps, timings, ...
    progress: int = 0
    completed_at: int | None = None
    expires_at: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    output: str | None = None  # file name under outputs/
    owner: str | None = None
    lease_until: float = 0.0
    attempts: int = 0
    cancel_requested: bool = False
    seq: int = 0


_COLUMNS = (
    "seq, id, kind, model, status, progress, created_at, completed_at, expires_at, request, "
    "info, error_code, error_message, output, owner, lease_until, attempts, cancel_requested"
)


def _job(row: tuple[Any, ...]) -> Job:
    (
        seq,
        id_,
        kind,
        model,
        status,
        progress,
        created_at,
        completed_at,
        expires_at,
        request,
        info,
        error_code,
        error_message,
        output,
        owner,
        lease_until,
        attempts,
        cancel_requested,
    ) = row
    return Job(
        id=id_,
        kind=kind,
        model=model,
        status=status,
        created_at=created_at,
        request=json.loads(request),
        info=json.loads(info),
        progress=progress,
        completed_at=completed_at,
        expires_at=expires_at,
        error_code=error_code,
        error_message=error_message,
        output=output,
        owner=owner,
        lease_until=lease_until,
        attempts=attempts,
        cancel_requested=bool(cancel_requested),
        seq=seq,
    )


class JobStore:
    """Thread-safe (one connection behind a lock); every method is one short
    transaction. Times are wall-clock seconds (``time.time()``), shared between
    processes."""

    def __init__(self, state_dir: str | os.PathLike[str], retention_s: float = 86_400.0) -> None:
        self.root = Path(state_dir)
        self.outputs = self.root / "outputs"
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.retention_s = float(retention_s)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.root / "jobs.sqlite3", timeout=10.0, check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        with self._lock:
            self._db.executescript(_SCHEMA)  # its own transaction

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def path_of(self, job: Job) -> Path | None:
        return self.outputs / job.output if job.output else None

    def expiry(self, now: float) -> int:
        return int(now + self.retention_s)

    # ------------------------------------------------------------------ rows

    def add(self, job: Job) -> Job:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO jobs (id, kind, model, status, progress, created_at, completed_at,"
                " expires_at, request, info, output) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    job.id,
                    job.kind,
                    job.model,
                    job.status,
                    job.progress,
                    job.created_at,
                    job.completed_at,
                    job.expires_at,
                    json.dumps(job.request),
                    json.dumps(job.info),
                    job.output,
                ),
            )
            job.seq = int(cur.lastrowid or 0)
        return job

    def get(self, job_id: str, kind: str | None = None) -> Job | None:
        rows = self._read(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        job = _job(rows[0])
        return job if kind is None or job.kind == kind else None

    def page(
        self, kind: str, after: str | None, limit: int, order: str = "desc"
    ) -> tuple[list[Job], bool]:
        """Up to ``limit`` jobs of ``kind`` after the job ``after`` (by creation, in
        ``order``), and whether more follow. An unknown ``after`` raises KeyError."""
        asc = order == "asc"
        where, args = "kind = ?", [kind]
        if after is not None:
            rows = self._read("SELECT seq FROM jobs WHERE id = ? AND kind = ?", (after, kind))
            if not rows:
                raise KeyError(after)
            where += " AND seq > ?" if asc else " AND seq < ?"
            args.append(rows[0][0])
        rows = self._read(
            f"SELECT {_COLUMNS} FROM jobs WHERE {where} ORDER BY seq {'ASC' if asc else 'DESC'}"
            " LIMIT ?",
            (*args, limit + 1),
        )
        jobs = [_job(r) for r in rows]
        return jobs[:limit], len(jobs) > limit

    def count_active(self, kind: str = "video") -> int:
        rows = self._read(
            "SELECT COUNT(*) FROM jobs WHERE kind = ? AND status IN ('queued', 'in_progress')",
            (kind,),
        )
        return int(rows[0][0])

    # ------------------------------------------------------------------ running jobs

    def claim(self, owner: str, lease_s: float, limit: int, now: float) -> list[Job]:
        """Take up to ``limit`` runnable jobs (active, unowned or with another owner's
        lapsed lease, past their retry time), oldest first; each is this owner's until
        its lease lapses."""
        if limit <= 0:
            return []
        claimed: list[Job] = []
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE kind = 'video'"
                " AND status IN ('queued', 'in_progress') AND cancel_requested = 0"
                " AND (owner IS NULL OR (lease_until < ? AND owner != ?)) AND not_before <= ?"
                " ORDER BY seq LIMIT ?",
                (now, owner, now, limit),
            ).fetchall()
            for row in rows:
                job = _job(row)
                db.execute(
                    "UPDATE jobs SET owner = ?, lease_until = ?, attempts = attempts + 1,"
                    " status = 'queued', progress = 0 WHERE id = ?",
                    (owner, now + lease_s, job.id),
                )
                job.owner, job.lease_until, job.attempts = owner, now + lease_s, job.attempts + 1
                job.status, job.progress = "queued", 0
                claimed.append(job)
        return claimed

    def renew(self, owner: str, ids: list[str], lease_s: float, now: float) -> None:
        if not ids:
            return
        with self._tx() as db:
            db.executemany(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND owner = ?",
                [(now + lease_s, i, owner) for i in ids],
            )

    def set_progress(self, owner: str, updates: dict[str, int]) -> None:
        """Running jobs' progress (0-99): each is ``in_progress`` from its first report."""
        if not updates:
            return
        with self._tx() as db:
            db.executemany(
                "UPDATE jobs SET status = 'in_progress', progress = ? WHERE id = ? AND owner = ?"
                " AND status IN ('queued', 'in_progress')",
                [(p, i, owner) for i, p in updates.items()],
            )

    def complete(
        self, owner: str, job_id: str, output: str, info: dict[str, Any], now: float
    ) -> bool:
        """Completed with ``output`` (a file in outputs/): False when the job is no
        longer this owner's to finish (cancelled, claimed by another)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status = 'completed', progress = 100, completed_at = ?,"
                " expires_at = ?, output = ?, info = ?, owner = NULL, lease_until = 0"
                " WHERE id = ? AND owner = ? AND status IN ('queued', 'in_progress')",
                (int(now), self.expiry(now), output, json.dumps(info), job_id, owner),
            )
            return cur.rowcount == 1

    def fail(self, owner: str, job_id: str, code: str, message: str, now: float) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status = 'failed', completed_at = ?, expires_at = ?,"
                " error_code = ?, error_message = ?, owner = NULL, lease_until = 0"
                " WHERE id = ? AND owner = ? AND status IN ('queued', 'in_progress')",
                (int(now), self.expiry(now), code, message[:4000], job_id, owner),
            )
            return cur.rowcount == 1

    def requeue(self, owner: str, job_id: str, not_before: float) -> None:
        """Back in the queue (to be claimed again from ``not_before`` on)."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status = 'queued', progress = 0, owner = NULL, lease_until = 0,"
                " not_before = ? WHERE id = ? AND owner = ? AND status IN ('queued', 'in_progress')",
                (not_before, job_id, owner),
            )

    def release(self, owner: str) -> int:
        """Every active job of ``owner`` back in the queue, claimable at once (a clean
        shutdown); returns how many."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status = 'queued', progress = 0, owner = NULL, lease_until = 0"
                " WHERE owner = ? AND status IN ('queued', 'in_progress')",
                (owner,),
            )
            return cur.rowcount

    def cancel(self, job_id: str, now: float) -> Job | None:
        """Mark an active job cancelled (its runner stops it); None if it is not active."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status = 'cancelled', cancel_requested = 1, completed_at = ?,"
                " expires_at = ?, error_code = 'cancelled', error_message = ?"
                " WHERE id = ? AND status IN ('queued', 'in_progress')",
                (int(now), self.expiry(now), "cancelled by DELETE", job_id),
            )
            if cur.rowcount != 1:
                return None
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row)

    def cancelled_of(self, owner: str, ids: list[str]) -> list[str]:
        """Which of ``owner``'s running ``ids`` it must stop: cancelled (by any
        gateway), deleted, or no longer its own (its lease lapsed and another took it)."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = self._read(
            f"SELECT id, cancel_requested, owner FROM jobs WHERE id IN ({marks})", tuple(ids)
        )
        keep = {r[0] for r in rows if not r[1] and r[2] == owner}
        return [i for i in ids if i not in keep]

    def delete(self, job_id: str) -> Job | None:
        """Remove a row and its file; returns what it was."""
        with self._tx() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        job = _job(row)
        self._unlink(job)
        return job

    def sweep(self, now: float) -> int:
        """Delete finished rows (and files) past their expiry; returns how many."""
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?"
                " AND status NOT IN ('queued', 'in_progress')",
                (int(now),),
            ).fetchall()
            db.executemany("DELETE FROM jobs WHERE id = ?", [(r[1],) for r in rows])
        for row in rows:
            self._unlink(_job(row))
        return len(rows)

    def _unlink(self, job: Job) -> None:
        path = self.path_of(job)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def write_output(self, name: str, data: bytes) -> Path:
        """``data`` as outputs/``name``, written whole (temporary name, then rename)."""
        path = self.outputs / name
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path
