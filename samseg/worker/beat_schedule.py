"""Beat's scheduler: Celery's PersistentScheduler, which first makes the folder of its schedule file.

A fresh host (beat on a host of its own, the job store in DynamoDB) has no state dir yet. A `beat_init` signal
handler is too late for that: `beat.Service.start` builds its scheduler — which opens the file — before it
sends `beat_init` (it evaluates `self.scheduler.max_interval` for a debug line first), so beat died at start
with FileNotFoundError on `celerybeat-schedule.dat`.
"""

from __future__ import annotations

from pathlib import Path

from celery.beat import PersistentScheduler


class StateDirScheduler(PersistentScheduler):  # type: ignore[misc]
    def setup_schedule(self) -> None:
        if self.schedule_filename:
            Path(self.schedule_filename).parent.mkdir(parents=True, exist_ok=True)
        super().setup_schedule()
