"""Benchmark the whole pipeline through SQS: per-hop latency, the segment worker's idle gap, model share.

Issue 11. Runs the stack the way `samseg up` does — a moto SQS server, the io worker and the segment worker
with the exact commands `samseg up` (or compose.yaml's GPU worker) starts, beat and the API — once per
configuration, on one shared moto server, each configuration with its own queues and assets folder. Jobs are
sent to the jobs queue as the app server sends them; a loopback HTTP server serves a 1024x768 JPEG and
another one stands in for the app server and records when each callback PATCH arrives.

What is stood in for (as in the tests): AWS (moto) and Meta's weights (a random-initialised
sam2.1_hiera_tiny checkpoint, so all mask filters are off and a 4x4 grid gives 48 masks per job).

Phases, per configuration:
  warm-up     one job, not counted (first use of every code path);
  sequential  --sequential jobs, one at a time, each sent when the previous one's callback arrived (an idle
              system: nothing else queued; --pause waits a random 0.5-1.5x that many seconds in between);
  burst       --burst jobs sent at once (a backlog on the gpu queue).

Timestamps come from the workers' structured JSON logs (SAMSEG_LOG_JSON=true): Celery's own
`Task ... received/succeeded in Rs` lines (a task's start is its `succeeded` time minus R) and samseg's
`image_downloaded`, `image_segmented` (with the model's seconds), `masks_persisted` events; the send and
PATCH times are taken in this process. All processes share one clock.

Default run (~5 minutes on 2 cores):   python benchmarks/pipeline.py
Only some columns:                     python benchmarks/pipeline.py --configs previous,new
The machine's other load shows up in every figure: run it on a quiet machine and compare columns of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import itertools
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CALLBACK_PREFIX = "/api/v1/re-imagine/auto-mask/"
# torchao's SAM-2 AMG server on an H100 (issue 11): the per-image model time the idle gap is set against.
GPU_MODEL_SECONDS = 0.12
TASK_LINE = re.compile(
    r"^Task samseg\.(?P<stage>\w+)\[(?P<id>[^\]]+)\] (?P<what>received|succeeded in (?P<rt>[0-9.e-]+)s)"
)


# --- configurations ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One column of the table: the environment and the worker commands of one way to run samseg."""

    name: str
    env: dict[str, str]
    io: list[str]
    segment: list[str]
    segment_env: dict[str, str] = field(default_factory=dict)


def celery_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "samseg", *args]


def configs(jobs_queue: str, prefix: str) -> dict[str, Config]:
    """Previous settings (samseg at ead9ca8: kombu's polling, prefork segment worker) and the new ones.

    "new" takes its worker commands from samseg.cli.stack, i.e. exactly what `samseg up` starts today; the compose
    columns use compose.yaml's GPU worker command with the same queue names.
    """
    from samseg.cli.stack import up_worker_commands

    io_q, gpu_q = f"{prefix}io", f"{prefix}gpu"
    previous_env = {"SAMSEG_SQS_PROMPT_POLLING": "false", "SAMSEG_VISIBILITY_TIMEOUT_SECONDS": "3600"}
    previous_io = celery_argv(
        "worker", "-Q", f"{jobs_queue},{io_q}", "--concurrency", "4", "--pool", "threads", "--hostname", "io@%h"
    )
    up = up_worker_commands(jobs_queue, io_q, gpu_q, [sys.executable, "-m", "celery", "-A", "samseg"])
    compose_gpu = compose_gpu_command(gpu_q)
    return {
        "previous": Config(
            "previous",
            previous_env,
            previous_io,
            celery_argv("worker", "-Q", gpu_q, "--concurrency", "1", "--hostname", "segment@%h"),
        ),
        "new": Config("new", {}, up["worker-io"].argv, up["worker-segment"].argv, up["worker-segment"].env),
        "previous-compose": Config(
            "previous-compose",
            previous_env,
            previous_io,
            celery_argv("worker", "-Q", gpu_q, "--pool", "solo", "--loglevel", "INFO", "-n", "gpu0@%h"),
        ),
        "new-compose": Config("new-compose", {}, up["worker-io"].argv, compose_gpu[0], compose_gpu[1]),
    }


def compose_gpu_command(gpu_queue: str) -> tuple[list[str], dict[str, str]]:
    """compose.yaml's worker-gpu-0 command and environment, with this run's queue name."""
    import yaml

    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    service = data["services"]["worker-gpu-0"]
    command = service["command"]
    argv = command.split() if isinstance(command, str) else list(command)
    argv = [re.sub(r"\$\{SAMSEG_QUEUE_PREFIX:-[^}]*\}gpu", gpu_queue, a) for a in argv]
    assert argv[0] == "celery", argv
    env = {k: str(v) for k, v in (data["x-gpu-worker"].get("environment") or {}).items() if k.startswith("CELERY_")}
    return [sys.executable, "-m", "celery", *argv[1:]], env


