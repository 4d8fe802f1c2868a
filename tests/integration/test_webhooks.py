"""Signed callbacks end to end, and no secret in the worker's log.

Real: moto's SQS server (AWS stand-in), `celery -A samseg worker`, SAM-2's model code with random weights
(Meta's cannot be downloaded here), a loopback image host and a loopback app server that verifies every
callback with the `standardwebhooks` package and its own copy of the secret, as an app server would.
"""

from __future__ import annotations

import base64
import json
import secrets

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from tests.support import Recorded, Route, scene_png

CALLBACK_PREFIX = "/api/v1/re-imagine/auto-mask/"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
APP_TOKEN = "app-token-" + secrets.token_urlsafe(16)
API_TOKEN = "api-token-" + secrets.token_urlsafe(16)
PRESIGNED_QUERY = "X-Amz-Credential=AKIAFAKECREDENTIAL&X-Amz-Signature=" + "de" * 32


def _header(request: Recorded, name: str) -> str:
    return {k.lower(): v for k, v in request.headers.items()}[name.lower()]


def _callbacks(app_server, uuid: str, count: int) -> list[Recorded]:
    return app_server.wait_for(lambda r: r.method == "PATCH" and r.path == CALLBACK_PREFIX + uuid, 240, count)


def test_every_callback_verifies_and_retries_keep_their_id(make_stack, http_server, app_server):
    http_server.routes["/img/scene.png"] = Route(body=scene_png(96, 64), headers={"Content-Type": "image/png"})
    presigned = f"{http_server.url}/img/scene.png?{PRESIGNED_QUERY}"
    answers = {"wh-retry": [Route(500, b"try again"), Route(200, b"{}")]}

    def app_route(recorded: Recorded) -> Route:
        queue = answers.get(recorded.path.removeprefix(CALLBACK_PREFIX), [])
        return queue.pop(0) if queue else Route(200, b"{}")

    for uuid in ("wh-retry", "wh-rerun"):
        app_server.routes[CALLBACK_PREFIX + uuid] = app_route
    stack = make_stack(
        SAMSEG_APP_SERVER_URL=app_server.url,
        SAMSEG_APP_SERVER_TOKEN=APP_TOKEN,
        SAMSEG_WEBHOOK_SECRET=WEBHOOK_SECRET,
        SAMSEG_API_TOKEN=API_TOKEN,
    )
    worker = stack.start_worker()
    receiver = Webhook(WEBHOOK_SECRET)

    # 1. The app server answers 500 once: the retry carries the same webhook-id and a valid signature.
    stack.send_raw(json.dumps({"uuid": "wh-retry", "image_url": presigned}))
    first, retry = _callbacks(app_server, "wh-retry", 2)
    for request in (first, retry):
        body = receiver.verify(request.body, request.headers)
        assert body["uuid"] == "wh-retry" and body["status"] == "completed"
        assert _header(request, "Authorization") == f"Bearer {APP_TOKEN}"
    assert _header(first, "webhook-id") == _header(retry, "webhook-id")
    assert int(_header(retry, "webhook-timestamp")) >= int(_header(first, "webhook-timestamp"))

    # 2. A failed uuid run again is a new run: a new webhook-id.
    stack.send_raw(json.dumps({"uuid": "wh-rerun", "image_url": f"{http_server.url}/img/missing.png"}))
    (failed,) = _callbacks(app_server, "wh-rerun", 1)
    assert receiver.verify(failed.body, failed.headers)["status"] == "failed"
    stack.send_raw(json.dumps({"uuid": "wh-rerun", "image_url": presigned}))
    _, rerun = _callbacks(app_server, "wh-rerun", 2)
    assert receiver.verify(rerun.body, rerun.headers)["status"] == "completed"
    assert _header(rerun, "webhook-id") != _header(failed, "webhook-id")
    assert len({_header(r, "webhook-id") for r in (first, failed, rerun)}) == 3

    # 3. A tampered body fails the receiver's check.
    tampered = retry.body.replace(b'"status":"completed"', b'"status":"failed"')
    assert tampered != retry.body
    with pytest.raises(WebhookVerificationError):
        receiver.verify(tampered, retry.headers)

    # 4. The worker's log names the image but holds no secret and no presigned query string.
    log = worker.output()
    assert "/img/scene.png" in log  # the URL was logged, without its query
    for secret in (WEBHOOK_SECRET, WEBHOOK_SECRET.removeprefix("whsec_"), APP_TOKEN, API_TOKEN):
        assert secret not in log
    assert "AKIAFAKECREDENTIAL" not in log and "de" * 32 not in log
