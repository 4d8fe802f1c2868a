"""Fault-injection helpers for tests/system/test_faults_delivery.py: a TCP proxy that can cut the network, log and
process introspection, and bounded waits. Nothing here stands in for samseg code."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from samseg.core.contracts import ResultDocument
from tests.support import LoopbackServer, Proc, Recorded

CALLBACK_PREFIX = "/api/v1/re-imagine/auto-mask/"


# --- waiting --------------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll predicate until it returns something truthy (returned) or raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout}s")
        time.sleep(interval)


def queue_depths(stack: Any, names: tuple[str, ...] = ("jobs", "io", "gpu")) -> dict[str, int]:
    """Messages on each of the stack's queues: waiting + in flight (received, not yet deleted) + delayed
    (a retry's countdown). Zero everywhere: no task can run again, no copy can be redelivered."""
    prefix = stack.env["SAMSEG_QUEUE_PREFIX"]
    queue_names = {"jobs": stack.jobs_queue, "io": prefix + "io", "gpu": prefix + "gpu"}
    client = stack.sqs()
    depths = {}
    for name in names:
        url = client.get_queue_url(QueueName=queue_names[name])["QueueUrl"]
        attrs = client.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )["Attributes"]
        depths[name] = sum(int(v) for v in attrs.values())
    return depths


def outbox_state(stack: Any, uuid: str) -> str | None:
    """The job's callback outbox state as GET /jobs/{uuid} shows it (the stack's API if it runs one, else the
    job store the API reads); None before the run has an outbox."""
    if stack.api_url is not None:
        from tests.support import AUTH

        response = httpx.get(f"{stack.api_url}/jobs/{uuid}", headers=AUTH, timeout=10)
        if response.status_code != 200:
            return None
        box = response.json().get("callback")
        return None if not box else box.get("state")
    _, stores = stack_stores(stack.env)
    record = stores.jobs.get(uuid)
    if record is None or record.callback is None or record.callback.state is None:
        return None
    return str(record.callback.state.value)


OPEN_OUTBOX = {None, "pending", "sending"}


def wait_drained(stack: Any, timeout: float, queues: tuple[str, ...] = ("jobs", "io", "gpu")) -> None:
    """Until the stack's queues hold no message (waiting, in flight or delayed) on two readings a second apart:
    a stage publishes its successor before its own message is deleted, so one reading could fall between."""

    def drained() -> bool:
        return not any(queue_depths(stack, queues).values())

    wait_until(lambda: drained() and (time.sleep(1.0) or drained()), timeout, f"queues {queues} drained")


def settled_callbacks(
    stack: Any, app_server: LoopbackServer, uuid: str, timeout: float, queues: tuple[str, ...] = ("jobs", "io", "gpu")
) -> list[Recorded]:
    """The job's callbacks once nothing can add one: its outbox is closed (not pending/sending) and the jobs,
    io and gpu queues are drained (wait_drained). Count them only then: a redelivered duplicate needs a
    visibility timeout (>= 30 s) to reappear, and stays in flight on its queue until it has run."""
    deadline = time.monotonic() + timeout
    wait_until(lambda: outbox_state(stack, uuid) not in OPEN_OUTBOX, timeout, f"{uuid}'s callback outbox closed")
    wait_drained(stack, max(1.0, deadline - time.monotonic()), queues)
    assert outbox_state(stack, uuid) not in OPEN_OUTBOX  # nothing reopened it while the queues drained
    return callbacks(app_server, uuid)


# --- worker logs ----------------------------------------------------------------------------------------


def events(proc: Proc) -> list[dict[str, Any]]:
    """The structured (JSON) lines a samseg process wrote."""
    out: list[dict[str, Any]] = []
    for line in proc.output().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def count_events(proc: Proc, event: str, uuid: str | None = None) -> int:
    return sum(1 for e in events(proc) if e.get("event") == event and (uuid is None or e.get("job_uuid") == uuid))


def task_received(proc: Proc, uuid: str, stage: str) -> int:
    """How many times the worker received the task `{uuid}.{stage}` (Celery's own 'received' line)."""
    needle = f"Task samseg.{stage}[{uuid}.{stage}] received"
    return sum(1 for e in events(proc) if e.get("event") == needle)


# --- callbacks and the job folder -----------------------------------------------------------------------


def callbacks(app_server: LoopbackServer, uuid: str) -> list[Recorded]:
    return [r for r in list(app_server.requests) if r.method == "PATCH" and r.path == CALLBACK_PREFIX + uuid]


