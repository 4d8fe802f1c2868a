"""`samseg up`'s supervisor stops the services before the infrastructure they use (the local SQS).

Real child processes: a loopback TCP server stands in for the SQS emulator, and a "worker" that, when told to
stop, still needs it for a moment (as a Celery worker finishing its last poll does) and writes down whether
it was still there.
"""

from __future__ import annotations

import sys
import textwrap
import time

from samseg.cli.supervisor import Supervisor, free_port, wait_port

SERVER = textwrap.dedent(
    """
    import socket, sys
    server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    while True:
        server.accept()[0].close()
    """
)

WORKER = textwrap.dedent(
    """
    import pathlib, signal, socket, sys, time

    def on_term(signum, frame):
        time.sleep(0.3)  # a poll still in flight when the stop comes
        try:
            socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).close()
            seen = "reachable"
        except OSError:
            seen = "gone"
        pathlib.Path(sys.argv[2]).write_text(seen)
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    pathlib.Path(sys.argv[2] + ".started").touch()
    while True:
        time.sleep(1)
    """
)


def test_services_stop_before_the_infrastructure(tmp_path):
    port = free_port()
    report = tmp_path / "worker-saw"
    supervisor = Supervisor({})
    try:
        supervisor.start("sqs", [sys.executable, "-c", SERVER, str(port)], stop_last=True)
        assert wait_port("127.0.0.1", port, 30)
        supervisor.start("worker", [sys.executable, "-c", WORKER, str(port), str(report)])
        deadline = time.monotonic() + 30
        while not (tmp_path / "worker-saw.started").exists():  # its SIGTERM handler is installed
            assert supervisor.exited() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        supervisor.stop(timeout=20, last_timeout=5)
    assert report.read_text() == "reachable"
    assert all(child.proc.returncode is not None for child in supervisor.children)
