"""samseg.core.logs: URL redaction and the secret redactor, on the real logging set-up in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from samseg.core.logs import REDACTED, SecretRedactor, redact_text, redact_url
from tests.support import REPO

API_TOKEN = "api-token-" + "a" * 24
WEBHOOK = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
APP_TOKEN = "app-server-token-value"
PRESIGNED = "https://bucket.s3.amazonaws.com/u/1.jpg?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=cafef00d"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (PRESIGNED, "https://bucket.s3.amazonaws.com/u/1.jpg"),
        ("https://user:pw@host.example:8443/a/b.png?x=1#frag", "https://host.example:8443/a/b.png"),
        ("http://[2001:db8::1]:8080/x?q", "http://[2001:db8::1]:8080/x"),
        ("http://host.example", "http://host.example"),
        ("HTTP://Host.Example/P?q", "http://host.example/P"),
        ("http://host:99999/x?secret", "<unparsable URL>"),
        ("/relative/path?q=1", "/relative/path"),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_redact_text_handles_urls_inside_raw_bodies_and_signed_paths():
    raw = json.dumps({"uuid": "u-1", "image_url": PRESIGNED})[:300]
    assert json.loads(redact_text(raw)) == {"uuid": "u-1", "image_url": "https://bucket.s3.amazonaws.com/u/1.jpg"}
    truncated = raw[: raw.index("X-Amz-Signature") + 20]  # a dead-letter body cut at 300 characters
    assert "cafe" not in redact_text(truncated) and "AKIAEXAMPLE" not in redact_text(truncated)
    access = '127.0.0.1:5000 - "GET /assets/u-1/mask_images/mask_000.png?expires=1800000600&signature=Zm9v HTTP/1.1"'
    assert redact_text(access).endswith(f'?expires=1800000600&signature={REDACTED} HTTP/1.1"')
    assert redact_text("nothing to see") == "nothing to see"


def test_redactor_replaces_secrets_anywhere_in_the_event():
    redactor = SecretRedactor([API_TOKEN, WEBHOOK, WEBHOOK.removeprefix("whsec_"), "short"])
    event = {
        "event": f"token {API_TOKEN} and {WEBHOOK}",
        "nested": {"list": [APP_TOKEN, {"deep": API_TOKEN}], "tuple": (API_TOKEN,)},
        "number": 3,
        "flag": True,
        "object": ValueError(f"failed with {API_TOKEN}"),
        "plain_object": ValueError("nothing secret"),
        "short": "short stays: too short to search for",
    }
    out = redactor(None, "info", dict(event))
    text = repr(out)
    assert API_TOKEN not in text and WEBHOOK not in text and "MfKQ9r8G" not in text
    assert out["event"] == f"token {REDACTED} and {REDACTED}"
    assert out["nested"]["tuple"] == (REDACTED,)
    assert (out["number"], out["flag"]) == (3, True)
    assert out["plain_object"] is event["plain_object"]  # untouched objects render as before
    assert out["short"] == event["short"]


def test_worker_style_logging_leaks_no_secret(tmp_path):
    """A fresh interpreter configured from the environment, as the worker and API are, logs secrets and URLs
    through structlog, the stdlib (as Celery and kombu do) and an exception: none of them reach stderr."""
    script = f"""
import logging, structlog
from samseg.core.logs import configure_logging
configure_logging("INFO", json=True)
log = structlog.get_logger("t")
log.info("job_accepted", image_url={PRESIGNED!r}, header="Bearer {API_TOKEN}")
log.warning("callback_retry", error="sent {APP_TOKEN} to http://app.example/cb?token={APP_TOKEN}")
logging.getLogger("celery").info("received %s", {PRESIGNED!r})
try:
    raise RuntimeError("signing with {WEBHOOK}")
except RuntimeError:
    log.exception("crashed")
log.info("done", ok=True)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAMSEG_", "AWS_"))}
    env |= {
        "PYTHONPATH": str(REPO),
        "SAMSEG_API_TOKEN": f"{API_TOKEN},other-token-{'b' * 20}",
        "SAMSEG_WEBHOOK_SECRET": WEBHOOK,
        "SAMSEG_APP_SERVER_TOKEN": APP_TOKEN,
    }
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [line["event"] for line in lines][-1] == "done" and len(lines) == 5, result.stderr
    for secret in (API_TOKEN, WEBHOOK, "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", APP_TOKEN, "AKIAEXAMPLE", "cafef00d"):
        assert secret not in result.stderr
    assert lines[0]["image_url"] == "https://bucket.s3.amazonaws.com/u/1.jpg"
    assert lines[0]["header"] == f"Bearer {REDACTED}"
    assert "received https://bucket.s3.amazonaws.com/u/1.jpg" in lines[2]["event"]
    assert "RuntimeError: signing with [redacted]" in lines[3]["exception"]