# --- loopback servers -------------------------------------------------------------------------------------
def jpeg_1024x768() -> bytes:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    ramp = np.linspace(40, 200, 1024, dtype=np.float32)[None, :, None]
    image = Image.fromarray(np.broadcast_to(ramp, (768, 1024, 3)).astype(np.uint8).copy())
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, 700)), int(rng.integers(0, 500))
        box = (x0, y0, x0 + int(rng.integers(40, 320)), y0 + int(rng.integers(40, 260)))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


class Loopback:
    """Serves the JPEG at /image.jpg and records the arrival time of every callback PATCH."""

    def __init__(self) -> None:
        self.image = jpeg_1024x768()
        self.patches: dict[str, float] = {}
        self.cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(outer.image)))
                self.end_headers()
                self.wfile.write(outer.image)

            def do_PATCH(self) -> None:
                arrived = time.time()
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                with outer.cond:
                    outer.patches.setdefault(self.path.removeprefix(CALLBACK_PREFIX), arrived)
                    outer.cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, uuids: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(u in self.patches for u in uuids):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [u for u in uuids if u not in self.patches]
                    raise TimeoutError(f"no callback for {missing} after {timeout} s")
                self.cond.wait(left)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port} after {timeout} s")


# --- processes --------------------------------------------------------------------------------------------
class Processes:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = (self.log_dir / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log(name):
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited:\n{self.log(name)[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: no {needle!r} after {timeout} s:\n{self.log(name)[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in reversed(self.procs.values()):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs.values()):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def stack_env(
    moto_url: str, checkpoint: Path, root: Path, prefix: str, public_url: str, app_url: str
) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("SAMSEG_", "AWS_", "CELERY_"))}
    return {
        **inherited,
        "PYTHONPATH": str(ROOT),
        "AWS_ENDPOINT_URL_SQS": moto_url,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
        "SAMSEG_QUEUE_PREFIX": prefix,
        "SAMSEG_JOBS_QUEUE": f"{prefix}jobs",
        "SAMSEG_ASSETS_DIR": str(root / "assets"),
        "SAMSEG_SAM2_MODEL": "sam2.1_hiera_tiny",
        "SAMSEG_SAM2_CHECKPOINT": str(checkpoint),
        "SAMSEG_DEVICE": "cpu",
        "SAMSEG_AMG_POINTS_PER_SIDE": "4",
        "SAMSEG_AMG_POINTS_PER_BATCH": "16",
        "SAMSEG_AMG_PRED_IOU_THRESH": "0",
        "SAMSEG_AMG_STABILITY_SCORE_THRESH": "0",
        "SAMSEG_AMG_BOX_NMS_THRESH": "1.0",
        "SAMSEG_ALLOW_PRIVATE_NETWORKS": "true",
        "SAMSEG_APP_SERVER_URL": app_url,
        "SAMSEG_PUBLIC_BASE_URL": public_url,
        "SAMSEG_LOG_JSON": "true",
        "SAMSEG_PRELOAD_MODEL": "true",
        "SAMSEG_WORKER_HEARTBEAT_FILE": str(root / "heartbeat"),
    }


# --- log parsing ------------------------------------------------------------------------------------------
@dataclass
class Job:
    uuid: str
    sent: float
    patched: float = 0.0
    start: dict[str, float] = field(default_factory=dict)  # stage -> task start
    end: dict[str, float] = field(default_factory=dict)  # stage -> task end (Celery's succeeded line)
    body_end: dict[str, float] = field(default_factory=dict)  # stage -> samseg's "done" event
    model_seconds: float = 0.0


def parse_logs(texts: list[str], jobs: dict[str, Job]) -> None:
    body_events = {"image_downloaded": "download", "image_segmented": "segment", "masks_persisted": "persist"}
    for text in texts:
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            job = jobs.get(str(event.get("job_uuid")))
            if job is None or "timestamp" not in event:
                continue
            ts = dt.datetime.fromisoformat(event["timestamp"]).timestamp()
            name = str(event.get("event", ""))
            match = TASK_LINE.match(name)
            if match and match["what"] != "received":
                stage = match["stage"]
                job.end[stage] = ts
                job.start[stage] = ts - float(match["rt"])
            elif name in body_events:
                job.body_end[body_events[name]] = ts
                if name == "image_segmented":
                    job.model_seconds = float(event.get("seconds", 0.0))


# --- one configuration ------------------------------------------------------------------------------------
@dataclass
class Result:
    config: str
    sequential: list[Job]
    burst: list[Job]
    burst_sent: float
    segment_cpu_seconds: float = 0.0


def run_config(
    config_name: str, moto_url: str, checkpoint: Path, loopback: Loopback, work: Path, args: argparse.Namespace
) -> Result:
    import boto3

    prefix = f"b{os.getpid()}{config_name.replace('-', '')}-"
    root = work / config_name
    root.mkdir(parents=True)
    config = configs(f"{prefix}jobs", prefix)[config_name]
    env = stack_env(moto_url, checkpoint, root, prefix, "http://localhost:8000", loopback.url) | config.env
    procs = Processes(root)
    try:
        subprocess.run(
            [sys.executable, "-m", "samseg.cli", "queues", "ensure"], env=env, cwd=ROOT, check=True, capture_output=True
        )
        procs.start("io", config.io, env)
        procs.start("segment", config.segment, env | config.segment_env)
        procs.start("beat", celery_argv("beat"), env)
        api_port = free_port()
        procs.start(
            "api",
            [sys.executable, "-m", "uvicorn", "samseg.api:app", "--host", "127.0.0.1", "--port", str(api_port)],
            env,
        )
        procs.wait_for("io", "worker_ready", 120)
        procs.wait_for("segment", "worker_ready", 120)
        procs.wait_for("segment", "model_ready", 180)
        sqs = boto3.client(
            "sqs", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="b", aws_secret_access_key="b"
        )
        url = sqs.get_queue_url(QueueName=f"{prefix}jobs")["QueueUrl"]
        jobs: dict[str, Job] = {}
        image_url = f"{loopback.url}/image.jpg"

        def send(uuid: str) -> Job:
            job = Job(uuid, time.time())
            sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"uuid": uuid, "image_url": image_url}))
            jobs[uuid] = job
            return job

        rng = random.Random(1)
        send(f"{config_name}-warm")
        loopback.wait([f"{config_name}-warm"], 180)
        sequential = []
        for i in range(args.sequential):
            if args.pause:
                time.sleep(rng.uniform(0.5 * args.pause, 1.5 * args.pause))
            sequential.append(send(f"{config_name}-seq{i}"))
            loopback.wait([sequential[-1].uuid], 180)
        time.sleep(2)
        cpu_before = process_cpu(procs.procs["segment"].pid)
        burst_sent = time.time()
        burst = [send(f"{config_name}-burst{i}") for i in range(args.burst)]
        loopback.wait([j.uuid for j in burst], 60 + 30 * args.burst)
        cpu = process_cpu(procs.procs["segment"].pid) - cpu_before
        time.sleep(0.5)  # the last log lines
        for job in jobs.values():
            job.patched = loopback.patches[job.uuid]
        parse_logs([procs.log("io"), procs.log("segment")], jobs)
        return Result(config_name, sequential, burst, burst_sent, cpu)
    finally:
        procs.stop()


