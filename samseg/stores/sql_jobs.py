"""The job store in SQLite: the embedded default for one host (`sqlite:///PATH`).

Every operation is a single SQL statement whose WHERE clause is the condition (autocommit, WAL, busy
timeout), so concurrent processes and threads on this host serialise on SQLite's write lock and a
condition that no longer holds simply matches no row. SQLite needs a local disk: on NFS/EFS its locking is
unsafe — several hosts use DynamoDB instead.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from samseg.core.contracts import CallbackStatus, ErrorInfo, JobState, Stage
from samseg.stores.jobs import TERMINAL_RANK, JobRecord, lifecycle_fields, parse_lifecycle_fields, rank

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    uuid TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    stage TEXT,
    rank INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    run_id TEXT,
    message_id TEXT,
    published INTEGER NOT NULL DEFAULT 0,
    claimed_at REAL NOT NULL DEFAULT 0,
    finished_at REAL,
    error TEXT,
    callback TEXT,
    purge_due INTEGER NOT NULL DEFAULT 0,
    assets_purged INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL DEFAULT 0,
    expires_at REAL NOT NULL,
    lifecycle TEXT,
    sweep_due REAL
);
CREATE INDEX IF NOT EXISTS jobs_purge_due ON jobs (finished_at) WHERE purge_due = 1;
CREATE INDEX IF NOT EXISTS jobs_expires ON jobs (expires_at);
"""
# Columns added after the first release: a table created by an older samseg gets them at `ensure`.
ADDED_COLUMNS = {"lifecycle": "TEXT", "sweep_due": "REAL"}
SWEEP_INDEX = "CREATE INDEX IF NOT EXISTS jobs_sweep_due ON jobs (sweep_due) WHERE sweep_due IS NOT NULL;"
COLUMNS = (
    "uuid, status, stage, rank, updated_at, run_id, message_id, published, claimed_at, finished_at, error, "
    "callback, purge_due, assets_purged, version, expires_at, lifecycle, sweep_due"
)
N_COLUMNS = len(COLUMNS.split(", "))


