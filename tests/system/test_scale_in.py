"""Scale-in protection (samseg/ops/scale_in.py) against loopback stand-ins for the two platform endpoints.

Stood in, because they cannot exist here: the Kubernetes API server (a LoopbackServer answering the pod PATCH)
and the ECS container agent (a LoopbackServer answering PUT /task-protection/v1/state). Everything else is
real: the guard's thread, its HTTP requests, and in the last test a Celery GPU worker running a job.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from samseg.core.settings import Settings
from samseg.ops import scale_in
from samseg.ops.scale_in import DELETION_COST, DO_NOT_DISRUPT, SAFE_TO_EVICT, EcsTask, KubernetesPod, ScaleInGuard
from tests.faults_support import is_callback, wait_until
from tests.support import LoopbackServer, Recorded, Route

POD_PATH = "/api/v1/namespaces/gpu-ns/pods/worker-gpu-abc12"
ECS_PATH = "/task-protection/v1/state"


@pytest.fixture
def server():
    s = LoopbackServer()
    yield s
    s.close()


def _settings(monkeypatch, tmp_path: Path, **env: str) -> Settings:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)


def _service_account(tmp_path: Path) -> Path:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("projected-token-1\n")
    (sa / "namespace").write_text("gpu-ns")
    return sa


def _k8s(monkeypatch, tmp_path, server: LoopbackServer, timeout: str = "2") -> KubernetesPod:
    settings = _settings(
        monkeypatch,
        tmp_path,
        SAMSEG_SCALE_IN_PROTECTION="kubernetes",
        SAMSEG_KUBERNETES_API_URL=server.url,
        SAMSEG_KUBERNETES_SERVICE_ACCOUNT_DIR=str(_service_account(tmp_path)),
        POD_NAME="worker-gpu-abc12",
        SAMSEG_SCALE_IN_REQUEST_TIMEOUT_SECONDS=timeout,
    )
    return KubernetesPod(settings)


def _annotations(record: Recorded) -> dict[str, Any]:
    return dict(record.json()["metadata"]["annotations"])


def _busy(record: Recorded) -> bool:
    return record.method == "PATCH" and _annotations(record).get(DELETION_COST) is not None


def _idle(record: Recorded) -> bool:
    return record.method == "PATCH" and _annotations(record).get(DELETION_COST, "") is None


def _timed(server: LoopbackServer, path: str) -> list[tuple[float, Recorded]]:
    """Answer 200 on `path` and keep when each request arrived."""
    seen: list[tuple[float, Recorded]] = []

    def answer(record: Recorded) -> Route:
        seen.append((time.monotonic(), record))
        return Route(200, b'{"metadata": {}}', {"Content-Type": "application/json"})

    server.routes[path] = answer
    return seen


def test_kubernetes_pod_is_protected_while_busy_and_released_when_the_last_job_ends(monkeypatch, tmp_path, server):
    seen = _timed(server, POD_PATH)
    guard = ScaleInGuard(_k8s(monkeypatch, tmp_path, server), idle_grace=0.2)
    # Busy before the thread starts: its start-up clear (after the idle grace) must not race the first job.
    guard.job_started()
    guard.job_started()  # the GPU pool's second thread
    guard.start()
    try:
        [busy] = server.wait_for(_busy, timeout=10)
        assert busy.path == POD_PATH
        assert busy.headers["Content-Type"] == "application/merge-patch+json"
        assert busy.headers["Authorization"] == "Bearer projected-token-1"
        assert _annotations(busy) == {DELETION_COST: "10000", SAFE_TO_EVICT: "false", DO_NOT_DISRUPT: "true"}
        guard.job_finished()
        assert guard.busy == 1
        last_finished = time.monotonic()
        guard.job_finished()
        [idle] = server.wait_for(_idle, timeout=10)
        assert _annotations(idle) == {DELETION_COST: None, SAFE_TO_EVICT: None, DO_NOT_DISRUPT: None}
        cleared_at = next(t for t, r in seen if _idle(r))
        assert cleared_at >= last_finished  # not while the second job was still running
        assert [_busy(r) for _, r in seen] == [True, False]  # one request per change, nothing repeated
    finally:
        guard.stop()


def test_back_to_back_jobs_send_nothing_between_them(monkeypatch, tmp_path, server):
    seen = _timed(server, POD_PATH)
    guard = ScaleInGuard(_k8s(monkeypatch, tmp_path, server), idle_grace=5.0)
    guard.start()
    try:
        for _ in range(5):
            with guard.job():
                server.wait_for(_busy, timeout=10)
        guard.stop()  # a stopping worker clears what it set
        assert [_busy(r) for _, r in seen] == [True, False]
    finally:
        guard.stop()


def test_ecs_task_protection_is_set_renewed_while_busy_and_cleared(monkeypatch, tmp_path, server):
    server.routes[ECS_PATH] = Route(200, b'{"protection": {"ProtectionEnabled": true}}')
    settings = _settings(
        monkeypatch,
        tmp_path,
        SAMSEG_SCALE_IN_PROTECTION="ecs",
        ECS_AGENT_URI=server.url,
        SAMSEG_SCALE_IN_ECS_EXPIRES_MINUTES="45",
    )
    platform = EcsTask(settings)
    assert platform.renew_seconds == 45 * 60 / 3
    platform.renew_seconds = 0.3  # renewals within the test's time
    guard = ScaleInGuard(platform, idle_grace=0.1)
    guard.job_started()  # before the thread starts, so no start-up clear comes first
    guard.start()
    try:
        puts = server.wait_for(lambda r: r.method == "PUT", timeout=10, count=3)
        assert all(r.json() == {"ProtectionEnabled": True, "ExpiresInMinutes": 45} for r in puts)
        guard.job_finished()
        server.wait_for(lambda r: r.json() == {"ProtectionEnabled": False}, timeout=10)
    finally:
        guard.stop()


@pytest.mark.parametrize("failure", ["error", "hang", "refused", "ecs-failure"])
def test_a_failing_or_hanging_endpoint_never_delays_the_job_and_is_retried(monkeypatch, tmp_path, server, failure):
    answers = {"count": 0}

    def flaky(record: Recorded) -> Route:
        answers["count"] += 1
        if answers["count"] > 1:
            return Route(200, b"{}")
        if failure == "hang":
            return Route(200, b"{}", delay=3.0)  # past the 0.5 s timeout
        if failure == "ecs-failure":
            return Route(200, b'{"failure": {"Reason": "TASK_NOT_VALID"}}')
        return Route(500, b"internal error")

    if failure == "ecs-failure":
        server.routes[ECS_PATH] = flaky
        platform: Any = EcsTask(
            _settings(monkeypatch, tmp_path, SAMSEG_SCALE_IN_PROTECTION="ecs", ECS_AGENT_URI=server.url)
        )
        platform.timeout = 0.5
    else:
        server.routes[POD_PATH] = flaky
        platform = _k8s(monkeypatch, tmp_path, server, timeout="0.5")
        if failure == "refused":
            platform.url = "http://127.0.0.1:9/refused" + POD_PATH  # nothing listens on the discard port
    guard = ScaleInGuard(platform, idle_grace=0.1, retry=0.2)
    guard.start()
    try:
        started = time.monotonic()
        guard.job_started()
        guard.job_finished()
        guard.job_started()
        assert time.monotonic() - started < 0.05  # the task's thread never waits for the network
        if failure != "refused":
            wait_until(lambda: guard.applied is True, 15, "protection applied after the retry")
        else:
            wait_until(lambda: guard.applied is None and answers["count"] == 0, 5, "still retrying")
        guard.job_finished()
        if failure != "refused":
            wait_until(lambda: guard.applied is False, 15, "protection cleared")
    finally:
        guard.stop(timeout=5)


def test_a_job_that_ends_while_its_busy_request_hangs_still_leaves_the_pod_cleared(monkeypatch, tmp_path, server):
    """The hung PATCH lands on the server after the client gave up; the guard must not assume it did not."""
    hang = {"first": True}

    def answer(record: Recorded) -> Route:
        if hang["first"]:
            hang["first"] = False
            return Route(200, b"{}", delay=2.0)  # past the 0.5 s timeout
        return Route(200, b"{}")

    server.routes[POD_PATH] = answer
    guard = ScaleInGuard(_k8s(monkeypatch, tmp_path, server, timeout="0.5"), idle_grace=0.1, retry=60.0)
    guard.start()
    try:
        with guard.job():
            server.wait_for(_busy, timeout=10)  # arrived (and applied); its answer is still hanging
        [_, idle] = server.wait_for(lambda r: r.method == "PATCH", timeout=15, count=2)
        assert _idle(idle)
        wait_until(lambda: guard.applied is False, 10, "cleared")
    finally:
        guard.stop()


def test_a_new_worker_clears_the_protection_a_previous_container_left(monkeypatch, tmp_path, server):
    """A container OOM-killed mid-job restarts in the same pod, whose annotations still say busy."""
    seen = _timed(server, POD_PATH)
    guard = ScaleInGuard(_k8s(monkeypatch, tmp_path, server), idle_grace=0.1)
    guard.start()
    try:
        server.wait_for(_idle, timeout=10)
        wait_until(lambda: guard.applied is False, 10, "cleared at start")
        with guard.job():
            server.wait_for(_busy, timeout=10)
        server.wait_for(_idle, timeout=10, count=2)
        assert [_busy(r) for _, r in seen] == [False, True, False]  # once at start, then one per change
    finally:
        guard.stop()


def test_install_declines_a_misconfiguration_and_a_prefork_pool(monkeypatch, tmp_path):
    from celery.concurrency.prefork import TaskPool as Prefork

    settings = _settings(monkeypatch, tmp_path, SAMSEG_SCALE_IN_PROTECTION="kubernetes")  # no POD_NAME, no API
    assert scale_in.install(settings, "threads") is None
    monkeypatch.setenv("POD_NAME", "p")
    monkeypatch.setenv("SAMSEG_KUBERNETES_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("POD_NAMESPACE", "ns")
    assert scale_in.install(Settings(_env_file=None), Prefork) is None
    assert scale_in.install(_settings(monkeypatch, tmp_path, SAMSEG_SCALE_IN_PROTECTION="off")) is None


def test_in_cluster_defaults_build_the_pod_url_from_the_service_env(monkeypatch, tmp_path):
    sa = _service_account(tmp_path)
    settings = _settings(
        monkeypatch,
        tmp_path,
        KUBERNETES_SERVICE_HOST="10.96.0.1",
        KUBERNETES_SERVICE_PORT="443",
        POD_NAME="worker-gpu-abc12",
        SAMSEG_KUBERNETES_SERVICE_ACCOUNT_DIR=str(sa),
    )
    assert KubernetesPod(settings).url == "https://10.96.0.1:443" + POD_PATH


def test_a_gpu_worker_protects_its_pod_during_a_job_even_when_the_api_hangs(
    make_stack, images, app_server, server, tmp_path
):
    """A real worker (the GPU worker's pool) with protection on, the API stand-in hanging on the first "busy" PATCH.

    However long the job takes against the 1 s timeout and the 5 s retry (CI's CPU speed decides that), the pod
    ends cleared: the hung request may have landed, so the worker treats the pod as maybe protected and clears it.
    """
    hung = {"done": False}
    seen: list[tuple[float, Recorded]] = []

    def answer(record: Recorded) -> Route:
        seen.append((time.monotonic(), record))
        if _busy(record) and not hung["done"]:
            hung["done"] = True
            return Route(200, b"{}", delay=4.0)  # hangs past the 1 s timeout; the server applies it all the same
        return Route(200, b"{}")

    server.routes[POD_PATH] = answer
    stack = make_stack(
        SAMSEG_APP_SERVER_URL=app_server.url,
        SAMSEG_SCALE_IN_PROTECTION="kubernetes",
        SAMSEG_KUBERNETES_API_URL=server.url,
        SAMSEG_KUBERNETES_SERVICE_ACCOUNT_DIR=str(_service_account(tmp_path)),
        SAMSEG_SCALE_IN_REQUEST_TIMEOUT_SECONDS="1",
        POD_NAME="worker-gpu-abc12",
        SAMSEG_AMG_POINTS_PER_SIDE="8",
    )
    prefix = stack.env["SAMSEG_QUEUE_PREFIX"]
    stack.start_worker("-Q", f"{stack.jobs_queue},{prefix}io", "-c", "2", name="io")
    gpu_env = {"CELERY_CUSTOM_WORKER_POOL": "samseg.pool:ModelThreadPool"}
    gpu = stack.start_worker("-Q", f"{prefix}gpu", "--pool", "custom", "--concurrency", "2", name="gpu", env=gpu_env)
    assert "scale_in_protection_installed" in gpu.output()
    # Before any job: a fresh worker clears whatever a previous container in this pod may have left protected.
    server.wait_for(_idle, timeout=30)
    stack.send_raw(json.dumps({"uuid": "protected-0", "image_url": f"{images.url}/ok.png"}))
    app_server.wait_for(is_callback("protected-0"), timeout=180)
    wait_until(
        lambda: any(_busy(r) for _, r in seen) and _idle(seen[-1][1]), 30, "the pod cleared after the job's PATCH"
    )
    busy_times = [t for t, r in seen if _busy(r)]
    assert max(t for t, r in seen if _idle(r)) > max(busy_times)
    assert "scale_in_protection_failed" in gpu.output()