def process_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (the prefork pool), from /proc."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if int(entry) == pid or int(fields[1]) == pid:
            total += sum(int(x) for x in fields[11:13])
    return total / os.sysconf("SC_CLK_TCK")


# --- the table --------------------------------------------------------------------------------------------
def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def hops(jobs: list[Job]) -> dict[str, float | None]:
    def each(f: Callable[[Job], float]) -> list[float]:
        out = []
        for job in jobs:
            with contextlib.suppress(KeyError):
                out.append(f(job))
        return out

    return {
        "SendMessage → download start": med(each(lambda j: j.start["download"] - j.sent)),
        "download end → segment start": med(each(lambda j: j.start["segment"] - j.body_end["download"])),
        "segment end → persist start": med(each(lambda j: j.start["persist"] - j.body_end["segment"])),
        "persist end → notify start": med(each(lambda j: j.start["notify"] - j.body_end["persist"])),
        "notify start → PATCH received": med(each(lambda j: j.patched - j.start["notify"])),
        "end-to-end minus model": med(each(lambda j: j.patched - j.sent - j.model_seconds)),
        "model (mask generation)": med(each(lambda j: j.model_seconds)),
    }


def backlog(result: Result) -> dict[str, float | None]:
    jobs = sorted((j for j in result.burst if "segment" in j.start), key=lambda j: j.start["segment"])
    task_gaps = [b.start["segment"] - a.end["segment"] for a, b in itertools.pairwise(jobs)]
    # Model idle between consecutive generations: Δ(image_segmented) minus the later job's model time (the
    # post-model work of both jobs cancels). Valid whether tasks overlap or not.
    done = sorted(result.burst, key=lambda j: j.body_end.get("segment", 0))
    model_gaps = [
        b.body_end["segment"] - a.body_end["segment"] - b.model_seconds
        for a, b in itertools.pairwise(done)
        if "segment" in a.body_end and "segment" in b.body_end
    ]
    wall = max(j.end["segment"] for j in jobs) - min(j.start["segment"] for j in jobs) if jobs else 0.0
    model = sum(j.model_seconds for j in jobs)
    span = max(j.patched for j in result.burst) - result.burst_sent
    idle = med(model_gaps)
    return {
        "segment task end → next task start": med(task_gaps),
        "model idle between jobs": idle,
        "model share of segment wall time": model / wall if wall else None,
        # What the same idle time leaves of a GPU that needs GPU_MODEL_SECONDS per image (extrapolated).
        f"GPU-equivalent share at {GPU_MODEL_SECONDS * 1000:.0f} ms/image": (
            GPU_MODEL_SECONDS / (GPU_MODEL_SECONDS + max(0.0, idle)) if idle is not None else None
        ),
        "burst: first send → last PATCH": span,
        "jobs/hour (burst)": len(result.burst) / span * 3600 if span else None,
    }


