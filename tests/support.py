"""Real servers and processes for the integration tests: loopback HTTP servers, samseg subprocesses."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
# Every stack's API token (SAMSEG_API_TOKEN): the protected routes answer 401 without it.
API_TOKEN = "stack-api-token-for-tests-0001"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
VENV_BIN = Path(sys.executable).parent


_moto_lock = threading.RLock()


def make_moto_atomic() -> None:
    """Make every DynamoDB call on an in-process moto server atomic, as each one is on DynamoDB itself.

    moto's server answers each request on its own thread, and its DynamoDB backend checks a
    ConditionExpression and then writes without a lock: measured here (tests: 12 threads racing
    `attribute_not_exists` on one key, 150 rounds), 9 rounds had two or more winners. Real DynamoDB evaluates a
    condition and writes as one step, which is exactly what the job store's exactly-once claim relies on, so the
    stand-in must too. One lock around DynamoDB's request handler restores that; SQS and S3 are untouched
    (SQS long polls would otherwise block every other request; samseg makes no conditional S3 writes).
    Idempotent.
    """
    from moto.dynamodb.responses import DynamoHandler

    if getattr(DynamoHandler.call_action, "_samseg_atomic", False):
        return
    unlocked = DynamoHandler.call_action

    def call_action(self: DynamoHandler) -> Any:
        with _moto_lock:
            return unlocked(self)

    call_action._samseg_atomic = True  # type: ignore[attr-defined]
    DynamoHandler.call_action = call_action  # type: ignore[method-assign]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scene_png(width: int = 128, height: int = 96, seed: int = 0) -> bytes:
    """A deterministic synthetic photo stand-in: a gradient with a few solid shapes."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(40, 200, width, dtype=np.float32)[None, :, None]
    base = np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8).copy()
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x1, y1 = x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.ellipse((x0, y0, x1, y1), fill=colour) if rng.random() > 0.5 else draw.rectangle(
            (x0, y0, x1, y1), fill=colour
        )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 with per-path canned responses and a request log."""

    def __init__(self) -> None:
        self.routes: dict[str, Route | Callable[[Recorded], Route]] = {}
        self.default = Route(status=404, body=b"not found")
        self.requests: list[Recorded] = []
        self._cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                record = Recorded(self.command, self.path, dict(self.headers.items()), body)
                with outer._cond:
                    outer.requests.append(record)
                    outer._cond.notify_all()
                route = outer.routes.get(self.path.split("?")[0], outer.default)
                if callable(route):
                    route = route(record)
                if route.delay:
                    time.sleep(route.delay)
                self.send_response(route.status)
                for key, value in route.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(route.body)

            do_GET = do_PATCH = do_POST = do_PUT = do_HEAD = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def wait_for(self, predicate: Callable[[Recorded], bool], timeout: float, count: int = 1) -> list[Recorded]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [r for r in self.requests if predicate(r)]
                if len(hits) >= count:
                    return hits
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(hits)}/{count} matching requests after {timeout}s: {self.requests}")
                self._cond.wait(remaining)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Proc:
    """A samseg subprocess whose combined output goes to a log file the test can read or dump."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, cwd: Path = REPO) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.output():
                return
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.output()[-4000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: no {needle!r} after {timeout}s:\n{self.output()[-4000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 20) -> int:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._log.close()
        return int(self.popen.returncode)


def wait_http(url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not up after {timeout}s")


class TcpProxy:
    """A loopback TCP proxy in front of one upstream (e.g. the moto server) that can fake network outages.

    Point a client at `proxy.url` (or `proxy.port`) instead of the upstream; the port stays the same across
    modes, so a client configured once sees the outage and the recovery. Modes (switch from any thread):

    - `restore()` (the initial mode): bytes flow both ways.
    - `refuse()`: the way a stopped service looks. The listening socket closes, so new connections get
      `ECONNREFUSED` at once, and every open connection is reset (RST).
    - `drop()`: the way a network partition or a lost route looks. Connections are still accepted (by the
      kernel's backlog) but nothing is forwarded in either direction; bytes are read and discarded, so a
      client waits until its own timeout. Connections open at `drop()` stall the same way.

    `restore()` after `drop()` resets the connections that were stalled (their byte streams lost data, so
    they cannot resume) and forwards again; after `refuse()` it listens again on the same port. Upstream
    state (queues, messages) is never touched. `accepted` counts connections accepted (any mode), which lets
    a test prove its client really went through the proxy; `discarded_bytes` counts what `drop()` swallowed
    (a test can wait for it to grow instead of sleeping). Use it as a context manager, or call `close()`.
    """

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.accepted = 0
        self.discarded_bytes = 0  # bytes read from either side while dropping, and thrown away
        self._lock = threading.Lock()
        self._mode = "pass"
        self._closed = False
        self._listener: socket.socket | None = None
        self._pairs: set[_ProxiedConnection] = set()
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        with self._lock:
            self._listen()

    @property
    def mode(self) -> str:
        """'pass', 'refuse' or 'drop'."""
        return self._mode

    def refuse(self) -> None:
        with self._lock:
            self._mode = "refuse"
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, set()
        if listener is not None:
            _close_quietly(listener)
        for pair in pairs:
            pair.reset()

    def drop(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("TcpProxy is closed")
            self._mode = "drop"
            if self._listener is None:
                self._listen()
            for pair in self._pairs:
                pair.stalled = True

    def restore(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("TcpProxy is closed")
            self._mode = "pass"
            stalled = {p for p in self._pairs if p.stalled}
            self._pairs -= stalled
            if self._listener is None:
                self._listen()
        for pair in stalled:
            pair.reset()

    def close(self) -> None:
        self.refuse()
        with self._lock:
            self._closed = True

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals (called with self._lock held where noted) ------------------------------------------------
    def _listen(self) -> None:  # lock held
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Rebinding the same port after refuse(): another process could take it in between; on loopback in a
        # test run that has not been seen, and it fails loudly here (EADDRINUSE) rather than silently.
        listener.bind((self.host, self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name=f"tcpproxy-{self.port}", daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed by refuse()/close()
            with self._lock:
                self.accepted += 1
                mode = self._mode if self._listener is listener else "refuse"
            if mode == "refuse":
                _reset(client)
                continue
            upstream = None
            if mode == "pass":
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                    upstream.settimeout(None)
                except OSError:
                    _reset(client)  # upstream down: the client sees what it would see without the proxy
                    continue
            pair = _ProxiedConnection(client, upstream, stalled=upstream is None, on_discard=self._discarded)
            with self._lock:
                # The mode may have changed while this connection was being set up: apply the current one.
                current = self._mode if self._listener is listener else "refuse"
                if current == "pass" and upstream is None:
                    current = "refuse"  # accepted while dropping, restored since: reset, as restore() does
                if current != "refuse":
                    pair.stalled = pair.stalled or current == "drop"
                    self._pairs.add(pair)
            if current == "refuse":
                pair.reset()
                continue
            pair.start(self._forget)

    def _discarded(self, count: int) -> None:
        with self._lock:
            self.discarded_bytes += count

    def _forget(self, pair: _ProxiedConnection) -> None:
        with self._lock:
            self._pairs.discard(pair)


class _ProxiedConnection:
    """One client connection (and its upstream connection unless it was accepted while dropping)."""

    def __init__(
        self,
        client: socket.socket,
        upstream: socket.socket | None,
        stalled: bool,
        on_discard: Callable[[int], None],
    ) -> None:
        self.client = client
        self.on_discard = on_discard
        self.upstream = upstream
        self.stalled = stalled  # read and discard instead of forwarding (drop mode)
        self._lock = threading.Lock()
        self._running = 0
        self._closed = False

    def start(self, on_done: Callable[[_ProxiedConnection], None]) -> None:
        directions: list[tuple[socket.socket, socket.socket | None]] = [(self.client, self.upstream)]
        if self.upstream is not None:
            directions.append((self.upstream, self.client))
        self._running = len(directions)
        for src, dst in directions:
            threading.Thread(target=self._pump, args=(src, dst, on_done), daemon=True).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket | None, on_done: Callable[[_ProxiedConnection], None]
    ) -> None:
        clean = False
        try:
            while data := src.recv(65536):
                if self.stalled or dst is None:
                    self.on_discard(len(data))
                else:
                    dst.sendall(data)
            if not self.stalled and dst is not None:
                dst.shutdown(socket.SHUT_WR)  # pass the half-close on; the other direction may go on
                clean = True
        except OSError:
            pass
        if not clean:
            self.reset()  # wakes the other direction's thread too
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self._close(abort=False)
            on_done(self)

    def reset(self) -> None:
        """Abort both sides with RST."""
        self._close(abort=True)

    def _close(self, abort: bool) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for sock in (self.client, self.upstream):
            if sock is not None:
                (_reset if abort else _close_quietly)(sock)


def _reset(sock: socket.socket) -> None:
    """Close with RST (linger 0); shutdown first so a thread blocked in recv() on it wakes up."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    _close_quietly(sock)


def _close_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
