"""HTTP API: job submission and status, the mask assets, health — `uvicorn samseg.api:app`.

`app` is built on first access (PEP 562), from the environment's Settings, by `samseg.api.main.create_app`;
importing samseg.api or one of its modules builds nothing. Tests and embedders call `create_app(settings)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from samseg.api.main import create_app

    app: FastAPI

__all__ = ["app", "create_app"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from samseg.api import main

    if name == "create_app":
        return main.create_app
    built = main.create_app()
    globals()["app"] = built  # later lookups find it without coming here
    return built