def fmt(key: str, value: float | None) -> str:
    if value is None:
        return "—"
    if "share" in key:
        return f"{100 * value:.1f} %"
    if "jobs/hour" in key:
        return f"{value:.0f}"
    if "model (mask" in key or "first send" in key:
        return f"{value:.2f} s"
    return f"{1000 * value:.0f} ms"


def table(results: list[Result], args: argparse.Namespace) -> str:
    rows: list[tuple[str, list[str]]] = []
    idle = [hops(r.sequential) for r in results]
    for key in idle[0]:
        rows.append((f"idle: {key} (median)", [fmt(key, h[key]) for h in idle]))
    busy = [backlog(r) for r in results]
    for key in busy[0]:
        label = f"backlog: {key}" + (" (median)" if "→ next" in key or "idle" in key else "")
        rows.append((label, [fmt(key, b[key]) for b in busy]))
    head = ["", *[r.config for r in results]]
    width = max(len(r[0]) for r in rows)
    lines = [
        f"samseg pipeline benchmark — {args.sequential} sequential + {args.burst} burst jobs per column, "
        f"sam2.1_hiera_tiny (random weights), 1024x768 JPEG, 4x4 points, filters off, {os.cpu_count()} CPUs",
        "| " + " | ".join([head[0].ljust(width), *head[1:]]) + " |",
        "|" + "|".join(["-" * (width + 2), *["-" * (len(h) + 2) for h in head[1:]]]) + "|",
    ]
    for label, cells in rows:
        lines.append(
            "| "
            + " | ".join([label.ljust(width), *[c.ljust(len(h)) for c, h in zip(cells, head[1:], strict=True)]])
            + " |"
        )
    lines += [
        "",
        "Hops: from the end of one stage's work to the start of the next task (SQS hand-off plus pool dispatch).",
        "Segment task end → next task start is negative where the next task had already started and waited at",
        "the model lock (samseg's GPU pool). Model idle between jobs: Δ(image_segmented) minus the later job's",
        "model time — the model's idle time between two inferences. Model share: Σ model time / segment wall.",
        "GPU-equivalent share: model time / (model time + that idle time) for a 120 ms inference (extrapolated:",
        "the idle time is the CPU machine's; on a GPU host the CPU work around the model is the same or less).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="previous,new,previous-compose,new-compose")
    parser.add_argument("--sequential", type=int, default=5)
    parser.add_argument("--burst", type=int, default=8)
    parser.add_argument(
        "--pause", type=float, default=0.0, help="mean pause (s) between a callback and the next sequential job"
    )
    parser.add_argument("--keep", type=Path, help="keep the logs of every process in this folder")
    args = parser.parse_args(argv)

    from samseg.runtime.build import write_random_checkpoint

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = set(names) - set(configs("x", "x-"))
    if unknown:
        parser.error(f"unknown configuration(s) {sorted(unknown)}; known: {sorted(configs('x', 'x-'))}")
    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="samseg-bench-")))
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = work / "tiny.pt"
        if not checkpoint.exists():
            write_random_checkpoint("sam2.1_hiera_tiny", checkpoint)
        moto_port = free_port()
        moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        stack.callback(moto.wait, 10)
        stack.callback(os.killpg, moto.pid, signal.SIGTERM)
        wait_port(moto_port, 30)
        loopback = Loopback()
        stack.callback(loopback.close)
        results = []
        for name in names:
            started = time.monotonic()
            results.append(run_config(name, f"http://127.0.0.1:{moto_port}", checkpoint, loopback, work, args))
            print(f"{name}: done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        print(table(results, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
