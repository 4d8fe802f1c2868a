"""samseg.transfer.callbacks: the PATCH callback against a real HTTP server on loopback, recorded (not real) sleeps."""

from __future__ import annotations

import base64
import os
import random
import secrets
import threading
import time
from http.server import ThreadingHTTPServer

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from samseg.core.backoff import backoff_delay
from samseg.core.contracts import BBox, CallbackBody, ErrorInfo, Point, Segment
from samseg.core.settings import Settings
from samseg.transfer.callbacks import (
    InsecureCallbackError,
    callback_url,
    check_callback_transport,
    send_callback,
    webhook_id_for,
)
from tests.support import LoopbackServer, Route, free_port

UUID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
PATH = f"/api/v1/re-imagine/auto-mask/{UUID}"
BASE, CAP, ATTEMPTS = 0.5, 2.0, 4


@pytest.fixture(autouse=True)
def hermetic(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.upper().startswith(("SAMSEG_", "AWS_")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env


@pytest.fixture(scope="module")
def _shared_server():
    # One server for the module: LoopbackServer.close() waits out serve_forever's 0.5 s poll.
    server = LoopbackServer()
    yield server
    server.close()


@pytest.fixture
def app_server(_shared_server):
    """The app server stand-in, reset for each test: 200 for everything unless a route says otherwise."""
    _shared_server.routes.clear()
    _shared_server.requests.clear()
    _shared_server.default = Route(status=200, body=b"{}", headers={"Content-Type": "application/json"})
    return _shared_server


def make_settings(url: str | None, **overrides) -> Settings:
    values = {
        "app_server_url": url,
        "callback_max_attempts": ATTEMPTS,
        "callback_backoff_seconds": BASE,
        "callback_backoff_max_seconds": CAP,
        "callback_timeout_seconds": 5.0,
        **overrides,
    }
    return Settings(_env_file=None, **values)


def completed_body() -> CallbackBody:
    return CallbackBody(
        uuid=UUID,
        status="completed",
        segments=[
            Segment(
                segment_id=0,
                mask_url=f"http://localhost:8000/assets/{UUID}/mask_images/mask_000.png",
                bbox=BBox(x=120, y=150, width=80, height=60),
                area=4321,
                stability_score=0.97,
                predicted_iou=0.91,
                center_point=Point(x=160, y=180),
            )
        ],
        image_width=640,
        image_height=480,
    )


class Sleeps(list):
    """Records what send_callback would have slept."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def header(recorded, name: str) -> str | None:
    lowered = {k.lower(): v for k, v in recorded.headers.items()}
    return lowered.get(name.lower())


def sequence(*routes: Route):
    """A route handler that answers with each route in turn (the last one repeats)."""
    queue = list(routes)

    def handler(_recorded):
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return handler


def assert_jitter_bounds(sleeps: list[float]) -> None:
    for k, delay in enumerate(sleeps):
        assert 0.0 <= delay <= min(CAP, BASE * 2**k), (k, delay, sleeps)


# --- success ------------------------------------------------------------------------------------------


def test_delivered_on_first_attempt(app_server):
    sleeps = Sleeps()
    body = completed_body()
    result = send_callback(body, make_settings(app_server.url, app_server_token="TOKEN"), sleep=sleeps)

    assert (result.delivered, result.attempts, result.http_status, result.error) == (True, 1, 200, None)
    assert sleeps == []
    assert len(app_server.requests) == 1
    request = app_server.requests[0]
    assert request.method == "PATCH"
    assert request.path == PATH
    assert header(request, "Authorization") == "Bearer TOKEN"
    assert header(request, "Content-Type") == "application/json"
    assert request.json() == body.model_dump(mode="json", exclude_none=True)
    # The wire form matches the contract's field names and nests.
    sent = request.json()
    assert sent["status"] == "completed"
    assert sent["segments"][0]["bbox"] == {"x": 120, "y": 150, "width": 80, "height": 60}
    assert sent["segments"][0]["center_point"] == {"x": 160, "y": 180}
    assert "error" not in sent


def test_failed_body_and_no_token(app_server):
    body = CallbackBody(uuid=UUID, status="failed", error=ErrorInfo(code="image_not_found", message="404"))
    result = send_callback(body, make_settings(app_server.url), sleep=Sleeps())
    assert result.delivered
    request = app_server.requests[0]
    assert header(request, "Authorization") is None
    assert request.json() == {
        "uuid": UUID,
        "status": "failed",
        "segments": [],
        "error": {"code": "image_not_found", "message": "404"},
    }


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_any_2xx_is_delivered(app_server, status):
    app_server.routes[PATH] = Route(status=status)
    result = send_callback(completed_body(), make_settings(app_server.url), sleep=Sleeps())
    assert (result.delivered, result.attempts, result.http_status) == (True, 1, status)


def test_trailing_slash_on_app_server_url(app_server):
    settings = make_settings(app_server.url + "/")
    assert callback_url(settings, UUID) == app_server.url + PATH
    send_callback(completed_body(), settings, sleep=Sleeps())
    assert app_server.requests[0].path == PATH


def test_no_app_server_configured_is_skipped():
    sleeps = Sleeps()
    result = send_callback(completed_body(), make_settings(None), sleep=sleeps)
    assert (result.delivered, result.attempts, result.http_status) == (False, 0, None)
    assert result.error == "no app server configured"
    assert sleeps == []
    assert callback_url(make_settings(None), UUID) is None


# --- retries ------------------------------------------------------------------------------------------


def test_transient_errors_then_success(app_server):
    app_server.routes[PATH] = sequence(Route(500), Route(503), Route(200, b"{}"))
    sleeps = Sleeps()
    result = send_callback(completed_body(), make_settings(app_server.url), sleep=sleeps)
    assert (result.delivered, result.attempts, result.http_status) == (True, 3, 200)
    assert len(app_server.requests) == 3
    # Every attempt carries the same body.
    assert len({r.body for r in app_server.requests}) == 1
    assert len(sleeps) == 2
    assert_jitter_bounds(sleeps)


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_retryable_statuses(app_server, status):
    app_server.routes[PATH] = sequence(Route(status), Route(200))
    result = send_callback(completed_body(), make_settings(app_server.url), sleep=Sleeps())
    assert (result.delivered, result.attempts) == (True, 2)
    assert len(app_server.requests) == 2


def test_429_with_retry_after_zero_is_retried_at_once(app_server):
    app_server.routes[PATH] = sequence(Route(429, headers={"Retry-After": "0"}), Route(200))
    sleeps = Sleeps()
    result = send_callback(completed_body(), make_settings(app_server.url), sleep=sleeps)
    assert (result.delivered, result.attempts) == (True, 2)
    assert sleeps == [0.0]


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [("1.5", 1.5), ("1", 1.0), ("120", CAP), ("-3", 0.0)],
)
def test_retry_after_is_honoured_and_capped(app_server, retry_after, expected):
    app_server.routes[PATH] = sequence(Route(503, headers={"Retry-After": retry_after}), Route(200))
    sleeps = Sleeps()
    assert send_callback(completed_body(), make_settings(app_server.url), sleep=sleeps).delivered
    assert sleeps == [expected]


def test_retry_after_http_date_falls_back_to_own_schedule(app_server):
    app_server.routes[PATH] = sequence(Route(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), Route(200))
    sleeps = Sleeps()
    assert send_callback(completed_body(), make_settings(app_server.url), sleep=sleeps).delivered
    assert len(sleeps) == 1
    assert_jitter_bounds(sleeps)


def test_retries_exhausted_on_persistent_5xx(app_server):
    app_server.routes[PATH] = Route(502, b"bad gateway")
    sleeps = Sleeps()
    result = send_callback(completed_body(), make_settings(app_server.url), sleep=sleeps)
    assert (result.delivered, result.attempts, result.http_status) == (False, ATTEMPTS, 502)
    assert result.error == "HTTP 502"
    assert len(app_server.requests) == ATTEMPTS
    assert len(sleeps) == ATTEMPTS - 1  # no sleep after the last attempt
    assert_jitter_bounds(sleeps)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 422])
def test_client_errors_are_not_retried(app_server, status):
    app_server.routes[PATH] = Route(status, b'{"detail": "nope"}')
    sleeps = Sleeps()
    result = send_callback(completed_body(), make_settings(app_server.url), sleep=sleeps)
    assert (result.delivered, result.attempts, result.http_status) == (False, 1, status)
    assert result.error == f"HTTP {status}"
    assert len(app_server.requests) == 1
    assert sleeps == []


def test_connection_refused_uses_every_attempt():
    port = free_port()  # nothing listens here
    sleeps = Sleeps()
    result = send_callback(completed_body(), make_settings(f"http://127.0.0.1:{port}"), sleep=sleeps)
    assert (result.delivered, result.attempts, result.http_status) == (False, ATTEMPTS, None)
    assert result.error and "ConnectError" in result.error
    assert len(sleeps) == ATTEMPTS - 1
    assert_jitter_bounds(sleeps)


def test_server_that_comes_back():
    # Refused twice, then a real server appears on the same port before the third attempt.
    port = free_port()
    sleeps = Sleeps()
    late: list[LoopbackServer] = []

    def sleep_then_start(seconds: float) -> None:
        sleeps(seconds)
        if len(sleeps) == 2:
            late.append(_server_on_port(port))

    try:
        result = send_callback(completed_body(), make_settings(f"http://127.0.0.1:{port}"), sleep=sleep_then_start)
        assert (result.delivered, result.attempts, result.http_status) == (True, 3, 200)
        assert [r.path for r in late[0].requests] == [PATH]
        assert_jitter_bounds(sleeps)
    finally:
        for server in late:
            server.close()


def _server_on_port(port: int) -> LoopbackServer:
    """A LoopbackServer bound to a chosen port (LoopbackServer itself always picks a free one)."""
    server = LoopbackServer()
    handler = server.server.RequestHandlerClass
    server.close()
    server.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.server.daemon_threads = True
    server.port, server.url = port, f"http://127.0.0.1:{port}"
    server.default = Route(200, b"{}")
    threading.Thread(target=server.server.serve_forever, daemon=True).start()
    return server


def test_slow_server_times_out_and_is_retried(app_server):
    calls = []

    def handler(_recorded):
        calls.append(1)
        return Route(200, delay=2.0) if len(calls) == 1 else Route(200)  # empty body: nothing to write late

    app_server.routes[PATH] = handler
    sleeps = Sleeps()
    result = send_callback(completed_body(), make_settings(app_server.url, callback_timeout_seconds=0.5), sleep=sleeps)
    assert (result.delivered, result.attempts) == (True, 2)
    assert len(sleeps) == 1


# --- backoff_delay ------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_an_exponential_cap():
    random.seed(20240611)
    settings = make_settings(None)
    for attempt in range(8):
        bound = min(CAP, BASE * 2**attempt)
        samples = [backoff_delay(attempt, settings) for _ in range(2000)]
        assert all(0.0 <= s <= bound for s in samples)
        # Spread over the whole interval, not a fixed delay.
        assert min(samples) < 0.05 * bound
        assert max(samples) > 0.95 * bound
        assert abs(sum(samples) / len(samples) - bound / 2) < 0.05 * bound


def test_zero_base_means_no_waiting():
    settings = make_settings(None, callback_backoff_seconds=0)
    assert {backoff_delay(k, settings) for k in range(6)} == {0.0}


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [("0", 0.0), ("0.25", 0.25), ("2", 2.0), ("3600", CAP), ("-1", 0.0), ("inf", CAP)],
)
def test_backoff_with_retry_after(retry_after, expected):
    assert backoff_delay(0, make_settings(None), retry_after) == expected


# --- Standard Webhooks signatures ---------------------------------------------------------------------

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class MovingClock:
    """Real time plus whatever the fake sleeps "waited", so each attempt signs at its own (later) second."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def sleep(self, seconds: float) -> None:
        self.offset += max(seconds, 1.0)  # at least a second: the timestamp header has second resolution


def test_every_attempt_is_signed_with_one_id_and_its_own_timestamp(app_server):
    """A 500 then a 200: both requests verify with the receiver's copy of the secret, same id, fresh signature."""
    app_server.routes[PATH] = sequence(Route(500, b"oops"), Route(200))
    clock = MovingClock()
    webhook_id = webhook_id_for(UUID, "3f2a9c01b7d4")
    settings = make_settings(app_server.url, webhook_secret=SECRET, app_server_token="TOKEN")
    result = send_callback(completed_body(), settings, webhook_id=webhook_id, sleep=clock.sleep, clock=clock)
    assert (result.delivered, result.attempts) == (True, 2)

    receiver = Webhook(SECRET)
    first, second = app_server.requests
    for request in (first, second):
        assert receiver.verify(request.body, request.headers) == completed_body().model_dump(
            mode="json", exclude_none=True
        )
        assert header(request, "webhook-id") == webhook_id
        assert header(request, "Authorization") == "Bearer TOKEN"  # the bearer token keeps working beside it
    assert int(header(second, "webhook-timestamp")) > int(header(first, "webhook-timestamp"))
    assert header(second, "webhook-signature") != header(first, "webhook-signature")
    assert header(first, "webhook-signature").startswith("v1,")


def test_a_tampered_body_or_another_secret_fails_verification(app_server):
    settings = make_settings(app_server.url, webhook_secret=SECRET)
    assert send_callback(completed_body(), settings, webhook_id=webhook_id_for(UUID, "r1"), sleep=Sleeps()).delivered
    (request,) = app_server.requests
    Webhook(SECRET).verify(request.body, request.headers)  # the untouched request passes ...
    tampered = request.body.replace(b'"area":4321', b'"area":4322')
    assert tampered != request.body
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(tampered, request.headers)
    other = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(request.body, request.headers)
    replayed_later = {**request.headers, "webhook-timestamp": str(int(time.time()) + 3600)}
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(request.body, replayed_later)


def test_two_runs_of_one_uuid_get_different_ids(app_server):
    settings = make_settings(app_server.url, webhook_secret=SECRET)
    for run_id in ("run-one", "run-two"):
        result = send_callback(completed_body(), settings, webhook_id=webhook_id_for(UUID, run_id), sleep=Sleeps())
        assert result.delivered
    ids = [header(r, "webhook-id") for r in app_server.requests]
    assert ids == [f"{UUID}.run-one", f"{UUID}.run-two"]
    for request in app_server.requests:
        Webhook(SECRET).verify(request.body, request.headers)


def test_without_an_id_one_call_still_shares_a_random_id_across_its_attempts(app_server):
    app_server.routes[PATH] = sequence(Route(503), Route(200))
    settings = make_settings(app_server.url, webhook_secret=SECRET)
    assert send_callback(completed_body(), settings, sleep=Sleeps()).attempts == 2
    ids = {header(r, "webhook-id") for r in app_server.requests}
    assert len(ids) == 1 and next(iter(ids)).startswith("msg_")


def test_no_secret_means_no_signature_headers(app_server):
    send_callback(completed_body(), make_settings(app_server.url), webhook_id=webhook_id_for(UUID, "r"), sleep=Sleeps())
    (request,) = app_server.requests
    assert [h for h in request.headers if h.lower().startswith("webhook-")] == []


@pytest.mark.parametrize(("uuid", "run_id"), [(UUID, ""), (UUID, "has space"), (UUID, "new\nline")])
def test_webhook_id_refuses_what_cannot_be_a_header(uuid, run_id):
    with pytest.raises(ValueError, match="webhook-id"):
        webhook_id_for(uuid, run_id)


# --- callback transport check -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["https://app.example.com", "http://127.0.0.1:3000", "http://localhost:3000", "http://[::1]:3000"]
)
def test_https_or_loopback_callback_urls_pass(url):
    settings = make_settings(url, webhook_secret=SECRET, require_https_callback=True)
    assert check_callback_transport(settings) == []


@pytest.mark.parametrize("url", ["http://app.example.com", "http://app:3000", "http://10.0.0.5"])
def test_plain_http_to_another_host_warns(url):
    (warning,) = check_callback_transport(make_settings(url, webhook_secret=SECRET, app_server_token="T"))
    assert "is not https" in warning and "bearer token" in warning
    assert "SAMSEG_REQUIRE_HTTPS_CALLBACK" in warning


def test_plain_http_to_another_host_is_a_start_up_error_when_https_is_required():
    settings = make_settings("http://app.example.com", webhook_secret=SECRET, require_https_callback=True)
    with pytest.raises(InsecureCallbackError, match="SAMSEG_REQUIRE_HTTPS_CALLBACK=true refuses to start"):
        check_callback_transport(settings)


def test_unset_app_server_url_warns():
    (warning,) = check_callback_transport(make_settings(None))
    assert "SAMSEG_APP_SERVER_URL is not set" in warning


def test_unsigned_callbacks_to_a_remote_host_warn():
    (warning,) = check_callback_transport(make_settings("https://app.example.com"))
    assert "SAMSEG_WEBHOOK_SECRET is not set" in warning
    assert check_callback_transport(make_settings("http://127.0.0.1:3000")) == []  # a local dev server: quiet
