"""Job status records, kept in Celery's result backend (SAMSEG_RESULT_BACKEND).

One record per job, keyed by its uuid, written by the ingress (queued), by each stage as it starts
(running + stage) and at the end (completed / failed, with the callback's delivery). The backend is
shared by workers and the API, so `GET /jobs/{uuid}` sees what the workers wrote.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

from samseg.contracts import CallbackStatus, ErrorInfo, JobState, JobStatus, Segment, Stage

KEY_PREFIX = "samseg-job-"


class JobStore:
    def __init__(self, app: Celery) -> None:
        self.app = app

    def get(self, uuid: str) -> JobStatus | None:
        meta = self.app.backend.get_task_meta(KEY_PREFIX + uuid, cache=False)
        result = meta.get("result")
        if not isinstance(result, dict):
            return None
        return JobStatus.model_validate(result)

    def in_progress(self, uuid: str) -> bool:
        """Queued or running: its work files and claim must outlive any purge age (see AssetStore.purge)."""
        status = self.get(uuid)
        return status is not None and status.status in (JobState.QUEUED, JobState.RUNNING)

    def put(self, status: JobStatus) -> None:
        self.app.backend.store_result(
            KEY_PREFIX + status.uuid, status.model_dump(mode="json"), status.status.value.upper()
        )

    def set(
        self,
        uuid: str,
        state: JobState,
        stage: Stage | None = None,
        *,
        segments: list[Segment] | None = None,
        error: ErrorInfo | None = None,
        callback: CallbackStatus | None = None,
        run_id: str | None = None,
    ) -> JobStatus:
        status = JobStatus(
            uuid=uuid,
            status=state,
            stage=stage,
            updated_at=time.time(),
            run_id=run_id,
            segments=segments,
            error=error,
            callback=callback,
        )
        self.put(status)
        return status

    def update(self, uuid: str, **changes: Any) -> JobStatus:
        current = self.get(uuid)
        base: dict[str, Any] = current.model_dump() if current else {"uuid": uuid, "status": JobState.QUEUED}
        base.update(changes)
        base["updated_at"] = time.time()
        status = JobStatus.model_validate(base)
        self.put(status)
        return status
