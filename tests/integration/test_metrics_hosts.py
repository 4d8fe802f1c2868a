"""Metrics without a shared volume: every worker serves its own /metrics, the API its own plus queue depth.

Hosts are simulated by SAMSEG_METRICS_DIR: processes given different directories share nothing (as on two
machines); processes given the same one are on one host and must neither mix nor wipe each other's samples.
Everything is real: moto, Celery workers (threads and prefork pools), uvicorn, the callback server.
"""

from __future__ import annotations

import json
import os
import re
from urllib.parse import urlsplit

import httpx

from tests.faults_support import is_callback, wait_until
from tests.support import AUTH, VENV_BIN, Proc, TcpProxy, free_port


def _sample(text: str, name: str, **labels: str) -> float | None:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(label_text) + r"\}" if labels else "") + r" ([0-9.e+-]+)$"
    match = re.search(pattern, text, flags=re.MULTILINE)
    return float(match.group(1)) if match else None


def _scrape(url: str, timeout: float = 10) -> str:
    response = httpx.get(url, headers=AUTH, timeout=timeout)  # the API wants its token; workers ignore it
    assert response.status_code == 200, response.text
    return response.text


def _scrape_until(url: str, predicate, what: str, timeout: float = 30) -> str:
    """Scrape until the text satisfies predicate (a positive wait), and return that text."""
    found: list[str] = []

    def attempt() -> bool:
        text = _scrape(url)
        found[:] = [text]
        return bool(predicate(text))

    wait_until(attempt, timeout, what)
    return found[0]


def _pidns() -> str:
    return os.readlink("/proc/self/ns/pid").partition("[")[2].rstrip("]")


def _start(stack, name: str, argv: list[str], ready: str | None = "worker_ready", **env: str) -> Proc:
    """Like Stack.start, with per-process environment (another "host")."""
    proc = Proc(name, argv, {**stack.env, **env}, stack.log_dir)
    stack.procs.append(proc)
    if ready:
        proc.wait_for_output(ready, 90)
    return proc


def _worker(stack, name: str, queues: str, *pool: str, **env: str) -> Proc:
    argv = [str(VENV_BIN / "celery"), "-A", "samseg", "worker", "--loglevel", "INFO", "-n", f"{name}@%h", "-Q", queues]
    return _start(stack, name, [*argv, *pool], **env)


def test_each_worker_serves_its_own_samples_and_the_api_serves_queue_depth(make_stack, images, app_server, tmp_path):
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    stack = make_stack(
        SAMSEG_APP_SERVER_URL=app_server.url,
        SAMSEG_METRICS_DIR=str(host_a),
        SAMSEG_QUEUE_DEPTH_INTERVAL_SECONDS="1",
    )
    prefix = stack.env["SAMSEG_QUEUE_PREFIX"]
    api = stack.start_api()
    io_port, seg_port = free_port(), free_port()
    io = _worker(stack, "io", f"{stack.jobs_queue},{prefix}io", "--pool", "threads", "-c", "2",
                 SAMSEG_METRICS_PORT=str(io_port))  # fmt: skip
    seg = _worker(stack, "seg", f"{prefix}gpu", "-c", "1",  # prefork: samples are written by the pool child
                  SAMSEG_METRICS_DIR=str(host_b), SAMSEG_METRICS_PORT=str(seg_port))  # fmt: skip
    api_proc = next(p for p in stack.procs if p.name == "api")

    # One directory per process tree, named by its root pid, in its host's directory; none in the assets.
    ns = _pidns()
    assert {p.name for p in (host_a / ns).iterdir()} == {str(api_proc.popen.pid), str(io.popen.pid)}
    assert {p.name for p in (host_b / ns).iterdir()} == {str(seg.popen.pid)}
    assert not (stack.assets / ".samseg" / "metrics").exists()

    stack.send_raw(json.dumps({"uuid": "hosts-1", "image_url": f"{images.url}/ok.png"}))
    (patch,) = app_server.wait_for(is_callback("hosts-1"), timeout=180)
    masks = len(patch.json()["segments"])

    io_url, seg_url = f"http://127.0.0.1:{io_port}/metrics", f"http://127.0.0.1:{seg_port}/metrics"
    # notify's own duration is recorded by task_postrun just after the callback was answered.
    io_text = _scrape_until(
        io_url, lambda t: _sample(t, "samseg_stage_duration_seconds_count", stage="notify"), "notify on the io worker"
    )
    seg_text = _scrape(seg_url)
    assert _sample(io_text, "samseg_jobs_total", outcome="completed") == 1
    assert _sample(io_text, "samseg_callbacks_total", result="delivered") == 1
    assert _sample(io_text, "samseg_masks_per_job_sum") == masks
    for stage in ("download", "persist", "notify"):
        assert _sample(io_text, "samseg_stage_duration_seconds_count", stage=stage) == 1, stage
        assert _sample(seg_text, "samseg_stage_duration_seconds_count", stage=stage) is None, stage
    assert _sample(seg_text, "samseg_stage_duration_seconds_count", stage="segment") == 1
    assert _sample(io_text, "samseg_stage_duration_seconds_count", stage="segment") is None

    # The API: its own tree (no worker samples, there is no shared directory) plus queue depth and free disk.
    names = (stack.jobs_queue, f"{stack.jobs_queue}-dlq", f"{prefix}io", f"{prefix}gpu")
    api_text = _scrape_until(
        f"{api}/metrics", lambda t: all(f'queue="{n}"' in t for n in names), "queue depth of every queue on the API"
    )
    assert _sample(api_text, "samseg_jobs_total", outcome="completed") is None
    assert (_sample(api_text, "samseg_assets_free_bytes") or 0) > 0
    assert "samseg_assets_bytes" not in api_text  # no walk of the assets tree


