"""The trust boundary on samseg's real API app, in-process: bearer tokens on the protected routes, the open
routes, and signed mask URLs on real published assets.

The app is samseg.api.main.create_app(settings) — the factory `uvicorn samseg.api:app` uses — driven by
FastAPI's TestClient, lifespan included, so the routes, dependencies and stores are the production ones: a
local-directory blob store and the SQLite job store in tmp_path. Assets are published with samseg's own
Assets.publish and URLs signed with samseg.stores.signed_urls, as the persist stage does.

One stand-in: SQS. POST /jobs gets a recording queue through `app.dependency_overrides[deps.queues]`, so an
accepted job is seen without an SQS server; everything else SQS-facing (/readyz's probe, /metrics' queue
depth) talks to a loopback port nobody listens on, so it fails fast and stays on this machine. The same app
served by uvicorn over moto's SQS is tests/integration/test_api_smoke.py.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from fastapi.testclient import TestClient

from samseg.api import deps
from samseg.api.main import create_app
from samseg.core.contracts import BBox, CallbackBody, Point, Segment
from samseg.core.masks import PackedMasks, write_packed_masks
from samseg.core.settings import Settings
from samseg.stores.blobs import LocalBlobs
from samseg.stores.layout import Assets
from samseg.stores.signed_urls import sign
from tests.support import free_port

NEW, OLD = "new-api-token-" + "n" * 20, "old-api-token-" + "o" * 20
ASSET_SECRET = secrets.token_urlsafe(32)
JOB = {"uuid": "job-accepted-1", "image_url": "https://example.com/a.png"}
# Each protected route and what it answers once the token is accepted (not 401 is not enough: it must serve).
PROTECTED = [("POST", "/jobs", 202), ("GET", "/jobs/no-such-job", 404), ("GET", "/metrics", 200)]
OPEN = [("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/docs"), ("GET", "/openapi.json")]


class RecordingQueues:
    """Stands in for samseg.queue.sqs.JobQueues on POST /jobs: records the message instead of sending it."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send_job(self, body: dict[str, Any]) -> str:
        self.sent.append(body)
        return f"message-{len(self.sent)}"