class SqlJobs:
    def __init__(self, path: Path, record_ttl_seconds: float) -> None:
        self.path = path
        self.record_ttl_seconds = record_ttl_seconds
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout = 30000")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            self._local.db = db
        return db

    def ensure(self) -> None:
        db = self._db()
        db.executescript(SCHEMA)
        present = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        for name, kind in ADDED_COLUMNS.items():
            if name not in present:
                with contextlib.suppress(sqlite3.OperationalError):  # another process added it just now
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        db.executescript(SWEEP_INDEX)

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db().execute(sql, params)
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            self.ensure()  # first use on this host (or the file was removed): create and retry once
            return self._db().execute(sql, params)

    def get(self, uuid: str) -> JobRecord | None:
        row = self._run(f"SELECT {COLUMNS} FROM jobs WHERE uuid = ?", (uuid,)).fetchone()
        return _record(row) if row else None

    def insert(self, record: JobRecord) -> bool:
        placeholders = ", ".join("?" * N_COLUMNS)
        cursor = self._run(f"INSERT OR IGNORE INTO jobs ({COLUMNS}) VALUES ({placeholders})", self._row(record))
        return cursor.rowcount == 1

    def swap(self, expected_version: int, record: JobRecord) -> bool:
        row = self._row(record)
        assignments = ", ".join(f"{name} = ?" for name in COLUMNS.split(", ")[1:])
        cursor = self._run(
            f"UPDATE jobs SET {assignments} WHERE uuid = ? AND version = ?", (*row[1:], record.uuid, expected_version)
        )
        return cursor.rowcount == 1

    def advance(
        self,
        uuid: str,
        run_id: str,
        state: JobState,
        stage: Stage | None,
        now: float,
        error: ErrorInfo | None,
        callback: CallbackStatus | None,
    ) -> bool:
        new_rank = rank(state, stage)
        terminal = new_rank == TERMINAL_RANK
        cursor = self._run(
            """
            UPDATE jobs SET status = ?, stage = ?, rank = ?, updated_at = ?, expires_at = ?,
                error = CASE WHEN ? THEN ? ELSE error END,
                callback = COALESCE(?, callback),
                finished_at = CASE WHEN ? THEN COALESCE(finished_at, ?) ELSE NULL END,
                purge_due = CASE WHEN ? AND assets_purged = 0 THEN 1 ELSE purge_due END,
                version = version + 1
            WHERE uuid = ? AND run_id = ? AND (rank < ? OR (rank = ? AND status = ?))
            """,
            (
                state.value,
                stage.value if stage else None,
                new_rank,
                now,
                now + self.record_ttl_seconds,
                error is not None or state is JobState.COMPLETED,
                _json(error),
                _json(callback),
                terminal,
                now,
                terminal,
                uuid,
                run_id,
                new_rank,
                new_rank,
                state.value,
            ),
        )
        return cursor.rowcount == 1

    def mark_published(self, uuid: str, run_id: str) -> bool:
        cursor = self._run(
            "UPDATE jobs SET published = 1, version = version + 1 WHERE uuid = ? AND run_id = ?", (uuid, run_id)
        )
        return cursor.rowcount == 1

    def finished_before(self, before: float, limit: int) -> list[JobRecord]:
        rows = self._run(
            f"SELECT {COLUMNS} FROM jobs WHERE purge_due = 1 AND finished_at < ? ORDER BY finished_at LIMIT ?",
            (before, limit),
        ).fetchall()
        return [_record(row) for row in rows]

    def mark_purged(self, uuid: str, run_id: str | None, finished_at: float) -> bool:
        cursor = self._run(
            "UPDATE jobs SET purge_due = 0, assets_purged = 1, version = version + 1 "
            "WHERE uuid = ? AND run_id IS ? AND finished_at = ?",
            (uuid, run_id, finished_at),
        )
        return cursor.rowcount == 1

    def sweep_due_before(self, before: float, limit: int) -> list[JobRecord]:
        rows = self._run(
            f"SELECT {COLUMNS} FROM jobs WHERE sweep_due IS NOT NULL AND sweep_due < ? ORDER BY sweep_due LIMIT ?",
            (before, limit),
        ).fetchall()
        return [_record(row) for row in rows]

    def delete_expired(self, now: float, limit: int = 1000) -> int:
        """SQLite has no TTL: the purge removes records past their expiry (DynamoDB's TTL does this itself)."""
        cursor = self._run(
            "DELETE FROM jobs WHERE uuid IN (SELECT uuid FROM jobs WHERE expires_at < ? LIMIT ?)", (now, limit)
        )
        return cursor.rowcount

    def describe(self) -> str:
        return f"sqlite {self.path}"

    def _row(self, r: JobRecord) -> tuple[Any, ...]:
        return (
            r.uuid,
            r.status.value,
            r.stage.value if r.stage else None,
            r.rank,
            r.updated_at,
            r.run_id,
            r.message_id,
            int(r.published),
            r.claimed_at,
            r.finished_at,
            _json(r.error),
            _json(r.callback),
            int(r.terminal and not r.assets_purged),
            int(r.assets_purged),
            r.version,
            r.updated_at + self.record_ttl_seconds,
            json.dumps(lifecycle_fields(r)),
            r.sweep_due,
        )


def _json(model: ErrorInfo | CallbackStatus | None) -> str | None:
    return model.model_dump_json() if model is not None else None


def _record(row: tuple[Any, ...]) -> JobRecord:
    (uuid, status, stage, _rank, updated_at, run_id, message_id, published, claimed_at, finished_at, error,
     callback, _due, purged, version, _expires, lifecycle, sweep_due) = row  # fmt: skip
    return JobRecord(
        uuid=uuid,
        status=JobState(status),
        stage=Stage(stage) if stage else None,
        updated_at=updated_at,
        run_id=run_id,
        message_id=message_id,
        published=bool(published),
        claimed_at=claimed_at,
        finished_at=finished_at,
        error=ErrorInfo.model_validate(json.loads(error)) if error else None,
        callback=CallbackStatus.model_validate(json.loads(callback)) if callback else None,
        assets_purged=bool(purged),
        version=version,
        sweep_due=sweep_due,
        **parse_lifecycle_fields(lifecycle),
    )
