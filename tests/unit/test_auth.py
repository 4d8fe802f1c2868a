"""samseg.api.auth: the bearer-token dependency, on a small FastAPI app served by a real uvicorn on loopback.

The app has the shape api.py's routes will have — protected routes declaring `Depends(require_token(...))`,
open ones without — and Settings comes through a dependency, overridden per test as api.py's tests will.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Annotated

import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI

from samseg.api.auth import require_token, token_matches
from samseg.core.settings import Settings, get_settings
from tests.support import free_port

NEW, OLD, OTHER = "new-token-" + "n" * 24, "old-token-" + "o" * 24, "someone-else-" + "x" * 24
PROTECTED = [("POST", "/jobs"), ("GET", "/jobs/abc"), ("GET", "/metrics")]
OPEN = [("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/docs"), ("GET", "/openapi.json")]


@pytest.fixture(autouse=True)
def hermetic(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.upper().startswith(("SAMSEG_", "AWS_")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def build_app() -> FastAPI:
    app = FastAPI()
    api_auth = require_token(get_settings)

    @app.post("/jobs", status_code=202, dependencies=[Depends(api_auth)])
    def submit() -> dict[str, str]:
        return {"status": "queued"}

    @app.get("/jobs/{uuid}", dependencies=[Depends(api_auth)])
    def status(uuid: str, settings: Annotated[Settings, Depends(get_settings)]) -> dict[str, str]:
        return {"uuid": uuid, "queue": settings.jobs_queue}

    @app.get("/metrics", dependencies=[Depends(api_auth)])
    def metrics() -> dict[str, str]:
        return {"metrics": "here"}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return app


class LiveApp:
    """uvicorn serving `app` on a free loopback port, in a thread; `configure` swaps the Settings it sees."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def configure(self, **values: object) -> None:
        settings = Settings(_env_file=None, **values)
        self.app.dependency_overrides[get_settings] = lambda: settings

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveApp]:
    server = LiveApp(build_app())
    yield server
    server.close()


def call(live: LiveApp, method: str, path: str, token: str | None = None, **headers: str) -> httpx.Response:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.request(method, live.url + path, headers=headers, timeout=10)


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_right_token_is_served(live, method, path):
    live.configure(api_token=NEW)
    response = call(live, method, path, NEW)
    assert response.status_code in {200, 202}, response.text
    assert "WWW-Authenticate" not in response.headers


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_no_token_is_401_with_a_bearer_challenge(live, method, path):
    live.configure(api_token=NEW)
    response = call(live, method, path)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="samseg"'
    assert "missing bearer token" in response.json()["detail"]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_wrong_token_is_401_invalid_token(live, method, path):
    live.configure(api_token=NEW)
    for wrong in (OTHER, NEW[:-1], NEW + "x", NEW.upper(), f"{NEW},{OTHER}"):
        response = call(live, method, path, wrong)
        assert response.status_code == 401, wrong
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="samseg", error="invalid_token"'
        assert response.json()["detail"] == "invalid bearer token"
        assert NEW not in response.text


@pytest.mark.parametrize(
    "authorization", [f"Basic {NEW}", NEW, f"Token {NEW}", "Bearer", f"Bearer{NEW}"], ids=lambda a: a[:12]
)
def test_other_schemes_and_malformed_headers_are_401(live, authorization):
    live.configure(api_token=NEW)
    response = call(live, "POST", "/jobs", Authorization=authorization)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_scheme_name_is_case_insensitive(live):
    live.configure(api_token=NEW)
    assert call(live, "GET", "/metrics", Authorization=f"bearer {NEW}").status_code == 200


def test_rotation_accepts_each_listed_token_and_refuses_the_removed_one(live):
    live.configure(api_token=f"{NEW},{OLD}")  # during the rotation: both work
    for token in (NEW, OLD):
        assert call(live, "POST", "/jobs", token).status_code == 202
    assert call(live, "POST", "/jobs", OTHER).status_code == 401
    live.configure(api_token=NEW)  # rotation finished: the old token is dead
    response = call(live, "POST", "/jobs", OLD)
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert call(live, "POST", "/jobs", NEW).status_code == 202


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_unconfigured_token_means_401_for_everyone(live, method, path):
    live.configure()  # no SAMSEG_API_TOKEN
    for token in (None, NEW, "x", "anything-at-all-here"):
        response = call(live, method, path, token)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="samseg"')
    assert "SAMSEG_API_TOKEN is unset" in call(live, method, path, NEW).json()["detail"]


@pytest.mark.parametrize(("method", "path"), OPEN)
@pytest.mark.parametrize("configured", [True, False])
def test_open_routes_stay_open(live, method, path, configured):
    live.configure(**({"api_token": NEW} if configured else {}))
    assert call(live, method, path).status_code == 200
    assert call(live, method, path, OTHER).status_code == 200  # a wrong token does not hurt either


def test_docs_declare_the_bearer_scheme(live):
    live.configure(api_token=NEW)
    schema = call(live, "GET", "/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert schema["paths"]["/jobs"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_token_matches_checks_every_token():
    assert token_matches(NEW, [OLD, NEW])
    assert token_matches(OLD, [OLD, NEW])
    assert not token_matches(OTHER, [OLD, NEW])
    assert not token_matches(NEW, [])
    assert not token_matches("", [NEW])
    assert token_matches("ünï", ["ünï"])  # non-ASCII compares by bytes, no TypeError