def test_a_restarted_worker_removes_only_its_dead_predecessors_directory(make_stack, tmp_path):
    base = tmp_path / "host"
    stack = make_stack(SAMSEG_METRICS_DIR=str(base))
    queues = f"{stack.jobs_queue},{stack.env['SAMSEG_QUEUE_PREFIX']}io"
    ns_dir = base / _pidns()
    foreign = base / "4026599999" / "1"  # another PID namespace (a container sharing the directory): left alone
    foreign.mkdir(parents=True)
    (foreign / "counter_1.db").write_bytes(b"x")
    api = stack.start_api()
    api_pid = str(next(p for p in stack.procs if p.name == "api").popen.pid)

    first = _worker(stack, "first", queues, "--pool", "threads")
    assert (ns_dir / str(first.popen.pid)).is_dir()
    first.kill()  # SIGKILL: no clean-up of its own
    first.popen.wait(10)
    assert (ns_dir / str(first.popen.pid)).is_dir()

    second = _worker(stack, "second", queues, "--pool", "threads")
    assert {p.name for p in ns_dir.iterdir()} == {api_pid, str(second.popen.pid)}
    assert (foreign / "counter_1.db").exists()
    assert httpx.get(f"{api}/metrics", headers=AUTH, timeout=10).status_code == 200  # the API's directory still works
    second.stop()  # a clean stop removes the tree's directory
    assert {p.name for p in ns_dir.iterdir()} == {api_pid}


def test_scrapes_never_wait_for_sqs_and_depth_is_refreshed_in_the_background(make_stack, moto_url):
    moto = urlsplit(moto_url)
    assert moto.hostname and moto.port
    with TcpProxy(moto.hostname, moto.port) as proxy:
        stack = make_stack(AWS_ENDPOINT_URL_SQS=proxy.url, SAMSEG_QUEUE_DEPTH_INTERVAL_SECONDS="1")
        assert stack.start("queues", str(VENV_BIN / "samseg"), "queues", "ensure").popen.wait(60) == 0
        api = stack.start_api()
        dlq = f"{stack.jobs_queue}-dlq"
        client = stack.sqs()  # straight to moto, not through the proxy
        dlq_url = client.get_queue_url(QueueName=dlq)["QueueUrl"]
        for i in range(3):
            client.send_message(QueueUrl=dlq_url, MessageBody=f"m{i}")

        def depth(text: str) -> float | None:
            return _sample(text, "samseg_queue_depth", queue=dlq)

        wait_until(lambda: depth(_scrape(f"{api}/metrics")) == 3, 30, "DLQ depth 3 on /metrics")

        proxy.drop()  # SQS calls now hang until the client's 3 s read timeout
        # Four SQS reads on the scrape's thread would take >= 12 s here; the scrape must not wait for them.
        stale = _scrape(f"{api}/metrics", timeout=2.5)
        assert stale.startswith("# HELP") or "samseg_queue_depth" in stale
        wait_until(lambda: depth(_scrape(f"{api}/metrics", timeout=2.5)) is None, 30, "stale queue depth to disappear")
        age = _sample(_scrape(f"{api}/metrics", timeout=2.5), "samseg_queue_depth_age_seconds")
        assert age is not None and age > 3  # the last read is older than the 3-interval freshness bound

        proxy.restore()
        wait_until(lambda: depth(_scrape(f"{api}/metrics")) == 3, 30, "DLQ depth back after the outage")