class Api:
    def __init__(self, client: TestClient, queues: RecordingQueues, settings: Settings) -> None:
        self.client, self.queues, self.settings = client, queues, settings

    def call(self, method: str, path: str, token: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        body = JOB if method == "POST" else None
        return self.client.request(method, path, json=body, headers=headers)


def _settings(root: Path, **env: str) -> Settings:
    """Settings from a hermetic environment (nothing of the caller's SAMSEG_/AWS_ variables), as the API reads it."""
    with pytest.MonkeyPatch.context() as patch:
        for key in list(os.environ):
            if key.upper().startswith(("SAMSEG_", "AWS_")):
                patch.delenv(key)
        values = {
            "SAMSEG_ASSETS_DIR": str(root / "assets"),
            "AWS_ENDPOINT_URL_SQS": f"http://127.0.0.1:{free_port()}",  # nothing listens: refused at once
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            **env,
        }
        for key, value in values.items():
            patch.setenv(key, value)
        return Settings(_env_file=None)


def _serve(settings: Settings) -> Iterator[Api]:
    app = create_app(settings)
    queues = RecordingQueues()
    app.dependency_overrides[deps.queues] = lambda: queues
    with TestClient(app) as client:  # runs the lifespan: the stores are built as in production
        yield Api(client, queues, settings)


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The API configured with two tokens while rotating (new,old)."""
    yield from _serve(_settings(tmp_path_factory.mktemp("rot"), SAMSEG_API_TOKEN=f"{NEW},{OLD}"))


@pytest.mark.parametrize(("method", "path", "served"), PROTECTED)
def test_protected_routes_refuse_missing_and_wrong_tokens_and_serve_the_right_ones(rotated, method, path, served):
    missing = rotated.call(method, path)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    wrong = rotated.call(method, path, "not-the-token-" + "x" * 20)
    assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["www-authenticate"]
    for token in (NEW, OLD):  # both accepted while rotating
        assert rotated.call(method, path, token).status_code == served, (method, path, token)


def test_an_accepted_job_is_queued_as_sent_and_recorded_as_queued(rotated):
    before = len(rotated.queues.sent)
    refused = rotated.call("POST", "/jobs", "not-the-token-" + "x" * 20)
    assert refused.status_code == 401 and len(rotated.queues.sent) == before  # nothing queued without a token
    accepted = rotated.call("POST", "/jobs", NEW)
    assert accepted.status_code == 202
    assert accepted.json()["status_url"].endswith(f"/jobs/{JOB['uuid']}")
    assert rotated.queues.sent[before:] == [JOB]
    status = rotated.call("GET", f"/jobs/{JOB['uuid']}", OLD)
    assert status.status_code == 200 and status.json()["status"] == "queued"


@pytest.mark.parametrize(("method", "path"), OPEN)
def test_open_routes_stay_open(rotated, method, path):
    response = rotated.call(method, path)
    assert response.status_code != 401 and "www-authenticate" not in response.headers
    if path == "/readyz":  # SQS is unreachable on purpose here: not ready, and it says which check failed
        assert response.status_code == 503 and response.json()["status"] == "not ready", response.text
        checks = response.json()["checks"]
        assert checks["broker"]["ok"] is False and checks["blob_store"]["ok"] and checks["job_store"]["ok"], checks
    else:
        assert response.status_code == 200, (path, response.text)


def test_the_old_token_is_refused_once_rotation_is_over_and_nothing_is_served_unconfigured(tmp_path):
    for configured in (NEW, None):
        env = {"SAMSEG_API_TOKEN": configured} if configured else {}
        for api in _serve(_settings(tmp_path / f"unconfigured-{configured is None}", **env)):
            for method, path, served in PROTECTED:
                assert api.call(method, path, OLD).status_code == 401  # rotated out / never configured
                if configured:
                    assert api.call(method, path, configured).status_code == served, (method, path)
                else:  # secure by default: no token configured, no access
                    assert api.call(method, path, NEW).status_code == 401
            for method, path in OPEN:
                assert api.call(method, path).status_code in (200, 503)
            assert api.queues.sent == ([JOB] if configured else [])


# --- signed mask URLs -------------------------------------------------------------------------------------------
def _publish(root: Path, uuid: str, count: int, tmp: Path) -> None:
    rng = np.random.default_rng(0)
    masks = [rng.random((16, 24)) > 0.5 for _ in range(count)]
    write_packed_masks(tmp / "m.npy", masks, count, 16, 24)
    segment = Segment(
        segment_id=0,
        mask_url="-",
        bbox=BBox(x=0, y=0, width=1, height=1),
        area=1,
        stability_score=1,
        predicted_iou=1,
        center_point=Point(x=0, y=0),
    )
    body = CallbackBody(uuid=uuid, status="completed", segments=[segment] * count)
    Assets(LocalBlobs(root)).publish(uuid, PackedMasks(tmp / "m.npy", 24), body)


@pytest.fixture(scope="module")
def signing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("signed")
    settings = _settings(root, SAMSEG_API_TOKEN=NEW, SAMSEG_ASSET_URL_SECRET=ASSET_SECRET)
    _publish(settings.assets_dir, "signed-job", 2, root)  # where the app's local blob store reads
    yield from _serve(settings)


def _mask(index: int) -> str:
    return f"/assets/signed-job/mask_images/mask_{index:03d}.png"


def test_a_valid_signature_is_served(signing):
    query = sign(_mask(0), ASSET_SECRET, 600, time.time())
    response = signing.client.get(f"{_mask(0)}?{query}")
    assert response.status_code == 200 and response.content.startswith(b"\x89PNG")
    assert "public" not in response.headers["cache-control"]


@pytest.mark.parametrize("case", ["no query", "expired", "tampered", "from another mask"])
def test_missing_expired_tampered_or_borrowed_signatures_are_403(signing, case):
    now = time.time()
    if case == "no query":
        url = _mask(1)
    elif case == "expired":
        url = f"{_mask(1)}?{sign(_mask(1), ASSET_SECRET, 1, now - 60)}"
    elif case == "tampered":
        query = sign(_mask(1), ASSET_SECRET, 600, now)
        expires, signature = query.split("&")
        flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
        url = f"{_mask(1)}?{expires}&{flipped}"
    else:
        url = f"{_mask(1)}?{sign(_mask(0), ASSET_SECRET, 600, now)}"
    assert urlsplit(url).path == _mask(1)
    assert signing.client.get(url).status_code == 403
    assert signing.client.get(f"{_mask(1)}?{sign(_mask(1), ASSET_SECRET, 600, now)}").status_code == 200  # exists


def test_with_signed_urls_result_json_takes_the_api_token(signing):
    assert signing.client.get("/assets/signed-job/result.json").status_code == 401
    served = signing.client.get("/assets/signed-job/result.json", headers={"Authorization": f"Bearer {NEW}"})
    assert served.status_code == 200 and served.json()["uuid"] == "signed-job"
