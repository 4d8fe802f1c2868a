"""Scale-in that never removes a busy GPU worker: while a segment runs, the worker protects itself.

An autoscaler removes *some* replica when it scales in; neither KEDA nor the HPA can choose which
(kedacore/keda #2900, #6719), and ECS picks any task of a service. So the worker tells its platform, while it
holds a job, not to pick it — `SAMSEG_SCALE_IN_PROTECTION`:

- ``kubernetes``: PATCH its own pod (`/api/v1/namespaces/$POD_NAMESPACE/pods/$POD_NAME`, the pod's
  service-account token and CA, ``application/merge-patch+json``). While busy:
  ``controller.kubernetes.io/pod-deletion-cost`` = BUSY_DELETION_COST (the ReplicaSet removes cheaper pods
  first), ``cluster-autoscaler.kubernetes.io/safe-to-evict: "false"`` and ``karpenter.sh/do-not-disrupt:
  "true"`` (node scale-down leaves the node alone). When idle, all three are removed (merge-patch ``null``),
  which puts the deletion cost back to its default, 0.
- ``ecs``: ``PUT $ECS_AGENT_URI/task-protection/v1/state`` with ``{"ProtectionEnabled": true,
  "ExpiresInMinutes": N}`` while busy (renewed every third of N), ``{"ProtectionEnabled": false}`` when idle.

Best-effort, and never on a job's path: `job_started()` / `job_finished()` only move a reference count (the
GPU worker's pool runs two tasks at once) and wake a background thread, which makes the requests with short
timeouts. A failing or hanging endpoint is logged and retried by that thread; the job never waits for it and
never fails because of it. Applying is idempotent (the same PATCH or PUT twice is harmless), and the thread
only sends when the wanted state differs from what was last applied (or an ECS renewal is due). The busy →
idle change waits IDLE_GRACE_SECONDS, so a worker going from one job to the next sends nothing.

What the platform holds is *unknown* until a request succeeds, and again after any request fails: a request
that timed out may still have landed (a hung "busy" PATCH that the API server applies after our timeout), and a
container restarted in the same pod (OOM-killed mid-job) finds the annotations its predecessor set. Unknown is
treated as "maybe protected": an idle worker clears it. So a worker clears once at start-up, and a job that
ends while its "busy" request is failing still ends with the pod cleared, never left protected for good.

Protection is a preference, not a guarantee: if every replica is busy, a scale-in still removes one, and the
soft shutdown (`SAMSEG_WORKER_SOFT_SHUTDOWN_TIMEOUT_SECONDS`, `REMAP_SIGTERM=SIGQUIT`) then lets its job
finish or hands it back to SQS at once (docs/deployment-kubernetes.md, "Scale-in").

Only the segment task protects (PROTECTED_TASKS): io tasks last seconds on cheap CPU pods, and the soft
shutdown covers them. Wiring: `install(settings, pool_cls)` from the worker's `worker_ready` handler; it
connects `task_prerun`/`task_postrun`, which run in the process that runs the task — the worker's own process
in the GPU worker's pools (solo, threads, samseg.pool:ModelThreadPool). In a prefork pool each child would keep
its own count and one could clear what another set, so `install` declines there.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx
import structlog

from samseg.core.settings import Settings

log = structlog.get_logger(__name__)

PROTECTED_TASKS = frozenset({"samseg.segment"})
# Higher than any idle pod's (0, the default): the ReplicaSet controller deletes lower-cost pods first.
BUSY_DELETION_COST = 10_000
IDLE_GRACE_SECONDS = 1.0
RETRY_SECONDS = 5.0

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
SAFE_TO_EVICT = "cluster-autoscaler.kubernetes.io/safe-to-evict"
DO_NOT_DISRUPT = "karpenter.sh/do-not-disrupt"


class ProtectionError(RuntimeError):
    """The platform did not accept the request (it is retried; the job is not affected)."""


class Platform(Protocol):
    name: str
    renew_seconds: float | None  # re-send "busy" this often while busy (ECS protection expires); None: never

    def apply(self, busy: bool) -> None: ...


class KubernetesPod:
    """This pod's scale-in annotations, set through the Kubernetes API with the pod's own service account."""

    name = "kubernetes"
    renew_seconds: float | None = None

    def __init__(self, settings: Settings) -> None:
        sa_dir = settings.kubernetes_service_account_dir
        namespace = settings.pod_namespace or _read(sa_dir / "namespace")
        api = settings.kubernetes_api_url
        if not api and settings.kubernetes_service_host:
            host = settings.kubernetes_service_host
            host = f"[{host}]" if ":" in host else host
            api = f"https://{host}:{settings.kubernetes_service_port}"
        missing = [
            what
            for what, value in (
                ("POD_NAME", settings.pod_name),
                ("POD_NAMESPACE (or the service-account namespace file)", namespace),
                ("the API server (KUBERNETES_SERVICE_HOST or SAMSEG_KUBERNETES_API_URL)", api),
            )
            if not value
        ]
        if missing:
            raise ValueError("SAMSEG_SCALE_IN_PROTECTION=kubernetes needs " + ", ".join(missing))
        assert api is not None and namespace is not None and settings.pod_name is not None
        self.url = f"{api.rstrip('/')}/api/v1/namespaces/{namespace}/pods/{settings.pod_name}"
        self.token_path = sa_dir / "token"
        ca = sa_dir / "ca.crt"
        self.verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca.is_file() else True
        self.timeout = settings.scale_in_request_timeout_seconds

    @staticmethod
    def annotations(busy: bool) -> dict[str, str | None]:
        if busy:
            return {DELETION_COST: str(BUSY_DELETION_COST), SAFE_TO_EVICT: "false", DO_NOT_DISRUPT: "true"}
        return {DELETION_COST: None, SAFE_TO_EVICT: None, DO_NOT_DISRUPT: None}  # merge-patch null = remove

    def apply(self, busy: bool) -> None:
        headers = {"Content-Type": "application/merge-patch+json", "Accept": "application/json"}
        token = _read(self.token_path)  # re-read each time: the kubelet rotates projected tokens
        if token:
            headers["Authorization"] = f"Bearer {token}"
        body = json.dumps({"metadata": {"annotations": self.annotations(busy)}})
        response = httpx.patch(self.url, content=body, headers=headers, timeout=self.timeout, verify=self.verify)
        if response.status_code != 200:
            raise ProtectionError(f"PATCH pod answered {response.status_code}: {response.text[:200]}")


class EcsTask:
    """ECS task scale-in protection through the ECS agent's endpoint inside the task."""

    name = "ecs"
    renew_seconds: float | None

    def __init__(self, settings: Settings) -> None:
        if not settings.ecs_agent_uri:
            raise ValueError("SAMSEG_SCALE_IN_PROTECTION=ecs needs ECS_AGENT_URI (set by the ECS agent)")
        self.url = f"{settings.ecs_agent_uri.rstrip('/')}/task-protection/v1/state"
        self.expires_minutes = settings.scale_in_ecs_expires_minutes
        self.renew_seconds = self.expires_minutes * 60 / 3
        self.timeout = settings.scale_in_request_timeout_seconds

    def apply(self, busy: bool) -> None:
        body: dict[str, Any] = {"ProtectionEnabled": busy}
        if busy:
            body["ExpiresInMinutes"] = self.expires_minutes
        response = httpx.put(self.url, json=body, timeout=self.timeout)
        failure = None
        with contextlib.suppress(ValueError):
            failure = response.json().get("failure")
        if response.status_code != 200 or failure:
            raise ProtectionError(f"task protection answered {response.status_code}: {response.text[:200]}")


