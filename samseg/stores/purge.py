"""The hourly purge, driven by the job store: it costs in proportion to what expired, not to what is stored.

1. Expired jobs: the store's purge index lists finished jobs whose assets are still there, oldest first;
   each page's jobs lose their result.json (unpublished first), masks and any work files, and their record
   is marked purged (conditionally: a job re-run in the meantime is left alone). Records themselves stay
   until their own TTL, so GET /jobs/{uuid} still answers for a while.
2. Orphans: a bounded sweep over work folders, starting at a random point of the key space, removes the
   work files of runs that no longer exist (record gone, replaced by another run, or finished) and that have
   not been touched for longer than a stage may take. Whatever a crash leaves behind is found eventually;
   an S3 lifecycle rule on `.samseg/work/` is the backstop (docs/deployment.md, "Several hosts").
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import structlog

from samseg.core.settings import Settings
from samseg.stores import Stores
from samseg.stores.layout import WORK_ROOT

log = structlog.get_logger(__name__)

PAGE = 100
MAX_PAGES = 50  # at most 5000 jobs per run; the next run continues where the index says
ORPHAN_SWEEP_LIMIT = 200


def purge_expired(stores: Stores, settings: Settings, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    before = now - settings.asset_ttl_seconds
    jobs = objects = 0
    for _ in range(MAX_PAGES):
        page = stores.jobs.finished_before(before, PAGE)
        if not page:
            break
        progressed = False
        for record in page:
            current = stores.jobs.get(record.uuid)
            if current is None or current.run_id != record.run_id or not current.terminal:
                continue  # re-run since the index was read: its new run owns the files now
            if current.callback is not None and current.callback.open:
                # Its callback is still being delivered and its body is result.json: purge once the outbox
                # closes (delivered, gone, rejected, or expired at SAMSEG_CALLBACK_HORIZON_SECONDS).
                continue
            objects += stores.assets.remove_job(record.uuid)
            if stores.jobs.mark_purged(record):
                jobs += 1
                progressed = True
        if not progressed:
            break  # every candidate was skipped: the index lags behind (eventually consistent); next run
    orphans = sweep_orphans(stores, settings, now)
    expired_records = stores.jobs.backend.delete_expired(now)
    return {"jobs": jobs, "objects": objects, "orphan_runs": orphans, "expired_records": expired_records}


def sweep_orphans(stores: Stores, settings: Settings, now: float, limit: int = ORPHAN_SWEEP_LIMIT) -> int:
    """Delete work folders of dead runs among up to `limit` job folders after a random starting point."""
    grace = settings.stale_run_seconds
    start = secrets.token_hex(4)
    uuids = stores.blobs.children(WORK_ROOT, start_after=start, limit=limit)
    if len(uuids) < limit:
        uuids += stores.blobs.children(WORK_ROOT, limit=limit - len(uuids))
    removed = 0
    for uuid in dict.fromkeys(uuids):
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
