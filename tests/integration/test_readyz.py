"""`/readyz` follows SQS: 200 while reachable, 503 during an outage even after earlier successes, 200 again after.

The outage is real from the API's side: the API talks to moto through tests.support.TcpProxy, which refuses
connections (SQS stopped) or swallows every byte (network partition) and then restores them.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import httpx

from tests.support import VENV_BIN, TcpProxy


def _ready(api: str) -> httpx.Response:
    # The generous client timeout only keeps a hung API from hanging the test; the probe itself answers fast.
    return httpx.get(f"{api}/readyz", timeout=30)


def _wait_ready(api: str, timeout: float = 30) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while (response := _ready(api)).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    return response


def test_readyz_answers_503_while_sqs_is_unreachable_after_it_was_ready(make_stack, moto_url):
    moto = urlsplit(moto_url)
    assert moto.hostname and moto.port
    with TcpProxy(moto.hostname, moto.port) as proxy:
        stack = make_stack(AWS_ENDPOINT_URL_SQS=proxy.url, SAMSEG_READYZ_CACHE_SECONDS="0")  # every probe fresh
        assert stack.start("queues", str(VENV_BIN / "samseg"), "queues", "ensure").popen.wait(60) == 0
        api = stack.start_api()
        for _ in range(3):  # several successes first: the old check cached the queue URL after the first
            ok = _ready(api)
            assert ok.status_code == 200, ok.text
        assert ok.json()["checks"]["broker"]["ok"] is True
        seen = proxy.accepted

        for outage in ("refuse", "drop"):
            getattr(proxy, outage)()
            down = _ready(api)
            assert down.status_code == 503, (outage, down.text)
            checks = down.json()["checks"]
            assert checks["broker"]["ok"] is False, checks
            assert all(checks[name]["ok"] for name in ("blob_store", "job_store", "disk_free")), checks
            proxy.restore()
            back = _wait_ready(api)
            assert back.status_code == 200, (outage, back.text)

        assert proxy.accepted > seen  # the probe really went to SQS (through the proxy) on every request