def is_callback(uuid: str) -> Callable[[Recorded], bool]:
    return lambda r: r.method == "PATCH" and r.path == CALLBACK_PREFIX + uuid


def callback_of_result(text: str) -> dict[str, Any]:
    """The callback body a result.json stands for: result.json is the result document, the callback's fields
    plus params, model, version and the per-mask encodings (docs/contract.md)."""
    data: dict[str, Any] = json.loads(
        ResultDocument.model_validate_json(text).callback_body().model_dump_json(exclude_none=True)
    )
    return data


def check_job_folder(assets: Path, uuid: str, body: dict[str, Any]) -> list[str]:
    """Problems with {assets}/{uuid} against a `completed` callback body (empty list: complete)."""
    problems: list[str] = []
    folder = assets / uuid
    result = folder / "result.json"
    if not result.is_file():
        return [f"{result} missing"]
    if callback_of_result(result.read_text()) != body:
        problems.append("result.json differs from the callback body")
    pngs = sorted(p.name for p in (folder / "mask_images").iterdir())
    expected = [f"mask_{i:03d}.png" for i in range(len(body["segments"]))]
    if pngs != expected:
        problems.append(f"mask files {pngs} != {expected}")
    for seg in body["segments"]:
        path = folder / "mask_images" / f"mask_{seg['segment_id']:03d}.png"
        try:
            mask = np.asarray(Image.open(path).convert("L")) > 0
        except Exception as exc:  # any decode failure is a problem to report
            problems.append(f"{path.name}: {exc!r}")
            continue
        if int(mask.sum()) != seg["area"]:
            problems.append(f"{path.name}: area {int(mask.sum())} != {seg['area']}")
    return problems


def download_masks(body: dict[str, Any]) -> list[str]:
    """GET every mask_url of a callback body; problems (empty list: every mask is served)."""
    problems = []
    for seg in body["segments"]:
        response = httpx.get(seg["mask_url"], timeout=10)
        if response.status_code != 200:
            problems.append(f"{seg['mask_url']}: HTTP {response.status_code}")
            continue
        mask = np.asarray(Image.open(io.BytesIO(response.content)).convert("L")) > 0
        if int(mask.sum()) != seg["area"]:
            problems.append(f"{seg['mask_url']}: area {int(mask.sum())} != {seg['area']}")
    return problems


def tree_snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every entry under folder (itself included) → (mtime_ns, sha256 of a file's bytes or '<dir>')."""
    snap: dict[str, tuple[int, str]] = {}
    for path in [folder, *sorted(folder.rglob("*"))]:
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
        snap[str(path.relative_to(folder))] = (path.stat().st_mtime_ns, digest)
    return snap


def stack_stores(env: dict[str, str]) -> tuple[Any, Any]:
    """The Settings and stores a stack's processes build from `env`, built here the same way (the factory)."""
    from unittest import mock

    from samseg.core.settings import Settings
    from samseg.stores import build_stores

    with mock.patch.dict(os.environ, env, clear=True):
        settings = Settings()
    return settings, build_stores(settings)


def leftovers(assets: Path) -> dict[str, list[str]]:
    """Work files left in a local blob store (none once jobs are done): `.samseg/work/{uuid}/{run}/…`."""
    work = assets / ".samseg" / "work"
    files = [str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()] if work.is_dir() else []
    return {"work": sorted(files)}


# --- processes --------------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces; everything after the last ')' is space-separated from field 3 on.
    return raw[raw.rindex(")") + 2 :].split()


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of a session (Proc starts each samseg process in its own session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and fields[0] != "Z" and int(fields[3]) == sid:  # field 6: session id
                pids.append(int(entry))
    return pids


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == pid:  # field 4: ppid
                out.append(int(entry))
    return out


def session_cpu_seconds(sid: int) -> float:
    """utime + stime of every live process in the session (plus their reaped children), in seconds."""
    ticks = 0
    for pid in session_pids(sid):
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime (fields 14-17)
    return ticks / os.sysconf("SC_CLK_TCK")


# --- the network ----------------------------------------------------------------------------------------


class FaultProxy:
    """A TCP proxy on a fixed loopback port in front of an upstream (the moto SQS server).

    `cut()` makes the endpoint unreachable the way a network outage does for a client: the listening socket
    closes (new connections are refused) and every open connection is reset. `restore()` listens again on
    the same port. Upstream state (queues, messages) is untouched.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = int(probe.getsockname()[1])
        probe.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def close(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut while connecting
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            src.close()
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
