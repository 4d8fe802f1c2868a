"""The trust boundary on samseg's real API (uvicorn serving samseg.api:app over moto's SQS on loopback):
bearer tokens on the protected routes, the open routes, and signed mask URLs on real published assets.

Assets are published into the API's blob store (a local directory) with samseg's own Assets.publish, as the
persist stage does; URLs are signed with samseg.stores.signed_urls, as persist does. Nothing is mocked but AWS (moto).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from samseg.core.contracts import BBox, CallbackBody, Point, Segment
from samseg.core.masks import PackedMasks, write_packed_masks
from samseg.stores.blobs import LocalBlobs
from samseg.stores.layout import Assets
from samseg.stores.signed_urls import sign

NEW, OLD = "new-api-token-" + "n" * 20, "old-api-token-" + "o" * 20
ASSET_SECRET = secrets.token_urlsafe(32)
PROTECTED = [("POST", "/jobs"), ("GET", "/jobs/some-job"), ("GET", "/metrics")]
OPEN = [("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/docs")]


def _call(api: str, method: str, path: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"uuid": "some-job", "image_url": "https://example.com/a.png"} if method == "POST" else None
    return httpx.request(method, api + path, json=body, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def rotated(moto_url, tiny_checkpoint, tmp_path_factory) -> Any:
    """An API configured with two tokens while rotating (new,old)."""
    from tests.conftest import new_stack

    stack = new_stack(moto_url, tiny_checkpoint, tmp_path_factory.mktemp("rot"), f"sec{secrets.token_hex(3)}-")
    stack.env["SAMSEG_API_TOKEN"] = f"{NEW},{OLD}"
    api = stack.start_api()
    yield stack, api
    stack.stop()


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_protected_routes_refuse_missing_and_wrong_tokens_and_serve_the_right_ones(rotated, method, path):
    _, api = rotated
    missing = _call(api, method, path)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    wrong = _call(api, method, path, "not-the-token-" + "x" * 20)
    assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["www-authenticate"]
    for token in (NEW, OLD):  # both accepted while rotating
        assert _call(api, method, path, token).status_code in (200, 202, 404), (method, path)


@pytest.mark.parametrize(("method", "path"), OPEN)
def test_open_routes_stay_open(rotated, method, path):
    _, api = rotated
    assert _call(api, method, path).status_code in (200, 503)  # readyz may be 503, never 401


def test_the_old_token_is_refused_once_rotation_is_over_and_nothing_is_served_unconfigured(
    moto_url, tiny_checkpoint, tmp_path
):
    from tests.conftest import new_stack

    for configured, accepted in ((NEW, NEW), (None, None)):
        stack = new_stack(moto_url, tiny_checkpoint, tmp_path / f"s{configured is None}", f"r{secrets.token_hex(3)}-")
        if configured:
            stack.env["SAMSEG_API_TOKEN"] = configured
        else:
            stack.env.pop("SAMSEG_API_TOKEN")
        api = stack.start_api()
        try:
            for method, path in PROTECTED:
                assert _call(api, method, path, OLD).status_code == 401  # rotated out / never configured
                if accepted:
                    assert _call(api, method, path, accepted).status_code in (200, 202, 404)
                else:  # secure by default: no token configured, no access
                    assert _call(api, method, path, NEW).status_code == 401
            for method, path in OPEN:
                assert _call(api, method, path).status_code in (200, 503)
        finally:
            stack.stop()


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
def signing(moto_url, tiny_checkpoint, tmp_path_factory) -> Any:
    from tests.conftest import new_stack

    root = tmp_path_factory.mktemp("signed")
    stack = new_stack(moto_url, tiny_checkpoint, root, f"sig{secrets.token_hex(3)}-")
    stack.env["SAMSEG_ASSET_URL_SECRET"] = ASSET_SECRET
    _publish(stack.assets, "signed-job", 2, root)
    api = stack.start_api()
    yield api
    stack.stop()


def _mask(index: int) -> str:
    return f"/assets/signed-job/mask_images/mask_{index:03d}.png"


def test_a_valid_signature_is_served(signing):
    query = sign(_mask(0), ASSET_SECRET, 600, time.time())
    response = httpx.get(f"{signing}{_mask(0)}?{query}", timeout=10)
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
    assert httpx.get(signing + url, timeout=10).status_code == 403


def test_with_signed_urls_result_json_takes_the_api_token(signing):
    from tests.support import AUTH

    assert httpx.get(f"{signing}/assets/signed-job/result.json", timeout=10).status_code == 401
    assert httpx.get(f"{signing}/assets/signed-job/result.json", headers=AUTH, timeout=10).status_code == 200
