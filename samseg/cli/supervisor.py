"""Child processes for `samseg up`: start each in its own session, stop them in order, and loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    # Infrastructure the others use (the local SQS): stopped only once they have exited, so that no worker
    # polls a queue that is already gone while it shuts down (an `sqs_poll_failed` warning on every Ctrl-C).
    stop_last: bool


class Supervisor:
    """Starts children in their own process groups (a terminal's Ctrl-C reaches only `samseg up`, which then
    stops them in order): first every child started without `stop_last`, together, then the rest."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.children: list[Child] = []

    def start(
        self, name: str, argv: list[str], env: Mapping[str, str] | None = None, *, stop_last: bool = False
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, env={**self.env, **(env or {})}, start_new_session=True)
        self.children.append(Child(name, proc, stop_last))
        print(f"started {name} (pid {proc.pid})", flush=True)
        return proc

    def exited(self) -> tuple[str, int] | None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                return child.name, code
        return None

    def stop(self, timeout: float = 30, last_timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL past the timeout: the services first, then the infrastructure they use."""
        self._stop_group([c for c in self.children if not c.stop_last], timeout)
        self._stop_group([c for c in self.children if c.stop_last], last_timeout)

    @staticmethod
    def _stop_group(children: list[Child], timeout: float) -> None:
        for child in reversed(children):
            if child.proc.poll() is None:
                os.killpg(child.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in reversed(children):
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_taken(host: str, port: int) -> bool:
    """Whether a server already listens there (SO_REUSEADDR, as servers bind: TIME_WAIT leftovers are no bar)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False
