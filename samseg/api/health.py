"""/healthz (the process serves), /readyz (its dependencies answer) and /metrics (Prometheus)."""

from __future__ import annotations

import threading
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials

from samseg.api.auth import bearer_scheme, token_matches
from samseg.api.deps import SettingsDep, StoresDep, authenticated
from samseg.core.settings import Settings
from samseg.ops import metrics  # first: it configures prometheus_client's multiprocess mode
from samseg.ops.health import public_checks, readiness
from samseg.queue.sqs import JobQueues, probe_client
from samseg.stores import Stores

router = APIRouter(tags=["health"])


class HealthState:
    """What the health routes keep between requests: a fail-fast SQS client and the metric collectors."""

    def __init__(self, settings: Settings) -> None:
        # One attempt, short timeouts, a real request on every probe: a cached answer would hide an outage.
        self.probe = JobQueues(settings, client=probe_client(settings))
        names = (settings.jobs_queue, settings.dead_letter_queue, settings.io_queue, settings.gpu_queue)
        queues = (*names, *settings.task_dead_letter_queues.values())
        # Read by a background thread (started by the first scrape), never on the scrape's own thread.
        self.queue_depth = metrics.QueueDepthPoller(
            lambda: {name: self.probe.depth(name) for name in queues}, settings.queue_depth_interval_seconds
        )
        self.disk = metrics.DiskCollector(settings.assets_dir)
        # prod-k8s: visible + in-flight per queue, the autoscalers' signal (samseg/ops/scaling_signal.py)
        from samseg.ops.scaling_signal import BacklogPoller, backlog_reader

        self.backlog = BacklogPoller(
            backlog_reader(self.probe.client, self.probe.url, names), settings.queue_depth_interval_seconds
        )
        self.ready_ttl = settings.readyz_cache_seconds
        self._ready: tuple[float, float, bool, dict[str, dict[str, Any]]] | None = None
        self._ready_lock = threading.Lock()

    def readiness(self, settings: Settings, stores: Stores) -> tuple[float, bool, dict[str, dict[str, Any]]]:
        """The last round of checks if younger than SAMSEG_READYZ_CACHE_SECONDS, else a new round.

        One round at a time (the lock): probes arriving during a round wait for it and share its answer
        instead of each calling SQS and the stores.
        """
        with self._ready_lock:
            cached = self._ready
            if cached is not None and time.monotonic() - cached[0] < self.ready_ttl:
                return cached[1], cached[2], cached[3]
            checked_at = time.time()
            ok, checks = readiness(settings, lambda: self.probe.reachable(settings.jobs_queue), stores)
            self._ready = (time.monotonic(), checked_at, ok, checks)
            return checked_at, ok, checks


def _state(request: Request) -> HealthState:
    state: HealthState = request.app.state.health
    return state


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up and serving (no dependency checks)."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(
    request: Request,
    settings: SettingsDep,
    stores: StoresDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> JSONResponse:
    """Ready to take jobs: SQS, the blob store and the job store answer. 503 lists what does not.

    Anyone (a load balancer, Kubernetes) gets the verdict and which check failed; the details — queue,
    bucket, table and path names, error texts — only a caller with a valid API token.
    """
    checked_at, ok, checks = _state(request).readiness(settings, stores)
    insider = credentials is not None and token_matches(credentials.credentials, settings.api_tokens())
    shown = checks if insider else public_checks(checks)
    body = {"status": "ready" if ok else "not ready", "checks": shown, "checked_at": round(checked_at, 3)}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response, dependencies=[authenticated])
def prometheus_metrics(request: Request) -> Response:
    """Prometheus text format: this API process's samples, queue depth, free disk (workers serve their own)."""
    state = _state(request)
    state.queue_depth.ensure_started()
    state.backlog.ensure_started()  # prod-k8s
    return Response(
        metrics.render(state.queue_depth, state.disk, state.backlog),
        media_type="text/plain; version=0.0.4; charset=utf-8",
    )
