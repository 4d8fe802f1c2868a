"""/healthz (the process serves), /readyz (its dependencies answer) and /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from samseg import metrics  # first: it configures prometheus_client's multiprocess mode
from samseg.api.deps import QueuesDep, SettingsDep, StoresDep, authenticated
from samseg.health import readiness
from samseg.settings import Settings
from samseg.sqs import JobQueues

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up and serving (no dependency checks)."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(settings: SettingsDep, stores: StoresDep, queues: QueuesDep) -> JSONResponse:
    """Ready to take jobs: SQS, the blob store and the job store answer. 503 lists what does not."""

    def broker() -> str:
        queues.depth(settings.jobs_queue)  # a real request every time: a cached URL would hide an outage
        return f"{settings.jobs_queue} reachable"

    ok, checks = readiness(settings, broker, stores)
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response, dependencies=[authenticated])
def prometheus_metrics(request: Request, settings: SettingsDep, queues: QueuesDep) -> Response:
    """Prometheus text format: job outcomes, stage durations, masks per job, queue depth, disk usage."""
    collector = getattr(request.app.state, "scrape_collector", None)
    if collector is None:
        collector = metrics.ScrapeTimeCollector(settings.assets_dir, lambda: _queue_depths(settings, queues))
        request.app.state.scrape_collector = collector
    return Response(metrics.render(collector), media_type="text/plain; version=0.0.4; charset=utf-8")


def _queue_depths(settings: Settings, queues: JobQueues) -> dict[str, int]:
    names = (settings.jobs_queue, settings.dead_letter_queue, settings.io_queue, settings.gpu_queue)
    return {name: queues.depth(name) for name in names}
