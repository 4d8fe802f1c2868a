"""samseg.core.logs: URL redaction and the secret redactor (the real logging set-up in a fresh interpreter is
tests/integration/test_logs_subprocess.py)."""

from __future__ import annotations

import json

import pytest

from samseg.core.logs import REDACTED, SecretRedactor, redact_text, redact_url

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
