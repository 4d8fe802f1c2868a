"""The hourly purge, driven by the job store: it costs in proportion to what expired, not to what is stored.

1. Expired jobs: the store's purge index lists finished jobs whose assets are still there, oldest first;
   each page's jobs lose their result.json (unpublished first), masks and any work files, and their record
   is marked purged (conditionally: a job re-run in the meantime is left alone). Records themselves stay
   until their own TTL, so GET /jobs/{uuid} still answers for a while.
2. Orphans: a bounded sweep over work folders, starting at a random point of the key space, removes the
   work files of runs that no longer exist (record gone, replaced by another run, or finished) and that have
   not been touched for longer than a stage may take. Whatever a crash leaves behind is found eventually;
   an S3 lifecycle rule on `.samseg/work/` is the backstop (docs/deployment.md, "Several hosts").
3. Orphan job folders: every `{uuid}/` folder under the assets root whose newest file is older than the TTL
   goes, whether or not the job store has a record for it (store reset, records expired, a crash between
   publish and record) — unless its record says a run is still going. A cursor kept in the blob store
   (`.samseg/purge/job-cursor`) walks the folders in key order, JOB_SWEEP_LIMIT per run, and starts over at
   the end: N folders are all looked at within ceil(N / JOB_SWEEP_LIMIT) + 1 runs (the hourly default: 2000
   folders a day's runs cover 48 000). Each folder costs one listing of its files (a job's masks).

A record that cannot be handled (a decode error, a refused write, a blob store error on one job) is logged
and skipped: the rest of the run goes on, and the next run tries it again.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import structlog

from samseg.core.contracts import UUID_PATTERN
from samseg.core.settings import Settings
from samseg.stores import Stores
from samseg.stores.layout import WORK_ROOT

log = structlog.get_logger(__name__)

PAGE = 100
MAX_PAGES = 50  # at most 5000 jobs per run; the next run continues where the index says
ORPHAN_SWEEP_LIMIT = 200
JOB_SWEEP_LIMIT = 2000
JOB_CURSOR_KEY = ".samseg/purge/job-cursor"


def purge_expired(stores: Stores, settings: Settings, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    before = now - settings.asset_ttl_seconds
    jobs = objects = failed = 0
    failed_uuids: set[str] = set()
    for _ in range(MAX_PAGES):
        page = [r for r in stores.jobs.finished_before(before, PAGE) if r.uuid not in failed_uuids]
        if not page:
            break
        progressed = False
        for record in page:
            try:
                current = stores.jobs.get(record.uuid)
                if current is None or current.run_id != record.run_id or not current.terminal:
                    continue  # re-run since the index was read: its new run owns the files now
                if current.callback is not None and current.callback.open:
                    # Its callback is still being delivered and its body is result.json: purge once the outbox
                    # closes (delivered, gone, rejected, or expired at SAMSEG_CALLBACK_HORIZON_SECONDS).
                    continue
                objects += stores.assets.remove_job(record.uuid, record.run_id)
                if stores.jobs.mark_purged(record):
                    jobs += 1
                    progressed = True
            except Exception as exc:  # one bad record must not stop the purge: log it, go on, retry next run
                failed += 1
                failed_uuids.add(record.uuid)
                log.error("purge_record_failed", job_uuid=record.uuid, run_id=record.run_id, error=repr(exc))
        if not progressed:
            break  # every candidate was skipped: the index lags behind (eventually consistent); next run
    orphans = _guarded("orphan_runs", lambda: sweep_orphans(stores, settings, now))
    orphan_jobs = _guarded("orphan_jobs", lambda: sweep_job_folders(stores, settings, now))
    expired_records = _guarded("expired_records", lambda: stores.jobs.backend.delete_expired(now))
    return {
        "jobs": jobs,
        "objects": objects,
        "failed": failed,
        "orphan_runs": orphans,
        "orphan_jobs": orphan_jobs,
        "expired_records": expired_records,
    }


def _guarded(part: str, work: Callable[[], int]) -> int:
    try:
        return work()
    except Exception as exc:
        log.error("purge_part_failed", part=part, error=repr(exc))
        return 0


def sweep_orphans(stores: Stores, settings: Settings, now: float, limit: int = ORPHAN_SWEEP_LIMIT) -> int:
    """Delete work folders of dead runs among up to `limit` job folders after a random starting point."""
    grace = settings.stale_run_seconds
    start = secrets.token_hex(4)
    uuids = stores.blobs.children(WORK_ROOT, start_after=start, limit=limit)
    if len(uuids) < limit:
        uuids += stores.blobs.children(WORK_ROOT, limit=limit - len(uuids))
    removed = 0
    for uuid in dict.fromkeys(uuids):
        try:
            removed += _sweep_work_of(stores, uuid, now, grace)
        except Exception as exc:
            log.error("purge_record_failed", job_uuid=uuid, part="orphan_runs", error=repr(exc))
    return removed


def _sweep_work_of(stores: Stores, uuid: str, now: float, grace: float) -> int:
    removed = 0
    record = stores.jobs.get(uuid)
    for run_id in stores.blobs.children(f"{WORK_ROOT}/{uuid}"):
        live = record is not None and record.run_id == run_id and not record.terminal
        if live:
            continue
        prefix = f"{WORK_ROOT}/{uuid}/{run_id}"
        newest = max((info.modified for _, info in stores.blobs.walk(prefix)), default=0.0)
        if now - newest <= grace:
            continue  # a run's files appear before its first status write reaches every reader
        stores.blobs.delete_prefix(prefix)
        removed += 1
        log.info("orphan_work_removed", job_uuid=uuid, run_id=run_id)
    return removed


def sweep_job_folders(stores: Stores, settings: Settings, now: float, limit: int = JOB_SWEEP_LIMIT) -> int:
    """Remove job folders older than the TTL among the next `limit` after the persisted cursor."""
    before = now - settings.asset_ttl_seconds
    cursor = (stores.blobs.get(JOB_CURSOR_KEY) or b"").decode("utf-8", "replace").strip()
    names = stores.blobs.children("", start_after=cursor, limit=limit)
    removed = 0
    for uuid in names:
        if not UUID_PATTERN.fullmatch(uuid):
            continue  # .samseg and anything that is not a job folder
        try:
            removed += _remove_if_expired(stores, uuid, before)
        except Exception as exc:
            log.error("purge_record_failed", job_uuid=uuid, part="orphan_jobs", error=repr(exc))
    # At the end of the listing the next run starts over; else it goes on after the last folder seen.
    stores.blobs.put(JOB_CURSOR_KEY, (names[-1] if len(names) >= limit else "").encode())
    return removed


def _remove_if_expired(stores: Stores, uuid: str, before: float) -> int:
    for _key, info in stores.blobs.walk(uuid):
        if info.modified > before:
            return 0  # something in it is younger than the TTL
    record = stores.jobs.get(uuid)
    if record is not None and (not record.terminal or (record.callback is not None and record.callback.open)):
        return 0  # a run is going on (its files are written later): the lifecycle owns the folder
    count = stores.assets.remove_job(uuid, record.run_id if record is not None else None)
    if record is not None and not record.assets_purged:
        stores.jobs.mark_purged(record)
    log.info("orphan_job_removed", job_uuid=uuid, objects=count, has_record=record is not None)
    return 1
