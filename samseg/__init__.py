"""samseg: SAM-2 automatic masks as a Celery-on-SQS service.

`celery -A samseg …` finds the Celery app as `samseg.app`; it is built on first access (PEP 562), so importing
any module of the package builds nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    app: Celery

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from samseg.worker.app import get_app

        return get_app()
    raise AttributeError(f"module 'samseg' has no attribute {name!r}")
