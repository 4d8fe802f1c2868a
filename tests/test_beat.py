"""`celery -A samseg beat` schedules the purge; a real worker runs it; old job folders go, fresh stay."""

from __future__ import annotations

import os
import time

from tests.support import VENV_BIN


def test_beat_purges_old_assets_on_schedule(make_stack):
    stack = make_stack(SAMSEG_CLEANUP_INTERVAL_SECONDS="2", SAMSEG_ASSET_TTL_SECONDS="600")
    old, fresh = stack.assets / "old-job", stack.assets / "fresh-job"
    for folder in (old, fresh):
        (folder / "mask_images").mkdir(parents=True)
        (folder / "mask_images" / "mask_000.png").write_bytes(b"png")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))

    stack.start_worker()
    beat = stack.start("beat", str(VENV_BIN / "celery"), "-A", "samseg", "beat", "--loglevel", "INFO")

    deadline = time.monotonic() + 60
    while old.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not old.exists(), beat.output()[-3000:]
    assert (fresh / "mask_images" / "mask_000.png").exists()
    # It keeps running on schedule: a second folder aged past the TTL is removed too.
    (stack.assets / "old-job-2").mkdir()
    os.utime(stack.assets / "old-job-2", (hour_ago, hour_ago))
    deadline = time.monotonic() + 30
    while (stack.assets / "old-job-2").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not (stack.assets / "old-job-2").exists()
    assert fresh.exists()
