"""Issue #15 (3a, 3b): the API's edges — a body cap that holds before the body is read, and a /readyz that
caches its checks briefly and shows backend names only to token holders. Real HTTP on loopback.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn

from samseg.api.limits import BodySizeLimit
from samseg.core.settings import Settings
from tests.faults_support import wait_until
from tests.support import API_TOKEN, AUTH, VENV_BIN, TcpProxy, free_port

CAP = 4096


@pytest.fixture
def api(tmp_path: Path) -> Iterator[str]:
    """samseg's API app (its real routes) behind BodySizeLimit, served by uvicorn on loopback."""
    from samseg.api import create_app

    env = {"SAMSEG_ASSETS_DIR": str(tmp_path / "assets"), "SAMSEG_API_TOKEN": API_TOKEN, "AWS_REGION": "us-east-1"}
    with mock.patch.dict("os.environ", env, clear=True):
        settings = Settings(api_max_body_bytes=CAP)
    app = create_app(settings)
    if not any(m.cls is BodySizeLimit for m in app.user_middleware):  # until the factory adds it itself
        app.add_middleware(BodySizeLimit, max_bytes=settings.api_max_body_bytes)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "uvicorn")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _raw(url: str, request: bytes) -> bytes:
    """Send `request` (headers, maybe part of a body) and read the answer's head."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_a_declared_body_over_the_cap_is_refused_before_it_is_read(api):
    # 10 MB declared, 10 bytes sent: an answer now proves nobody waited for (or read) the body.
    started = time.monotonic()
    head = b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
    answer = _raw(api, head + b'{"uuid": "')
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert time.monotonic() - started < 5


def test_a_streamed_body_is_cut_off_at_the_cap(api):
    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield b"x" * 1024  # 64 KiB in all, no Content-Length (chunked)

    response = httpx.post(f"{api}/jobs", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 413, response.text


def test_bodies_under_the_cap_reach_the_route(api):
    small = httpx.post(f"{api}/jobs", json={"uuid": "x"}, timeout=10)
    assert small.status_code == 401  # the token check, as before
    wrong = httpx.post(f"{api}/jobs", json={"uuid": "x", "image_url": 3}, headers=AUTH, timeout=10)
    assert wrong.status_code == 422


def test_readyz_is_cached_briefly_and_shows_details_only_to_token_holders(make_stack, moto_url):
    moto = urlsplit(moto_url)
    assert moto.hostname and moto.port
    with TcpProxy(moto.hostname, moto.port) as proxy:
        stack = make_stack(AWS_ENDPOINT_URL_SQS=proxy.url, SAMSEG_READYZ_CACHE_SECONDS="3")
        assert stack.start("queues", str(VENV_BIN / "samseg"), "queues", "ensure").popen.wait(60) == 0
        api = stack.start_api()
        wait_until(lambda: httpx.get(f"{api}/readyz", timeout=30).status_code == 200, 30, "ready")

        anonymous = httpx.get(f"{api}/readyz", timeout=30)
        insider = httpx.get(f"{api}/readyz", headers=AUTH, timeout=30)
        wrong = httpx.get(f"{api}/readyz", headers={"Authorization": "Bearer not-the-token-000000"}, timeout=30)
        assert anonymous.status_code == insider.status_code == wrong.status_code == 200
        assert stack.jobs_queue in insider.text and str(stack.assets) in insider.text  # names for the operator
        for public in (anonymous, wrong):
            assert public.json()["checks"] == {name: {"ok": True} for name in insider.json()["checks"]}
            assert stack.jobs_queue not in public.text and str(stack.assets) not in public.text

        # Cached: right after a fresh round, SQS goes away; the next probes get that round's 200 until it is
        # 3 s old, then a new round finds the outage.
        def new_round(after: float) -> dict | None:
            body = httpx.get(f"{api}/readyz", timeout=30).json()
            return body if body["checked_at"] > after else None

        last = httpx.get(f"{api}/readyz", timeout=30).json()["checked_at"]
        fresh = wait_until(lambda: new_round(last), 10, "a new round of checks")
        proxy.refuse()
        cached = httpx.get(f"{api}/readyz", timeout=30)
        assert cached.status_code == 200 and cached.json()["checked_at"] == fresh["checked_at"], cached.text
        down = wait_until(lambda: (r := httpx.get(f"{api}/readyz", timeout=30)).status_code == 503 and r, 20, "503")
        assert down.json()["checked_at"] >= fresh["checked_at"] + 3
        assert down.json()["checks"]["broker"] == {"ok": False}  # no error text (endpoint, port) for anonymous
        assert "detail" in httpx.get(f"{api}/readyz", headers=AUTH, timeout=30).json()["checks"]["broker"]
        proxy.restore()
