"""`samseg up` as a newcomer drives it from outside: started with their own token and a fixed SQS port, used
from "another shell" with only what the banner printed, and stopped with Ctrl-C.

Real processes: `samseg up` with its own moto server, both workers (the model warmed at start, as by
default), beat and the API. The SAM-2 weights are random (Meta's cannot be downloaded here).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time

import boto3
import httpx

from tests.support import API_TOKEN, AUTH, VENV_BIN, Proc, Route, free_port, scene_png


def test_up_says_up_when_a_job_would_be_taken_and_tells_an_outside_client_how(make_stack, http_server, tmp_path):
    http_server.routes["/scene.png"] = Route(body=scene_png())
    stack = make_stack(SAMSEG_PRELOAD_MODEL="true")  # the default: "up" must wait for the warm model
    env = {k: v for k, v in stack.env.items() if not k.startswith("AWS_")}  # no endpoint: up brings its own
    env.pop("SAMSEG_PUBLIC_BASE_URL", None)
    sqs_port = free_port()
    env["SAMSEG_LOCAL_SQS_PORT"] = str(sqs_port)
    port = free_port()
    up = Proc("up", [str(VENV_BIN / "samseg"), "up", "--port", str(port)], env, tmp_path)
    try:
        up.wait_for_output("samseg is up", 240)
        seen_at = time.time()  # at most one output poll after the banner
        # Printed only once both workers consume (heartbeats) and the model is warm (marker written when the
        # warm-up ended, before the banner); /readyz too, which stays ready.
        state = stack.assets / ".samseg"
        assert (state / "worker-io.heartbeat").is_file() and (state / "worker-segment.heartbeat").is_file()
        warmed = json.loads((state / "worker-segment.heartbeat.ready").read_text())
        assert warmed["time"] <= seen_at
        banner = up.output().split("samseg is up", 1)[1]
        api = f"http://localhost:{port}"
        assert httpx.get(f"{api}/readyz", timeout=10).status_code == 200

        # The user's own token: used, never printed.
        assert API_TOKEN not in up.output()
        assert "API token: using SAMSEG_API_TOKEN from the environment" in banner

        # The SQS endpoint is the configured port, and the banner's export line is all an outside client needs.
        (exports,) = re.findall(r"export (AWS_ENDPOINT_URL_SQS=\S+ .*)", banner)
        outside = dict(item.split("=", 1) for item in exports.split())
        assert outside == {
            "AWS_ENDPOINT_URL_SQS": f"http://127.0.0.1:{sqs_port}",
            "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "samseg-local",
            "AWS_SECRET_ACCESS_KEY": "samseg-local",
        }
        sqs = boto3.client(
            "sqs",
            endpoint_url=outside["AWS_ENDPOINT_URL_SQS"],
            region_name=outside["AWS_REGION"],
            aws_access_key_id=outside["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=outside["AWS_SECRET_ACCESS_KEY"],
        )
        assert sqs.get_queue_url(QueueName=stack.jobs_queue)["QueueUrl"]
        shell = {**env, **outside}
        submitted = subprocess.run(
            [str(VENV_BIN / "samseg"), "submit", "--uuid", "newcomer-1", "--image-url", f"{http_server.url}/scene.png"],
            env=shell,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert submitted.returncode == 0, submitted.stderr
        deadline = time.monotonic() + 180
        while (status := httpx.get(f"{api}/jobs/newcomer-1", headers=AUTH, timeout=10).json()).get(
            "status"
        ) != "completed":
            assert time.monotonic() < deadline and status.get("status") != "failed", status
            time.sleep(0.5)

        # Ctrl-C: the workers stop before the local SQS, so none of them fails a poll on the way out.
        stopping_at = len(up.output())
        up.popen.send_signal(signal.SIGINT)
        assert up.popen.wait(90) == 0
        after = up.output()[stopping_at:]
        assert "sqs_poll_failed" not in after and "Traceback" not in after, after[-3000:]
    finally:
        up.stop()


def test_up_refuses_a_taken_sqs_port_before_starting_anything(make_stack, tmp_path):
    stack = make_stack()
    env = {k: v for k, v in stack.env.items() if not k.startswith("AWS_")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env["SAMSEG_LOCAL_SQS_PORT"] = str(port)
        result = subprocess.run(
            [str(VENV_BIN / "samseg"), "up", "--port", str(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 1
    assert f"port {port} of the local SQS emulator is taken" in result.stderr
    assert "SAMSEG_LOCAL_SQS_PORT" in result.stderr and "Traceback" not in result.stderr
    assert "started" not in result.stdout
