"""Asset layout on disk, atomic publication of a job's folder, and the purge of old folders.

Layout under SAMSEG_ASSETS_DIR:

    {uuid}/mask_images/mask_000.png …   published masks (served by the API)
    {uuid}/result.json                  the callback body
    .samseg/work/{uuid}/                intermediates passed between tasks (image, packed masks)
    .samseg/staging/{uuid}.{token}/     a folder being built; renamed into place when complete
    .samseg/claims/{uuid}               idempotency claim of the job's current run (see idempotency.py)
    .samseg/jobs.sqlite                 default job-status database

A job folder appears by one rename of a complete staging folder on the same filesystem, so readers and
the purge never see a half-written job. Several hosts must share this directory (one volume).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from samseg.contracts import UUID_PATTERN

log = structlog.get_logger(__name__)

MASK_DIR = "mask_images"
SQS_MAX_RETENTION_SECONDS = 14 * 24 * 3600
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class AssetStore:
    root: Path

    @property
    def state_dir(self) -> Path:
        return self.root / ".samseg"

    @property
    def work_root(self) -> Path:
        return self.state_dir / "work"

    @property
    def staging_root(self) -> Path:
        return self.state_dir / "staging"

    @property
    def trash_root(self) -> Path:
        return self.state_dir / "trash"

    @property
    def claims_root(self) -> Path:
        return self.state_dir / "claims"

    def job_dir(self, uuid: str) -> Path:
        return self.root / _checked(uuid)

    def work_dir(self, uuid: str) -> Path:
        return self.work_root / _checked(uuid)

    def result_path(self, uuid: str) -> Path:
        return self.job_dir(uuid) / RESULT_FILE

    def ensure_layout(self) -> None:
        for folder in (self.root, self.work_root, self.staging_root, self.trash_root, self.claims_root):
            folder.mkdir(parents=True, exist_ok=True)

    def publish(self, uuid: str, build: Callable[[Path], None]) -> Path:
        """Build the job folder in staging, then swap it into place; a re-run replaces it whole."""
        self.ensure_layout()
        token = secrets.token_hex(4)
        staging = self.staging_root / f"{_checked(uuid)}.{token}"
        staging.mkdir()
        try:
            build(staging)
            final = self.job_dir(uuid)
            if final.exists() or final.is_symlink():
                retired = self.trash_root / f"{uuid}.{token}"
                os.replace(final, retired)
                try:
                    os.replace(staging, final)
                except OSError:
                    # Someone published the same uuid in between: keep theirs; else put the old one back.
                    if not final.exists():
                        os.replace(retired, final)
                    raise
                _remove(retired)
            else:
                os.replace(staging, final)
        except BaseException:
            _remove(staging)
            raise
        return final

    def read_result(self, uuid: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.result_path(uuid).read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None
        return data

    def discard_work(self, uuid: str) -> None:
        _remove(self.work_dir(uuid))

    def purge(
        self,
        max_age_seconds: float,
        work_max_age_seconds: float,
        now: float | None = None,
        in_progress: Callable[[str], bool] = lambda _uuid: False,
    ) -> list[str]:
        """Delete job folders older than max_age and leftovers of jobs that never finished.

        Work files and claims of a job `in_progress` stay whatever their age (a job may wait in a GPU
        backlog for hours), up to SQS's longest message retention, after which no message can revive it.
        """
        now = time.time() if now is None else now
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        for entry in os.scandir(self.root):
            if not (UUID_PATTERN.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)):
                continue
            if now - entry.stat(follow_symlinks=False).st_mtime > max_age_seconds:
                _remove(Path(entry.path))
                removed.append(entry.name)
        # Staging and trash folders live for seconds; work files and claims as long as their job is alive.
        for folder in (self.work_root, self.staging_root, self.trash_root, self.claims_root):
            if not folder.is_dir():
                continue
            keyed = folder in (self.work_root, self.claims_root)
            for entry in os.scandir(folder):
                age = now - entry.stat(follow_symlinks=False).st_mtime
                if age <= work_max_age_seconds:
                    continue
                if keyed and age < SQS_MAX_RETENTION_SECONDS and in_progress(entry.name.lstrip(".")):
                    continue
                _remove(Path(entry.path))
        return removed


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)


def _checked(uuid: str) -> str:
    if not UUID_PATTERN.fullmatch(uuid):
        raise ValueError(f"unsafe job id {uuid!r}")
    return uuid


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
