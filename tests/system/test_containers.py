"""One job through the built image: the dev stack's init, worker and API as Podman containers.

Real: the image scripts/build_image.sh built from docker/Dockerfile (CI builds it once per run, before pytest;
this test never builds), Podman running it as the image's own non-root user with a read-only root filesystem,
the commands and health checks compose.dev.yaml gives the `init`, `worker` and `api` services, SQS through
kombu, SAM-2's model code with a random-weight checkpoint mounted read-only, a signed callback to a loopback
app server, and a mask PNG downloaded from the containerised API.

Stand-ins, and why: moto (the suite's `moto_url` server on the host) for SQS, because the image leaves the
`emulator` extra out on purpose and compose.dev.yaml's `motoserver/moto` image cannot be pulled here; the
containers share the host's network namespace so that moto, the image host and the app server stay on
127.0.0.1 (every port is bound to loopback; no traffic leaves the machine). Meta's weights cannot be
downloaded here, so the worker gets a random checkpoint through SAMSEG_SAM2_CHECKPOINT.

The image: TEST_CONTAINER_IMAGE (scripts/test.sh passes the ID of the image it just built), else
localhost/samseg:cpu. Skips when Podman or the image is missing; scripts/test.sh sets TEST_CONTAINERS=required
after building the image, and then a missing engine or image is a failure, not a skip. Containers left by a
killed run: `podman rm -f $(podman ps -aq --filter label=samseg-test)`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from standardwebhooks import Webhook

from tests.support import REPO, LoopbackServer, Route, free_port, scene_png, wait_http

pytestmark = pytest.mark.slow

IMAGE = os.environ.get("TEST_CONTAINER_IMAGE", "localhost/samseg:cpu")
REQUIRED = os.environ.get("TEST_CONTAINERS") == "required"
CALLBACK_PREFIX = "/api/v1/re-imagine/auto-mask/"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
APP_TOKEN = "app-token-" + secrets.token_urlsafe(16)
API_TOKEN = "api-token-" + secrets.token_urlsafe(16)
CHECKPOINT_IN_CONTAINER = "/app/weights/random-tiny.pt"


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"TEST_CONTAINERS=required but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def podman() -> Iterator[list[str]]:
    exe = shutil.which("podman")
    if exe is None:
        _unavailable("podman is not installed (scripts/build_image.sh installs it and builds the image)")
    env = os.environ.copy()
    env.setdefault("CONTAINERS_CONF", str(REPO / "scripts" / "podman" / "containers.conf"))
    os.environ.setdefault("CONTAINERS_CONF", env["CONTAINERS_CONF"])
    proc = subprocess.run([exe, "image", "exists", IMAGE], capture_output=True, timeout=60, env=env)
    if proc.returncode != 0:
        _unavailable(f"image {IMAGE} not built: run scripts/build_image.sh (this test never builds it)")
    yield [str(exe)]


class Pod:
    """The containers (and the assets volume) of one test, removed at the end whatever happened."""

    def __init__(self, podman: list[str], tag: str) -> None:
        self.podman, self.tag = podman, tag
        self.containers: list[str] = []
        self.volume = f"{tag}-assets"
        self.run_cmd("volume", "create", self.volume)

    def run_cmd(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.podman, *args], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args[:3])} … failed ({proc.returncode}): {proc.stderr[-3000:]}")
        return proc

    def run_args(self, name: str, env: dict[str, str], checkpoint: Path) -> list[str]:
        """`podman run` options shared by every role: the production shape, minus what needs a registry."""
        args = [
            "--name",
            name,
            "--label",
            f"samseg-test={self.tag}",
            "--network",
            "host",
            # Read-only root filesystem: writes go only to the assets volume and to tmpfs (/tmp: the worker's
            # heartbeat file and prometheus' multiprocess files; Podman also mounts tmpfs on /run and /var/tmp).
            "--read-only",
            "--tmpfs",
            "/tmp:rw,size=256m,mode=1777",
            "-v",
            f"{self.volume}:/app/assets",
            "-v",
            f"{checkpoint}:{CHECKPOINT_IN_CONTAINER}:ro",
        ]
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        return args

    def start(self, role: str, env: dict[str, str], checkpoint: Path, command: list[str], *extra: str) -> str:
        name = f"{self.tag}-{role}"
        self.containers.append(name)
        self.run_cmd("run", "-d", *self.run_args(name, env, checkpoint), *extra, IMAGE, *command)
        return name

    def once(self, role: str, env: dict[str, str], checkpoint: Path, command: list[str], timeout: float = 240) -> Any:
        """A one-shot container in the foreground, like compose's `init`: its exit status and output."""
        name = f"{self.tag}-{role}"
        self.containers.append(name)
        return self.run_cmd("run", *self.run_args(name, env, checkpoint), IMAGE, *command, timeout=timeout, check=False)

    def exec(self, name: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.run_cmd("exec", name, *argv, check=False)

    def healthy(self, name: str, timeout: float) -> None:
        """Poll the image's/compose's health check until it passes (`podman healthcheck run`: exit 0)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            proc = self.run_cmd("healthcheck", "run", name, check=False)
            if proc.returncode == 0:
                return
            last = proc.stdout + proc.stderr
            state = self.run_cmd("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
            if state not in {"running", "created", "configured"}:
                raise AssertionError(f"{name} is {state}, not running:\n{self.logs(name)}")
            time.sleep(1)
        raise AssertionError(f"{name} not healthy after {timeout}s ({last.strip()}):\n{self.logs(name)}")

    def wait_log(self, name: str, needle: str, timeout: float) -> None:
        """Wait for a line in the container's output (cheap to poll, unlike a health check that starts Python)."""
        deadline = time.monotonic() + timeout
        while needle not in self.logs(name, tail=None):
            state = self.run_cmd("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
            if state not in {"running", "created", "configured"}:
                raise AssertionError(f"{name} is {state} before logging {needle!r}:\n{self.logs(name)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} logged no {needle!r} in {timeout}s:\n{self.logs(name)}")
            time.sleep(0.5)

    def logs(self, name: str, tail: int | None = 8000) -> str:
        proc = self.run_cmd("logs", name, check=False)
        out = proc.stdout + proc.stderr
        return out[-tail:] if tail else out

    def close(self) -> None:
        for name in reversed(self.containers):
            self.run_cmd("rm", "-f", "-t", "10", name, check=False, timeout=60)
        self.run_cmd("volume", "rm", "-f", self.volume, check=False)


@pytest.fixture
def pod(podman: list[str], request: pytest.FixtureRequest) -> Iterator[Pod]:
    pod = Pod(podman, f"samseg-t{os.getpid()}-{secrets.token_hex(3)}")
    yield pod
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for name in pod.containers:
            print(f"\n===== {name} =====\n{pod.logs(name)}")
    pod.close()


# --- compose.dev.yaml, as far as these containers need it ----------------------------------------------------


def dev_services() -> dict[str, Any]:
    """compose.dev.yaml's services with ${VAR:-default} resolved to the defaults (YAML merge keys by PyYAML)."""
    text = (REPO / "compose.dev.yaml").read_text(encoding="utf-8")
    text = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", text)
    return dict(yaml.safe_load(text)["services"])


def service_env(service: dict[str, Any], overrides: dict[str, str]) -> dict[str, str]:
    """The service's environment (pass-through keys without a value dropped) with this test's overrides."""
    env = {k: str(v) for k, v in (service.get("environment") or {}).items() if v is not None}
    return env | overrides


def health_argv(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD", test
    return [str(a) for a in test[1:]]


# --- the test ------------------------------------------------------------------------------------------------


def test_one_job_through_the_containers(
    pod: Pod, moto_url: str, tiny_checkpoint: Path, http_server: LoopbackServer, app_server: LoopbackServer
) -> None:
    services = dev_services()
    started = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:  # elapsed seconds per phase, printed at the end (pytest -s / -rP)
        phases[name] = round(time.monotonic() - started - sum(phases.values()), 1)

    width, height = 96, 64
    http_server.routes["/img/scene.png"] = Route(body=scene_png(width, height), headers={"Content-Type": "image/png"})
    api_port, metrics_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    prefix = f"c{os.getpid()}x{secrets.token_hex(2)}-"
    overrides = {
        # Where compose.dev.yaml says http://sqs:5000: the suite's moto server on the host's loopback.
        "AWS_ENDPOINT_URL_SQS": moto_url,
        "AWS_ENDPOINT_URL": moto_url,
        "SAMSEG_QUEUE_PREFIX": prefix,
        "SAMSEG_JOBS_QUEUE": f"{prefix}jobs",
        "SAMSEG_EVENTS": "false",  # no Flower here
        "SAMSEG_SAM2_CHECKPOINT": CHECKPOINT_IN_CONTAINER,
        # Random weights: every filter off and a small grid (as tests/conftest.py's stacks do).
        "SAMSEG_AMG_POINTS_PER_SIDE": "4",
        "SAMSEG_AMG_POINTS_PER_BATCH": "16",
        "SAMSEG_AMG_PRED_IOU_THRESH": "0",
        "SAMSEG_AMG_STABILITY_SCORE_THRESH": "0",
        "SAMSEG_AMG_BOX_NMS_THRESH": "1.0",
        "SAMSEG_ALLOW_PRIVATE_NETWORKS": "true",  # the image host is on loopback
        "SAMSEG_APP_SERVER_URL": app_server.url,
        "SAMSEG_APP_SERVER_TOKEN": APP_TOKEN,
        "SAMSEG_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "SAMSEG_API_TOKEN": API_TOKEN,
        "SAMSEG_PUBLIC_BASE_URL": api_url,
        "SAMSEG_METRICS_HOST": "127.0.0.1",
        "SAMSEG_MIN_FREE_DISK_BYTES": "0",
        "SAMSEG_LOG_JSON": "true",
        "OMP_NUM_THREADS": "2",
    }

    # 1. init, the one-shot: queues, DLQs, job table, then `samseg weights ensure` finds the mounted checkpoint.
    init = services["init"]
    proc = pod.once("init", service_env(init, overrides), tiny_checkpoint, [str(a) for a in init["command"]])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert CHECKPOINT_IN_CONTAINER in proc.stdout + proc.stderr
    phase("init")

    # 2. worker and API with compose.dev.yaml's commands; the API on loopback and a free port (host network).
    worker_svc, api_svc = services["worker"], services["api"]
    worker_env = service_env(worker_svc, overrides | {"SAMSEG_METRICS_PORT": str(metrics_port)})
    # One pool process instead of Celery's default of one per core: one model to load and warm on 2 shared cores.
    worker_cmd = [str(a) for a in worker_svc["command"]] + ["--concurrency", "1"]
    worker = pod.start("worker", worker_env, tiny_checkpoint, worker_cmd)
    api_cmd = [str(a) for a in api_svc["command"]]
    api_cmd[api_cmd.index("--host") + 1] = "127.0.0.1"
    api_cmd[api_cmd.index("--port") + 1] = str(api_port)
    api_health = [a.replace("127.0.0.1:8000", f"127.0.0.1:{api_port}") for a in health_argv(api_svc)]
    api = pod.start(
        "api",
        service_env(api_svc, overrides),
        tiny_checkpoint,
        api_cmd,
        "--health-cmd",
        json.dumps(api_health),
    )
    phase("start worker+api")

    # 3. What the image promises: non-root, health checks that pass, a read-only root filesystem.
    for name in (worker, api):
        uid = pod.exec(name, "id", "-u")
        assert uid.returncode == 0 and uid.stdout.strip() not in {"", "0"}, uid
        assert uid.stdout.strip() == "10001"
        ro = pod.exec(name, "sh", "-c", "touch /opt/venv/probe")
        assert ro.returncode != 0 and "Read-only file system" in ro.stderr, ro
        rw = pod.exec(name, "sh", "-c", "touch /app/assets/.probe /tmp/.probe && rm /app/assets/.probe /tmp/.probe")
        assert rw.returncode == 0, rw
    image_user = pod.run_cmd("image", "inspect", "--format", "{{.Config.User}}", IMAGE).stdout.strip()
    assert image_user.split(":")[0] not in {"", "0", "root"}, image_user
    # The image's own HEALTHCHECK (kept by --format docker) is the worker's: heartbeat fresh, model loaded.
    hc = pod.run_cmd("image", "inspect", "--format", "{{json .Config.Healthcheck}}", IMAGE).stdout
    assert json.loads(hc)["Test"][-3:] == ["samseg", "healthcheck", "worker"], hc
    # Weights checked before consuming, then the model loaded and warmed in the pool process; only then is the
    # worker healthy.
    pod.wait_log(worker, "model_ready", timeout=300)
    assert "weights_present" in pod.logs(worker, tail=None)
    pod.healthy(worker, timeout=60)
    wait_http(f"{api_url}/healthz", 120)
    pod.healthy(api, timeout=60)
    phase("checks+healthy")

    # 4. One job: raw JSON on SQS → the containerised worker → signed callback → mask from the containerised API.
    uuid = "containers-1"
    sqs = _sqs(moto_url)
    queue_url = sqs.get_queue_url(QueueName=f"{prefix}jobs")["QueueUrl"]
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps({"uuid": uuid, "image_url": _image_url(http_server)}))
    (callback,) = app_server.wait_for(lambda r: r.method == "PATCH" and r.path == CALLBACK_PREFIX + uuid, timeout=240)
    body = Webhook(WEBHOOK_SECRET).verify(callback.body, callback.headers)
    assert {k.lower(): v for k, v in callback.headers.items()}["authorization"] == f"Bearer {APP_TOKEN}"
    assert body["uuid"] == uuid and body["status"] == "completed", body
    segments = body["segments"]
    assert segments, body
    mask_url = segments[0]["mask_url"]
    assert mask_url.startswith(f"{api_url}/assets/{uuid}/"), mask_url
    png = httpx.get(mask_url, timeout=10)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    mask = np.asarray(Image.open(io.BytesIO(png.content)).convert("L")) > 0
    assert mask.shape == (height, width) and int(mask.sum()) == segments[0]["area"]
    status = httpx.get(f"{api_url}/jobs/{uuid}", headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10)
    assert status.status_code == 200 and status.json()["status"] == "completed"
    # The worker's own /metrics (SAMSEG_METRICS_PORT), served from the read-only container.
    assert httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).status_code == 200
    phase("one job")

    # 5. The weights check gates the worker: no checkpoint at the configured path → it refuses to start.
    missing = worker_env | {"SAMSEG_SAM2_CHECKPOINT": "/app/weights/missing.pt", "SAMSEG_METRICS_PORT": "0"}
    proc = pod.once("worker-noweights", missing, tiny_checkpoint, [str(a) for a in worker_svc["command"]])
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "weights_unavailable" in proc.stdout + proc.stderr
    phase("no-weights worker")
    print("phases (s):", phases)


def _image_url(server: LoopbackServer) -> str:
    return f"{server.url}/img/scene.png"


def _sqs(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
