"""`celery -A samseg beat` schedules the purge; a real worker runs it; expired jobs' assets go, fresh stay.

The purge is driven by the job store (samseg.stores.purge): the test records finished jobs in the stack's own
store (built by samseg's factory from the stack's settings) and publishes their folders, one finished an hour
ago (past the 10-minute TTL) and one just now.
"""

from __future__ import annotations

import time

from samseg.core.contracts import JobState
from tests.faults_support import stack_stores, wait_until
from tests.support import VENV_BIN


def _finished_job(stores, uuid: str, finished_at: float) -> None:  # type: ignore[no-untyped-def]
    claim = stores.jobs.claim(uuid, f"m-{uuid}", now=finished_at)
    assert stores.jobs.advance(uuid, claim.run_id, JobState.COMPLETED, now=finished_at)
    stores.blobs.put(f"{uuid}/mask_images/mask_000.png", b"png")
    stores.blobs.put(f"{uuid}/result.json", b"{}")


def test_beat_purges_expired_jobs_on_schedule(make_stack):
    stack = make_stack(SAMSEG_CLEANUP_INTERVAL_SECONDS="2", SAMSEG_ASSET_TTL_SECONDS="600")
    _, stores = stack_stores(stack.env)
    stores.jobs.ensure()
    hour_ago = time.time() - 3600
    _finished_job(stores, "old-job", hour_ago)
    _finished_job(stores, "fresh-job", time.time())
    old, fresh = stack.assets / "old-job", stack.assets / "fresh-job"

    stack.start_worker()
    beat = stack.start("beat", str(VENV_BIN / "celery"), "-A", "samseg", "beat", "--loglevel", "INFO")

    wait_until(lambda: not old.exists(), 60, f"the expired job purged:\n{beat.output()[-2000:]}")
    assert (fresh / "mask_images" / "mask_000.png").exists()
    assert stores.jobs.get("old-job").assets_purged and not stores.jobs.get("fresh-job").assets_purged
    # It keeps running on schedule: a second job that expired meanwhile is removed too.
    _finished_job(stores, "old-job-2", hour_ago)
    wait_until(lambda: not (stack.assets / "old-job-2").exists(), 30, "the second expired job purged")
    assert fresh.exists()