class ScaleInGuard(threading.Thread):
    """Reference-counted busy state, mirrored to the platform by this thread (never by the caller)."""

    def __init__(
        self,
        platform: Platform,
        idle_grace: float = IDLE_GRACE_SECONDS,
        retry: float = RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(name="samseg-scale-in", daemon=True)
        self.platform = platform
        self.idle_grace = idle_grace
        self.retry = retry
        self._clock = clock
        self._cond = threading.Condition()
        self._busy = 0
        self._idle_since = clock()
        # What the platform last accepted; None: unknown (nothing accepted yet, or the last request failed and
        # may or may not have landed). An idle worker clears an unknown state (module docstring).
        self._applied: bool | None = None
        self._applied_at = 0.0
        # After a failure the same state is re-sent no sooner than `retry` later; a *different* state (the job
        # ended while its "busy" request was failing) goes out as soon as it is due.
        self._failed: bool | None = None
        self._retry_at = 0.0
        self._stopping = False

    # --- the interface tasks use (cheap, never blocks on the network) ------------------------------------
    def job_started(self) -> None:
        with self._cond:
            self._busy += 1
            self._cond.notify_all()

    def job_finished(self) -> None:
        with self._cond:
            self._busy = max(0, self._busy - 1)
            if self._busy == 0:
                self._idle_since = self._clock()
            self._cond.notify_all()

    @contextlib.contextmanager
    def job(self) -> Iterator[None]:
        self.job_started()
        try:
            yield
        finally:
            self.job_finished()

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def applied(self) -> bool | None:
        return self._applied

    # --- the thread --------------------------------------------------------------------------------------
    def _due(self, now: float) -> tuple[bool | None, float]:
        """(state to send now or None, seconds until something may be due)."""
        if self._busy:
            if self._applied is not True:
                return True, 0
            renew = self.platform.renew_seconds
            if renew is not None:
                left = self._applied_at + renew - now
                return (True, 0) if left <= 0 else (None, left)
            return None, 3600
        if self._applied is False:  # idle, and "idle" is what the platform holds: nothing to send
            return None, 3600
        left = self._idle_since + self.idle_grace - now
        return (False, 0) if left <= 0 else (None, left)

    def next_request(self, now: float) -> tuple[bool | None, float]:
        """(state to send now or None, seconds until something may be due), honouring the retry delay."""
        with self._cond:
            wanted, wait = self._due(now)
            if wanted is not None and wanted is self._failed and now < self._retry_at:
                return None, self._retry_at - now
            return wanted, wait

    def run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    wanted, wait = self.next_request(self._clock())
                    if wanted is not None:
                        break
                    self._cond.wait(wait)
            self.send(wanted)

    def send(self, busy: bool) -> bool:
        """One request for `busy` (the thread's, and `stop`'s last); records what the platform now holds."""
        try:
            self.platform.apply(busy)
        except Exception as exc:  # best-effort: the job goes on; the thread tries again
            log.warning("scale_in_protection_failed", platform=self.platform.name, busy=busy, error=repr(exc))
            with self._cond:
                self._applied = None  # it may have landed all the same: unknown until a request succeeds
                self._failed, self._retry_at = busy, self._clock() + self.retry
            return False
        with self._cond:
            changed = self._applied is not busy
            self._applied, self._applied_at, self._failed = busy, self._clock(), None
        if changed:
            log.info("scale_in_protection", platform=self.platform.name, protected=busy)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; a worker that stops protected (or unsure) clears its protection (one try, bounded)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.join(timeout)
        if self._applied is not False:
            self.send(False)


def platform_for(settings: Settings) -> Platform | None:
    if settings.scale_in_protection == "kubernetes":
        return KubernetesPod(settings)
    if settings.scale_in_protection == "ecs":
        return EcsTask(settings)
    return None


_guard: ScaleInGuard | None = None


def install(settings: Settings, pool_cls: Any = None) -> ScaleInGuard | None:
    """Start protecting this worker while it runs a PROTECTED_TASKS task; None if off or impossible here.

    Called once from the worker's `worker_ready` handler (main process). Never raises: a misconfiguration is
    logged and the worker runs unprotected.
    """
    global _guard
    if settings.scale_in_protection == "off" or _guard is not None:
        return _guard
    from samseg.ops.watchdog import watches_pool

    if pool_cls is not None and not watches_pool(pool_cls):
        log.error(
            "scale_in_protection_unavailable",
            reason="tasks run in pool child processes (prefork); use --pool solo/threads or samseg.pool",
            pool=str(pool_cls),
        )
        return None
    try:
        platform = platform_for(settings)
    except ValueError as exc:
        log.error("scale_in_protection_unavailable", reason=str(exc))
        return None
    if platform is None:
        return None
    from celery import signals

    guard = ScaleInGuard(platform)
    guard.start()
    signals.task_prerun.connect(_on_prerun, weak=False)
    signals.task_postrun.connect(_on_postrun, weak=False)
    _guard = guard
    log.info("scale_in_protection_installed", platform=platform.name, tasks=sorted(PROTECTED_TASKS))
    return guard


def uninstall() -> None:
    """Disconnect the signals and stop the thread (clearing protection); for worker shutdown."""
    global _guard
    from celery import signals

    signals.task_prerun.disconnect(_on_prerun)
    signals.task_postrun.disconnect(_on_postrun)
    guard, _guard = _guard, None
    if guard is not None:
        guard.stop()


def _on_prerun(task: Any = None, **_: Any) -> None:
    if _guard is not None and getattr(task, "name", None) in PROTECTED_TASKS:
        _guard.job_started()


def _on_postrun(task: Any = None, **_: Any) -> None:
    if _guard is not None and getattr(task, "name", None) in PROTECTED_TASKS:
        _guard.job_finished()


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
