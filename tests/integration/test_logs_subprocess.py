"""samseg.core.logs on the real logging set-up in a fresh interpreter, configured from the environment as the
worker and API are (the redaction rules themselves are tests/unit/test_logs.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from samseg.core.logs import REDACTED
from tests.support import REPO
from tests.unit.test_logs import API_TOKEN, APP_TOKEN, PRESIGNED, WEBHOOK


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
