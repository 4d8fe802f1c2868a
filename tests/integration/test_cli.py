"""The `samseg` command as a user runs it: segment one file, submit a job, and `samseg up` end to end.

Real processes throughout; the SAM-2 weights are random (Meta's cannot be downloaded here).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import httpx
import numpy as np
from PIL import Image

from tests.support import VENV_BIN, Proc, Route, free_port, scene_png, wait_http

CALLBACK = "/api/v1/re-imagine/auto-mask/"


def _run(env, *args, timeout=180):
    return subprocess.run(
        [str(VENV_BIN / "samseg"), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_segment_one_file_writes_the_same_outputs_as_a_job(make_stack, tmp_path):
    stack = make_stack()
    image = tmp_path / "scene.png"
    image.write_bytes(scene_png(120, 80))
    out = tmp_path / "out"
    result = _run(stack.env, "segment", str(image), "--out", str(out))
    assert result.returncode == 0, result.stderr
    body = json.loads((out / "result.json").read_text())
    assert body["status"] == "completed" and body["segments"]
    for seg in body["segments"]:
        png = out / "mask_images" / f"mask_{seg['segment_id']:03d}.png"
        assert seg["mask_url"] == png.resolve().as_uri()
        mask = np.asarray(Image.open(png).convert("L")) > 0
        assert mask.shape == (80, 120) and int(mask.sum()) == seg["area"]


def test_segment_loads_no_torchvision_dynamo_or_triton(make_stack, tmp_path):
    """Issue #18: `samseg segment` pays its imports on every run. torchvision (used only for its transforms and
    NMS, done in torch here) would load torch._dynamo, sympy and triton: ~1.7 s of a 2-core start-up."""
    stack = make_stack(SAMSEG_AMG_PRED_IOU_THRESH="0", SAMSEG_AMG_STABILITY_SCORE_THRESH="0")  # masks to write
    image = tmp_path / "scene.png"
    image.write_bytes(scene_png(120, 80))
    loaded = tmp_path / "modules.json"
    probe = (
        "import atexit, json, sys\n"
        f"atexit.register(lambda: open({str(loaded)!r}, 'w').write(json.dumps(sorted(sys.modules))))\n"
        "from samseg.cli import main\n"
        "sys.exit(main())\n"
    )
    argv = [str(VENV_BIN / "python"), "-c", probe, "segment", str(image), "--out", str(tmp_path / "out")]
    result = subprocess.run(argv, env=stack.env, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "result.json").read_text())["segments"]
    modules = json.loads(loaded.read_text())
    assert "sam2" in modules and "torch" in modules  # the probe saw the run's modules
    heavy = [m for m in modules if m.split(".")[0] in {"torchvision", "triton", "sympy"} or m == "torch._dynamo"]
    assert heavy == []


def test_segment_reports_bad_input_clearly(make_stack, tmp_path):
    stack = make_stack()
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"definitely not an image")
    result = _run(stack.env, "segment", str(junk), "--out", str(tmp_path / "o"))
    assert result.returncode == 1
    assert "image_invalid" in result.stderr and "Traceback" not in result.stderr
    result = _run(stack.env, "segment", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o"))
    assert result.returncode == 1 and "image_not_found" in result.stderr


def test_submit_puts_plain_json_on_the_jobs_queue(make_stack):
    stack = make_stack()
    ensured = _run(stack.env, "queues", "ensure")
    assert ensured.returncode == 0, ensured.stderr
    assert f"{stack.jobs_queue}-dlq" in ensured.stdout
    result = _run(stack.env, "submit", "--uuid", "cli-1", "--image-url", "https://example.com/a.jpg")
    assert result.returncode == 0, result.stderr
    sqs = stack.sqs()
    url = sqs.get_queue_url(QueueName=stack.jobs_queue)["QueueUrl"]
    messages = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2)["Messages"]
    assert json.loads(messages[0]["Body"]) == {"uuid": "cli-1", "image_url": "https://example.com/a.jpg"}


def test_weights_ensure_refuses_a_missing_custom_checkpoint(make_stack, tmp_path):
    stack = make_stack(SAMSEG_SAM2_CHECKPOINT=str(tmp_path / "nope.pt"))
    result = _run(stack.env, "weights", "ensure")
    assert result.returncode == 1 and "nope.pt does not exist" in result.stderr


def test_samseg_up_runs_the_whole_stack_and_stops_cleanly(make_stack, http_server, app_server, tmp_path):
    """`samseg up` starts its own moto SQS, workers, beat and the API; Ctrl-C stops every child."""
    http_server.routes["/scene.png"] = Route(body=scene_png())
    stack = make_stack(SAMSEG_APP_SERVER_URL=app_server.url)
    env = {k: v for k, v in stack.env.items() if not k.startswith("AWS_")}  # no endpoint: up brings its own
    env.pop("SAMSEG_PUBLIC_BASE_URL", None)
    env.pop("SAMSEG_API_TOKEN", None)  # up generates one for its session
    env["SAMSEG_LOCAL_SQS_PORT"] = "0"  # a free port: test runs side by side must not meet on the fixed one
    port = free_port()
    up = Proc("up", [str(VENV_BIN / "samseg"), "up", "--port", str(port)], env, tmp_path)
    try:
        up.wait_for_output("samseg is up", 120)
        api = f"http://localhost:{port}"
        wait_http(api + "/healthz", 60)
        assert f"API {api}" in up.output() and "samseg submit" in up.output()
        # A token of its own for the session, printed once (an export line); the curl examples read it from there.
        assert "API token: generated for this session" in up.output()
        (token,) = re.findall(r"export SAMSEG_API_TOKEN=(\S+)", up.output())
        assert len(token) >= 32 and up.output().count(token) == 1
        assert f'curl -H "Authorization: Bearer $SAMSEG_API_TOKEN" {api}/jobs/demo-1' in up.output()
        auth = {"Authorization": f"Bearer {token}"}
        pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", up.output())]
        assert len(pids) == 5  # sqs, io worker, segment worker, beat, api

        up.wait_for_output('"worker_ready"', 120)
        accepted = httpx.post(
            f"{api}/jobs", json={"uuid": "up-1", "image_url": f"{http_server.url}/scene.png"}, headers=auth
        )
        assert accepted.status_code == 202
        (patch,) = app_server.wait_for(lambda r: r.path == CALLBACK + "up-1", timeout=180)
        body = patch.json()
        assert body["status"] == "completed"
        first = httpx.get(body["segments"][0]["mask_url"], timeout=10)
        assert first.status_code == 200 and first.content.startswith(b"\x89PNG")
        # Each worker serves its own /metrics on the port the banner names (no shared metrics directory).
        io_metrics = re.search(r"worker-io (http://127\.0\.0\.1:\d+/metrics)", up.output())
        assert io_metrics, up.output()[-3000:]
        deadline = time.monotonic() + 30
        while 'samseg_jobs_total{outcome="completed"} 1.0' not in (text := httpx.get(io_metrics[1], timeout=10).text):
            assert time.monotonic() < deadline, text
            time.sleep(0.2)

        up.popen.send_signal(signal.SIGINT)
        assert up.popen.wait(60) == 0
        time.sleep(0.5)
        alive = [pid for pid in pids if _alive(pid)]
        assert not alive, f"children left running: {alive}\n{up.output()[-3000:]}"
    finally:
        up.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie we are not the parent of is reaped by init; treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_segmenting_worker_refuses_to_start_without_its_checkpoint(make_stack, tmp_path):
    """A worker that consumes the gpu queue ensures its weights before consuming; missing → it exits, saying so.

    (A checkpoint path set by hand is never downloaded; Meta's download itself is tested in test_weights.py.)
    An I/O-only worker needs no model and starts regardless.
    """
    stack = make_stack(SAMSEG_SAM2_CHECKPOINT=str(tmp_path / "missing.pt"))
    gpu = stack.start(
        "gpu-worker", str(VENV_BIN / "celery"), "-A", "samseg", "worker", "-Q", stack.env["SAMSEG_QUEUE_PREFIX"] + "gpu"
    )
    assert gpu.popen.wait(120) != 0
    assert '"weights_unavailable"' in gpu.output() and "missing.pt does not exist" in gpu.output()
    io = stack.start_worker("-Q", f"{stack.jobs_queue},{stack.env['SAMSEG_QUEUE_PREFIX']}io", name="io")
    assert io.popen.poll() is None and '"weights_unavailable"' not in io.output()
