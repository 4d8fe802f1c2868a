"""Shared fixtures: a moto SQS server, a random-weight SAM-2 checkpoint, and a samseg "stack" factory.

What is mocked and why: AWS itself (moto server speaks the real SQS HTTP protocol on loopback) and Meta's
trained weights (a random-initialised checkpoint in the exact format build_sam2 loads). One fidelity fix to the
stand-in: moto's DynamoDB calls are made atomic, as DynamoDB's are (tests.support.make_moto_atomic). Everything else —
Celery workers, kombu's SQS transport, SAM-2's model code, HTTP — is real.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest

from tests.support import (
    API_TOKEN,
    REPO,
    VENV_BIN,
    LoopbackServer,
    Proc,
    Route,
    free_port,
    make_moto_atomic,
    scene_png,
    wait_http,
)

_counter = itertools.count()


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    make_moto_atomic()  # each DynamoDB call one atomic step, as on AWS (see its docstring: measured races)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from samseg.runtime.build import write_random_checkpoint

    return write_random_checkpoint("sam2.1_hiera_tiny", tmp_path_factory.mktemp("weights") / "tiny.pt")


@pytest.fixture
def http_server() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def images() -> Iterator[LoopbackServer]:
    """A module-wide image host serving one valid PNG at /ok.png, for modules that run many jobs."""
    server = LoopbackServer()
    server.routes["/ok.png"] = Route(body=scene_png(), headers={"Content-Type": "image/png"})
    yield server
    server.close()


@pytest.fixture
def app_server() -> Iterator[LoopbackServer]:
    """Stands in for the app server: records every callback and answers 200 unless told otherwise."""
    server = LoopbackServer()
    server.default = Route(status=200, body=b"{}", headers={"Content-Type": "application/json"})
    yield server
    server.close()


@dataclass
class Stack:
    """One isolated samseg deployment: its own queues (unique prefix) and assets dir, shared moto."""

    env: dict[str, str]
    assets: Path
    log_dir: Path
    procs: list[Proc] = field(default_factory=list)
    api_url: str | None = None

    @property
    def jobs_queue(self) -> str:
        return self.env["SAMSEG_JOBS_QUEUE"]

    def sqs(self):  # type: ignore[no-untyped-def]
        return boto3.client(
            "sqs",
            endpoint_url=self.env["AWS_ENDPOINT_URL_SQS"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def send_raw(self, body: str) -> None:
        client = self.sqs()
        url = client.get_queue_url(QueueName=self.jobs_queue)["QueueUrl"]
        client.send_message(QueueUrl=url, MessageBody=body)

    def start(self, name: str, *args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> Proc:
        proc = Proc(name, list(args), {**self.env, **(env or {})}, self.log_dir, cwd)
        self.procs.append(proc)
        return proc

    def start_worker(
        self, *extra: str, name: str = "worker", ready_timeout: float = 90, env: dict[str, str] | None = None
    ) -> Proc:
        proc = self.start(
            name,
            str(VENV_BIN / "celery"),
            "-A",
            "samseg",
            "worker",
            "--loglevel",
            "INFO",
            "--hostname",
            f"{name}@%h",
            *extra,
            env=env,
        )
        proc.wait_for_output("worker_ready", ready_timeout)
        return proc

    def start_api(self, env: dict[str, str] | None = None) -> str:
        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "samseg.api:app", "--host", "127.0.0.1", "--port", str(port)]
        self.start("api", *argv, env=env)
        self.api_url = f"http://127.0.0.1:{port}"
        self.env["SAMSEG_PUBLIC_BASE_URL"] = self.api_url
        wait_http(self.api_url + "/healthz", 60)
        return self.api_url

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def new_stack(moto_url: str, checkpoint: Path, root: Path, prefix: str, **overrides: str) -> Stack:
    """An isolated deployment's environment: queues named with `prefix`, files under `root`."""
    assets = root / "assets"
    (root / "run").mkdir(parents=True, exist_ok=True)
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("SAMSEG_", "AWS_"))}
    env = {
        **inherited,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "AWS_ENDPOINT_URL_SQS": moto_url,
        # S3 and DynamoDB too, for stacks that use them (moto serves all three on one port).
        "AWS_ENDPOINT_URL": moto_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "SAMSEG_QUEUE_PREFIX": prefix,
        "SAMSEG_JOBS_QUEUE": f"{prefix}jobs",
        "SAMSEG_ASSETS_DIR": str(assets),
        "SAMSEG_SAM2_MODEL": "sam2.1_hiera_tiny",
        "SAMSEG_SAM2_CHECKPOINT": str(checkpoint),
        "SAMSEG_DEVICE": "cpu",
        # Random weights: predicted IoU ~0.5 and stability ~0, and near-identical masks, so every
        # filter is off and a small grid keeps the job at a few seconds.
        "SAMSEG_AMG_POINTS_PER_SIDE": "4",
        "SAMSEG_AMG_POINTS_PER_BATCH": "16",
        "SAMSEG_AMG_PRED_IOU_THRESH": "0",
        "SAMSEG_AMG_STABILITY_SCORE_THRESH": "0",
        "SAMSEG_AMG_BOX_NMS_THRESH": "1.0",
        "SAMSEG_ALLOW_PRIVATE_NETWORKS": "true",  # the image server is on loopback
        "SAMSEG_CALLBACK_BACKOFF_SECONDS": "0.2",
        "SAMSEG_CALLBACK_BACKOFF_MAX_SECONDS": "1",
        "SAMSEG_VISIBILITY_TIMEOUT_SECONDS": "120",
        "SAMSEG_LOG_JSON": "true",
        "SAMSEG_API_TOKEN": API_TOKEN,
        # Warm-up at worker start costs an image-encoder pass per worker; tests/integration/test_health_metrics.py
        # turns it on where readiness is under test, everywhere else the first job loads the model.
        "SAMSEG_PRELOAD_MODEL": "false",
        # Not the shared /tmp default: another stack's health check must not see this worker.
        "SAMSEG_WORKER_HEARTBEAT_FILE": str(root / "run" / "heartbeat"),
        "OMP_NUM_THREADS": "2",
        **overrides,
    }
    return Stack(env=env, assets=assets, log_dir=root)


@pytest.fixture
def make_stack(moto_url: str, tiny_checkpoint: Path, tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    stacks: list[Stack] = []

    def factory(**overrides: str) -> Stack:
        root = tmp_path / f"stack{len(stacks)}"
        stack = new_stack(moto_url, tiny_checkpoint, root, f"t{os.getpid()}x{next(_counter)}-", **overrides)
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        stack.stop()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        for stack in stacks:
            for proc in stack.procs:
                sys.stderr.write(f"\n===== {proc.name} log =====\n{proc.output()[-6000:]}\n")


# pytest-timeout by tier (pyproject.toml sets the default, 120 s, and timeout_method = "thread"): the folder a
# test lives in gives its limit unless it carries its own @pytest.mark.timeout or --timeout is given.
TIER_TIMEOUTS = {"unit": 120, "integration": 600, "system": 1800}
TESTS_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("timeout", None) is not None:
        return  # `pytest --timeout N` (0: none) on the command line wins over the tiers, e.g. to debug
    for item in items:
        try:
            tier = item.path.resolve().relative_to(TESTS_DIR).parts[0]
        except ValueError:
            continue
        if tier in TIER_TIMEOUTS and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TIER_TIMEOUTS[tier]))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


__all__ = ["REPO"]
