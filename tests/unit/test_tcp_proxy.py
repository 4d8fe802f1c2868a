"""tests.support.TcpProxy, the network-outage helper the readiness and chaos tests rely on: each mode does
what its docstring says against a real echo server on loopback, including while modes flip under load."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from tests.support import LoopbackServer, Route, TcpProxy


class EchoServer:
    """Echoes every byte back and keeps what it received, per connection."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.received: list[bytearray] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            buf = bytearray()
            self.received.append(buf)
            threading.Thread(target=self._echo, args=(conn, buf), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket, buf: bytearray) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    buf.extend(data)
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.01)


def _round_trip(port: int, payload: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def test_pass_forwards_both_ways(echo):
    with TcpProxy("127.0.0.1", echo.port) as proxy:
        assert proxy.mode == "pass"
        assert _round_trip(proxy.port, b"hello" * 10000) == b"hello" * 10000
        assert proxy.accepted == 1


def test_refuse_refuses_new_and_resets_open_connections_then_restore_listens_on_the_same_port(echo):
    with TcpProxy("127.0.0.1", echo.port) as proxy:
        port = proxy.port
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"a")
        assert sock.recv(1) == b"a"
        proxy.refuse()
        with pytest.raises(OSError) as reset:  # RST: ConnectionResetError, or EOF turned into an error below
            if sock.recv(1) == b"":
                raise ConnectionResetError("closed")
        assert isinstance(reset.value, ConnectionError)
        sock.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        proxy.restore()
        assert proxy.port == port and _round_trip(port, b"back") == b"back"


def test_drop_accepts_but_forwards_nothing_and_restore_resets_the_stalled(echo):
    with TcpProxy("127.0.0.1", echo.port) as proxy:
        before = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)  # open before the outage
        before.sendall(b"x")
        assert before.recv(1) == b"x"
        proxy.drop()
        during = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)  # connect still succeeds
        before.sendall(b"lost-1")
        during.sendall(b"lost-2")
        _wait(lambda: proxy.discarded_bytes >= len(b"lost-1lost-2"))  # the proxy read and dropped both
        assert b"lost" not in b"".join(echo.received)
        proxy.restore()
        for sock in (before, during):
            sock.settimeout(5)
            with pytest.raises(ConnectionError):
                if sock.recv(1) == b"":
                    raise ConnectionResetError("closed")
            sock.close()
        assert _round_trip(proxy.port, b"again") == b"again"


def test_http_through_the_proxy_and_an_outage_seen_by_a_client():
    server = LoopbackServer()
    server.routes["/ok"] = Route(body=b"ok")
    try:
        with TcpProxy("127.0.0.1", server.port) as proxy:
            assert httpx.get(f"{proxy.url}/ok", timeout=5).text == "ok"
            proxy.refuse()
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{proxy.url}/ok", timeout=5)
            proxy.drop()
            with pytest.raises(httpx.ReadTimeout):
                httpx.get(f"{proxy.url}/ok", timeout=httpx.Timeout(5, read=0.5))
            proxy.restore()
            assert httpx.get(f"{proxy.url}/ok", timeout=5).text == "ok"
    finally:
        server.close()


def test_modes_flip_safely_under_concurrent_traffic(echo):
    errors: list[BaseException] = []
    original_hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # an exception in a proxy thread
    try:
        with TcpProxy("127.0.0.1", echo.port) as proxy:
            stop = threading.Event()
            completed = [0]

            def client() -> None:
                while not stop.is_set():
                    try:
                        if _round_trip(proxy.port, b"ping" * 100, timeout=0.3) == b"ping" * 100:
                            completed[0] += 1
                    except OSError:
                        pass  # expected during refuse/drop

            threads = [threading.Thread(target=client) for _ in range(6)]
            for t in threads:
                t.start()
            for mode in ["refuse", "restore", "drop", "restore", "drop", "refuse", "restore"] * 3:
                getattr(proxy, mode)()
                time.sleep(0.05)  # let traffic run in this mode (a pacing delay, nothing is asserted on it)
            stop.set()
            for t in threads:
                t.join(10)
            assert proxy.mode == "pass"
            assert _round_trip(proxy.port, b"after the storm") == b"after the storm"
            assert completed[0] > 0
    finally:
        threading.excepthook = original_hook
    assert errors == []
