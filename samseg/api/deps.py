"""What routes receive through `Depends`: Settings, the stores and the SQS helper, built in the lifespan."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from samseg.api.auth import require_token
from samseg.core.settings import Settings
from samseg.queue.sqs import JobQueues
from samseg.stores import Stores


def settings(request: Request) -> Settings:
    value: Settings = request.app.state.settings
    return value


def stores(request: Request) -> Stores:
    value: Stores = request.app.state.stores
    return value


def queues(request: Request) -> JobQueues:
    value: JobQueues = request.app.state.queues
    return value


SettingsDep = Annotated[Settings, Depends(settings)]
# POST /jobs, GET /jobs/{uuid}, /metrics (and result.json when mask URLs are signed): Authorization: Bearer.
authenticated = Depends(require_token(settings))
StoresDep = Annotated[Stores, Depends(stores)]
QueuesDep = Annotated[JobQueues, Depends(queues)]
