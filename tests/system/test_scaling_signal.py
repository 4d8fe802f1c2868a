"""The scaling signal (samseg/ops/scaling_signal.py): backlog per queue on the API's /metrics, and each task
message's wait in SQS on the workers' /metrics. Real stack: moto server, workers, uvicorn, loopback servers."""

from __future__ import annotations

import json
import re
import time

import httpx

from samseg.ops.scaling_signal import message_wait
from tests.faults_support import is_callback, wait_until
from tests.support import AUTH, free_port


class _Message:
    def __init__(self, delivery_info):
        self.delivery_info = delivery_info


def test_message_wait_reads_sent_timestamp_and_queue():
    now = 1_700_000_100.0
    message = _Message({"routing_key": "samseg-gpu", "sqs_message": {"Attributes": {"SentTimestamp": "1700000040000"}}})
    assert message_wait(message, now) == ("samseg-gpu", 60.0)
    assert message_wait(_Message({"routing_key": "samseg-gpu", "sqs_message": {"Attributes": {}}}), now) is None
    assert message_wait(None, now) is None


def _sample(text: str, name: str, queue: str) -> float | None:
    match = re.search(rf'^{name}\{{[^}}]*queue="{re.escape(queue)}"[^}}]*\}} (\S+)$', text, flags=re.MULTILINE)
    return float(match.group(1)) if match else None


def test_workers_report_queue_wait_and_the_api_reports_backlog(make_stack, images, app_server):
    stack = make_stack(SAMSEG_APP_SERVER_URL=app_server.url, SAMSEG_QUEUE_DEPTH_INTERVAL_SECONDS="1")
    prefix = stack.env["SAMSEG_QUEUE_PREFIX"]
    port = free_port()
    stack.start_worker("-Q", f"{stack.jobs_queue},{prefix}io", "-c", "2", name="io")
    stack.start_worker("-Q", f"{prefix}gpu", "--pool", "solo", name="gpu", env={"SAMSEG_METRICS_PORT": str(port)})
    api = stack.start_api()
    stack.send_raw(json.dumps({"uuid": "signal-0", "image_url": f"{images.url}/ok.png"}))
    app_server.wait_for(is_callback("signal-0"), timeout=180)

    worker_metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert _sample(worker_metrics, "samseg_queue_wait_seconds_count", f"{prefix}gpu") == 1
    last_wait = _sample(worker_metrics, "samseg_queue_last_wait_seconds", f"{prefix}gpu")
    assert last_wait is not None and 0 <= last_wait < 60

    def backlog() -> float | None:
        text = httpx.get(f"{api}/metrics", headers=AUTH, timeout=10).text
        return _sample(text, "samseg_queue_backlog", f"{prefix}gpu")

    assert wait_until(lambda: backlog() == 0, 30, "a gpu backlog sample of 0 after the job") is True
    # Two messages on the gpu queue, no gpu worker to take them: backlog 2 (visible + in flight).
    stack.procs[1].stop()
    for n in (1, 2):
        stack.send_raw(json.dumps({"uuid": f"signal-{n}", "image_url": f"{images.url}/ok.png"}))
    started = time.monotonic()
    wait_until(lambda: backlog() == 2, 60, "a gpu backlog of 2")
    assert time.monotonic() - started < 60
