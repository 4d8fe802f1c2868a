"""The FastAPI app factory: `create_app(settings)` (served as `uvicorn samseg.api:app`, which calls it once).

The app builds its stores once, in its lifespan, and hands them (and Settings) to the routes through
FastAPI dependencies; routes are split by resource (jobs, assets, health).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from samseg.api import assets, health, jobs
from samseg.api.limits import BodySizeLimit
from samseg.core.logs import configure_logging
from samseg.core.settings import Settings, get_settings
from samseg.ops import metrics
from samseg.queue.sqs import JobQueues
from samseg.stores import build_stores

log = structlog.get_logger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)
    metrics.setup(settings)  # this process tree's samples directory, before any sample is recorded

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stores = build_stores(settings)
        try:
            stores.jobs.ensure()
        except Exception as exc:  # the store may come up later; GET /jobs answers 503 until it does
            log.error("job_store_unavailable", error=repr(exc), url=settings.job_store_url)
        app.state.settings = settings
        app.state.stores = stores
        app.state.queues = JobQueues(settings)
        app.state.published = assets.PublishedCache()
        app.state.health = health.HealthState(settings)
        yield

    app = FastAPI(
        title="samseg",
        version="0.1.0",
        summary="SAM-2 automatic masks: job status and mask assets",
        lifespan=lifespan,
    )
    # Before any route reads a body (FastAPI parses a JSON body before it checks the bearer token).
    app.add_middleware(BodySizeLimit, max_bytes=settings.api_max_body_bytes)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(assets.router)
    return app
