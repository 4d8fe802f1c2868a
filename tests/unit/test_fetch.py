"""samseg.transfer.image_fetch: URL policy (SSRF), bounded download, header-only probe and decoding.

Every request in this module goes to 127.0.0.1. check_url on private or link-local literals only resolves
them (getaddrinfo of a literal makes no network traffic), and a guard on socket.connect fails any test that
would open a connection to a non-loopback address.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from samseg.core.errors import JobError
from samseg.core.settings import Settings
from samseg.transfer.image_fetch import MAX_REDIRECTS, ImageInfo, check_url, download_image, load_rgb, probe_image
from tests.support import LoopbackServer, Route, free_port, scene_png

# Pillow's own decompression-bomb limit, as shipped (load_rgb sets the global to None as a side effect).
PILLOW_DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def hermetic(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.upper().startswith(("SAMSEG_", "AWS_")) or key.lower() in {
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "no_proxy",
        }:
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    # load_rgb mutates PIL.Image.MAX_IMAGE_PIXELS; put it back after each test.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch) -> Iterator[list[object]]:
    """Refuse (and record) any attempt to connect to a non-loopback address from this module's tests."""
    attempts: list[object] = []
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> None:
        if isinstance(address, tuple) and not ipaddress.ip_address(str(address[0]).split("%")[0]).is_loopback:
            attempts.append(address)
            raise ConnectionRefusedError(f"test guard: no connections to {address!r}")
        real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield attempts
    assert attempts == [], f"a test tried to connect outside loopback: {attempts}"


@pytest.fixture(scope="module")
def _shared_server() -> Iterator[LoopbackServer]:
    server = LoopbackServer()  # one per module: close() waits out serve_forever's 0.5 s poll
    yield server
    server.close()


@pytest.fixture
def server(_shared_server) -> LoopbackServer:
    _shared_server.routes.clear()
    _shared_server.requests.clear()
    _shared_server.default = Route(status=404, body=b"not found")
    return _shared_server


def make_settings(**overrides) -> Settings:
    return Settings(_env_file=None, **overrides)


LOOPBACK = dict(allow_private_networks=True)


class RawServer:
    """A loopback HTTP server whose GET handler is a plain function (for streaming and misbehaving)."""

    def __init__(self, handle: Callable[[BaseHTTPRequestHandler], None]) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with contextlib.suppress(OSError):  # the client gave up: expected in these tests
                    handle(self)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def raw_server() -> Iterator[Callable[[Callable[[BaseHTTPRequestHandler], None]], RawServer]]:
    servers: list[RawServer] = []

    def start(handle: Callable[[BaseHTTPRequestHandler], None]) -> RawServer:
        servers.append(RawServer(handle))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def code_of(call: Callable[[], object]) -> str:
    with pytest.raises(JobError) as info:
        call()
    return info.value.code


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir())


# --- images -------------------------------------------------------------------------------------------


def png_bytes(width: int, height: int, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A real 4x4 PNG whose IHDR is rewritten to claim width x height (CRC recomputed): a bomb's header."""
    data = bytearray(png_bytes(4, 4))
    assert data[12:16] == b"IHDR"
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def jpeg_bytes(array: np.ndarray, **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95, **save_args)
    return buffer.getvalue()


# --- check_url: schemes and shapes --------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/cat.png",
        "gopher://example.com:70/_GET",
        "data:image/png;base64,iVBORw0KGgo=",
        "javascript:alert(1)",
        "s3://bucket/cat.png",
        "//example.com/cat.png",
        "example.com/cat.png",
        "",
    ],
)
@pytest.mark.parametrize("permissive", [False, True])
def test_non_http_schemes_are_refused(url, permissive):
    settings = make_settings(allow_private_networks=permissive)
    with pytest.raises(JobError) as info:
        check_url(url, settings)
    assert info.value.code == "image_url_scheme"
    assert "http and https" in info.value.message


@pytest.mark.parametrize("url", ["http:///cat.png", "https://:443/cat.png"])
def test_url_without_host(url):
    assert code_of(lambda: check_url(url, make_settings(**LOOPBACK))) == "image_url_invalid"


@pytest.mark.parametrize("url", ["http://user:pw@example.com/cat.png", "https://token@example.com/cat.png"])
def test_url_with_credentials(url):
    assert code_of(lambda: check_url(url, make_settings(**LOOPBACK))) == "image_url_invalid"


# --- check_url: address policy ------------------------------------------------------------------------

NON_PUBLIC = [
    "http://127.0.0.1/cat.png",
    "http://127.0.0.1:8080/cat.png",
    "http://169.254.169.254/latest/meta-data",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",  # carrier-grade NAT
    "http://0.0.0.0/",
    "http://[::1]/",
    "http://[::]/",
    "http://[fe80::1]/",
    "http://[fd00:ec2::254]/",  # the EC2 metadata service over IPv6
    "http://[::ffff:169.254.169.254]/",  # IPv4-mapped
    "http://localhost/cat.png",
    "http://LocalHost/cat.png",
    "http://2130706433/",  # 127.0.0.1 as one decimal number
    "http://127.1/",
    "https://[::1]:8443/",
]


@pytest.mark.parametrize("url", NON_PUBLIC)
def test_non_public_addresses_are_refused_by_default(url):
    with pytest.raises(JobError) as info:
        check_url(url, make_settings())
    assert info.value.code == "image_url_forbidden"
    assert "SAMSEG_ALLOW_PRIVATE_NETWORKS" in info.value.message


@pytest.mark.parametrize("url", NON_PUBLIC)
def test_non_public_addresses_are_allowed_when_configured(url):
    assert check_url(url, make_settings(allow_private_networks=True)) is None


def test_allowed_image_hosts_lets_named_hosts_through(monkeypatch):
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host == "images.internal":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    # Without the allow-list the private address is refused ...
    assert code_of(lambda: check_url("https://images.internal/cat.png", make_settings())) == "image_url_forbidden"
    settings = make_settings(allowed_image_hosts=["localhost", "images.internal"])
    # ... with it, the named hosts pass whatever they resolve to.
    check_url("http://localhost/cat.png", settings)
    check_url("http://LocalHost:9000/cat.png", settings)  # host names compare case-insensitively
    check_url("https://images.internal/cat.png", settings)
    # Only the named host: the same address under another name is still refused.
    assert code_of(lambda: check_url("http://127.0.0.1/cat.png", settings)) == "image_url_forbidden"
    assert code_of(lambda: check_url("http://169.254.169.254/", settings)) == "image_url_forbidden"


def test_allowed_image_hosts_from_the_environment(monkeypatch):
    monkeypatch.setenv("SAMSEG_ALLOWED_IMAGE_HOSTS", "LocalHost")
    check_url("http://localhost/cat.png", Settings(_env_file=None))


def test_public_literal_address_passes():
    # Only resolved, never contacted.
    check_url("http://93.184.216.34/cat.png", make_settings())
    check_url("https://[2606:4700:4700::1111]/cat.png", make_settings())


def test_host_with_one_private_address_among_public_ones_is_refused(monkeypatch):
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host == "mixed.test":
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port)),
            ]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with pytest.raises(JobError) as info:
        check_url("https://mixed.test/cat.png", make_settings())
    assert info.value.code == "image_url_forbidden"
    assert "10.1.2.3" in info.value.message


def test_invalid_port():
    assert code_of(lambda: check_url("http://127.0.0.1:99999/cat.png", make_settings(**LOOPBACK))) == (
        "image_url_invalid"
    )


def test_unresolvable_host(monkeypatch):
    def fake(host, port, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    assert code_of(lambda: check_url("http://no-such-host.test/cat.png", make_settings())) == "image_host_unresolvable"


@pytest.mark.parametrize(
    "url", ["http://[64:ff9b::a9fe:a9fe]/", "http://[64:ff9b::a00:1]/", "http://[2002:a9fe:a9fe::1]/"]
)
def test_ipv6_translations_of_private_ipv4_are_refused(url):
    assert code_of(lambda: check_url(url, make_settings())) == "image_url_forbidden"


@pytest.mark.parametrize(
    "url",
    [
        "http://[64:ff9b:1::a9fe:a9fe]/",  # RFC 8215 local-use NAT64, 169.254.169.254 at the end
        "http://[64:ff9b:1:a9fe:a9:fe00::]/",  # ... and in RFC 6052's /48 layout
        "http://[64:ff9b:1::5db8:d822]/",  # local-use NAT64 is a site's own translator, whatever it embeds
        "http://[::a9fe:a9fe]/",  # IPv4-compatible ::169.254.169.254 (deprecated ::/96)
        "http://[::169.254.169.254]/",
        "http://[::7f00:1]/",  # ::127.0.0.1
        "http://[::a00:1]/",  # ::10.0.0.1
        "http://[::5db8:d822]/",  # ::93.184.216.34: no IPv4-compatible address is public
        "http://[::ffff:0:a9fe:a9fe]/",  # RFC 2765 IPv4-translated ::ffff:0:169.254.169.254
    ],
)
def test_forms_python_311_calls_global_are_refused(url):
    # Python 3.11's ipaddress says each of these `is_global` (later versions fix some): samseg checks itself.
    with pytest.raises(JobError) as info:
        check_url(url, make_settings())
    assert info.value.code == "image_url_forbidden"


def test_ipv4_translated_with_a_public_address_passes():
    check_url("http://[::ffff:0:5db8:d822]/cat.png", make_settings())  # only resolved, never contacted


# --- check_url: ports ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["http://93.184.216.34:8080/cat.png", "https://93.184.216.34:8443/cat.png", "http://93.184.216.34:22/"]
)
def test_ports_outside_the_allowed_list_are_refused(url):
    with pytest.raises(JobError) as info:
        check_url(url, make_settings())
    assert info.value.code == "image_url_port"
    assert "SAMSEG_ALLOWED_IMAGE_PORTS" in info.value.message and "80,443" in info.value.message


@pytest.mark.parametrize(
    "url",
    [
        "http://93.184.216.34/cat.png",
        "http://93.184.216.34:80/",
        "https://93.184.216.34:443/",
        "https://[2606:4700::1]/",
    ],
)
def test_default_ports_pass(url):
    check_url(url, make_settings())


def test_allowed_image_ports_setting(monkeypatch):
    monkeypatch.setenv("SAMSEG_ALLOWED_IMAGE_PORTS", "443,8443")
    settings = Settings(_env_file=None)
    check_url("https://93.184.216.34:8443/cat.png", settings)
    check_url("https://93.184.216.34/cat.png", settings)
    assert code_of(lambda: check_url("http://93.184.216.34/cat.png", settings)) == "image_url_port"  # 80 now out


def test_private_networks_and_allow_listed_hosts_lift_the_port_limit(monkeypatch):
    check_url("http://127.0.0.1:9000/cat.png", make_settings(allow_private_networks=True))
    check_url("http://93.184.216.34:9000/cat.png", make_settings(allow_private_networks=True))
    allow_listed = make_settings(allowed_image_hosts=["localhost"])
    check_url("http://localhost:9000/cat.png", allow_listed)
    assert code_of(lambda: check_url("http://93.184.216.34:9000/", allow_listed)) == "image_url_port"


def test_a_private_address_is_reported_as_such_on_any_port():
    assert code_of(lambda: check_url("http://169.254.169.254:8080/", make_settings())) == "image_url_forbidden"


def test_redirect_to_a_port_not_allowed_is_refused_before_connecting(server, tmp_path, loopback_only, monkeypatch):
    """Every hop's port is checked: a public name that redirects to its own :2375 is stopped there."""
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host == "images.example":  # a "public" host that is really this loopback server
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    server.routes["/r"] = Route(302, headers={"Location": "http://93.184.216.34:2375/containers/json"})
    settings = make_settings(allowed_image_hosts=["images.example"])
    dest = tmp_path / "img"
    assert code_of(lambda: download_image(f"http://images.example:{server.port}/r", dest, settings)) == (
        "image_url_port"
    )
    assert [r.path for r in server.requests] == ["/r"]
    assert loopback_only == []


def test_the_connection_itself_checks_the_port(tmp_path):
    """Defence in depth: the connect-time guard refuses a port even if check_url were bypassed."""
    from samseg.transfer.image_fetch import _client, _GuardedBackend, _Refused

    settings = make_settings()
    backend = _GuardedBackend(settings)
    with _client(settings, backend) as client, pytest.raises(httpx.ConnectError) as info:
        client.get("http://93.184.216.34:8080/cat.png")
    refused = info.value.__context__
    assert isinstance(refused, _Refused) and refused.error.code == "image_url_port"


# --- URLs in error messages ---------------------------------------------------------------------------


def test_error_messages_carry_no_query_string(server, tmp_path):
    server.routes["/missing.png"] = Route(404)
    url = server.url + "/missing.png?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeef#frag"
    with pytest.raises(JobError) as info:
        download_image(url, tmp_path / "img", make_settings(**LOOPBACK))
    assert info.value.code == "image_not_found"
    assert server.url + "/missing.png" in info.value.message
    assert "AKIAEXAMPLE" not in info.value.message and "deadbeef" not in info.value.message
    server.routes["/r"] = Route(302)
    with pytest.raises(JobError) as info:
        download_image(server.url + "/r?token=hunter2-secret", tmp_path / "img", make_settings(**LOOPBACK))
    assert info.value.code == "image_http_error" and "hunter2-secret" not in info.value.message


# --- download_image -----------------------------------------------------------------------------------


def test_download_writes_the_bytes(server, tmp_path):
    image = scene_png()
    server.routes["/cat.png"] = Route(200, image, {"Content-Type": "image/png"})
    dest = tmp_path / "source.img"
    size = download_image(server.url + "/cat.png?v=1", dest, make_settings(**LOOPBACK))
    assert size == len(image)
    assert dest.read_bytes() == image
    assert leftovers(dest) == ["source.img"]  # no .part file
    request = server.requests[0]
    assert request.method == "GET"
    assert request.path == "/cat.png?v=1"
    assert {k.lower(): v for k, v in request.headers.items()}["user-agent"].startswith("samseg/")


def test_download_of_exactly_the_limit_is_fine(server, tmp_path):
    server.routes["/img"] = Route(200, b"x" * 1000)
    assert (
        download_image(server.url + "/img", tmp_path / "img", make_settings(max_image_bytes=1000, **LOOPBACK)) == 1000
    )


def test_download_replaces_an_older_file(server, tmp_path):
    dest = tmp_path / "img"
    dest.write_bytes(b"stale")
    server.routes["/img"] = Route(200, b"fresh bytes")
    download_image(server.url + "/img", dest, make_settings(**LOOPBACK))
    assert dest.read_bytes() == b"fresh bytes"


@pytest.mark.parametrize(
    ("status", "code"),
    [(404, "image_not_found"), (500, "image_http_error"), (403, "image_http_error"), (204, "image_http_error")],
)
def test_http_errors(server, tmp_path, status, code):
    server.routes["/img"] = Route(status, b"" if status == 204 else b"error page")
    dest = tmp_path / "img"
    assert code_of(lambda: download_image(server.url + "/img", dest, make_settings(**LOOPBACK))) == code
    assert leftovers(dest) == []


def test_loopback_is_refused_without_the_opt_in(server, tmp_path):
    server.routes["/img"] = Route(200, b"data")
    dest = tmp_path / "img"
    assert code_of(lambda: download_image(server.url + "/img", dest, make_settings())) == "image_url_forbidden"
    assert server.requests == []


def test_too_large_by_content_length(server, tmp_path):
    server.routes["/big"] = Route(200, b"x" * 5000)
    dest = tmp_path / "img"
    with pytest.raises(JobError) as info:
        download_image(server.url + "/big", dest, make_settings(max_image_bytes=1000, **LOOPBACK))
    assert info.value.code == "image_too_large"
    assert "5000" in info.value.message
    assert leftovers(dest) == []


def _stream_chunked(total: int, chunk: int = 10_000):
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        sent = 0
        while sent < total:
            piece = b"y" * min(chunk, total - sent)
            h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        h.wfile.write(b"0\r\n\r\n")

    return handle


@pytest.mark.parametrize("total", [5_000, 300_000])
def test_too_large_without_content_length(raw_server, tmp_path, total):
    srv = raw_server(_stream_chunked(total))
    dest = tmp_path / "img"
    with pytest.raises(JobError) as info:
        download_image(srv.url + "/stream", dest, make_settings(max_image_bytes=1000, **LOOPBACK))
    assert info.value.code == "image_too_large"
    assert leftovers(dest) == []


def test_chunked_download_within_the_limit(raw_server, tmp_path):
    srv = raw_server(_stream_chunked(150_000))
    dest = tmp_path / "img"
    assert download_image(srv.url + "/stream", dest, make_settings(**LOOPBACK)) == 150_000
    assert dest.read_bytes() == b"y" * 150_000


def test_redirects_are_followed_and_checked(server, tmp_path):
    server.routes["/start"] = Route(302, headers={"Location": "/middle"})
    server.routes["/middle"] = Route(301, headers={"Location": server.url + "/final.png"})
    server.routes["/final.png"] = Route(200, b"the image")
    dest = tmp_path / "img"
    assert download_image(server.url + "/start", dest, make_settings(**LOOPBACK)) == len(b"the image")
    assert dest.read_bytes() == b"the image"
    assert [r.path for r in server.requests] == ["/start", "/middle", "/final.png"]


def test_redirect_loop(server, tmp_path):
    server.routes["/a"] = Route(302, headers={"Location": "/b"})
    server.routes["/b"] = Route(302, headers={"Location": "/a"})
    dest = tmp_path / "img"
    assert (
        code_of(lambda: download_image(server.url + "/a", dest, make_settings(**LOOPBACK)))
        == "image_too_many_redirects"
    )
    assert len(server.requests) == MAX_REDIRECTS + 1
    assert leftovers(dest) == []


def test_redirect_without_location(server, tmp_path):
    server.routes["/r"] = Route(302)
    assert code_of(lambda: download_image(server.url + "/r", tmp_path / "img", make_settings(**LOOPBACK))) == (
        "image_http_error"
    )


@pytest.mark.parametrize("location", ["ftp://127.0.0.1/cat.png", "file:///etc/passwd", "gopher://127.0.0.1:70/x"])
def test_redirect_to_another_scheme_is_refused(server, tmp_path, location):
    server.routes["/r"] = Route(302, headers={"Location": location})
    dest = tmp_path / "img"
    assert code_of(lambda: download_image(server.url + "/r", dest, make_settings(**LOOPBACK))) == "image_url_scheme"
    assert leftovers(dest) == []


@pytest.mark.parametrize(
    "location", ["http://169.254.169.254/latest/meta-data/iam/", "http://10.0.0.1/x", "http://[::1]/x"]
)
def test_redirect_to_a_private_address_is_refused_before_connecting(server, tmp_path, location, loopback_only):
    # The first hop is allowed by name only; the redirect target must pass the policy on its own.
    server.routes["/r"] = Route(302, headers={"Location": location})
    settings = make_settings(allowed_image_hosts=["127.0.0.1"])
    dest = tmp_path / "img"
    assert code_of(lambda: download_image(server.url + "/r", dest, settings)) == "image_url_forbidden"
    assert [r.path for r in server.requests] == ["/r"]
    assert loopback_only == []


def test_empty_body(server, tmp_path):
    server.routes["/empty"] = Route(200, b"")
    dest = tmp_path / "img"
    assert code_of(lambda: download_image(server.url + "/empty", dest, make_settings(**LOOPBACK))) == "image_empty"
    assert leftovers(dest) == []


def test_connection_refused(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/img"
    assert code_of(lambda: download_image(url, tmp_path / "img", make_settings(**LOOPBACK))) == "image_download_failed"


def test_stalled_server_times_out(raw_server, tmp_path):
    def stall(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        h.wfile.write(b"partial")
        time.sleep(3)

    srv = raw_server(stall)
    dest = tmp_path / "img"
    start = time.monotonic()
    with pytest.raises(JobError) as info:
        download_image(srv.url + "/img", dest, make_settings(download_timeout_seconds=1, **LOOPBACK))
    assert info.value.code == "image_download_timeout"
    assert time.monotonic() - start < 2.5
    assert leftovers(dest) == []


def _trickle(prefix: bytes, count: int, suffix: bytes, every: float = 0.3):
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.wfile.write(prefix)
        for _ in range(count):
            time.sleep(every)
            h.wfile.write(b"x")
        h.wfile.write(suffix)

    return handle


def test_trickled_body_hits_the_overall_deadline(raw_server, tmp_path):
    # 12 bytes, one every 0.3 s (3.6 s in all), each read well inside the 1 s per-read timeout.
    srv = raw_server(_trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", 12, b""))
    start = time.monotonic()
    with pytest.raises(JobError) as info:
        download_image(srv.url + "/img", tmp_path / "img", make_settings(download_timeout_seconds=1, **LOOPBACK))
    elapsed = time.monotonic() - start
    assert info.value.code == "image_download_timeout"
    assert elapsed < 2.5, f"the 1 s deadline was enforced only after {elapsed:.1f} s"


def test_trickled_headers_hit_the_overall_deadline(raw_server, tmp_path):
    srv = raw_server(_trickle(b"HTTP/1.1 200 OK\r\nX-Slow: ", 12, b"\r\nContent-Length: 3\r\n\r\nabc"))
    start = time.monotonic()
    with pytest.raises(JobError) as info:
        download_image(srv.url + "/img", tmp_path / "img", make_settings(download_timeout_seconds=1, **LOOPBACK))
    elapsed = time.monotonic() - start
    assert info.value.code == "image_download_timeout"
    assert elapsed < 2.5, f"the 1 s deadline was enforced only after {elapsed:.1f} s"


def test_dns_rebinding_cannot_reach_a_private_address(server, tmp_path, monkeypatch):
    """The address that is checked must be the address that is connected to."""
    server.routes["/img"] = Route(200, b"internal secret")
    real = socket.getaddrinfo
    answers: list[str] = []

    def rebinding(host, port, *args, **kwargs):
        if host != "rebind.test":
            return real(host, port, *args, **kwargs)
        # First answer public (what the policy sees), every later one loopback (what the connection gets).
        address = "93.184.216.34" if not answers else "127.0.0.1"
        answers.append(address)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://rebind.test:{server.port}/img"
    with pytest.raises(JobError) as info:
        download_image(url, tmp_path / "img", make_settings(allowed_image_ports=[server.port]))
    assert info.value.code == "image_url_forbidden"
    assert answers[0] == "93.184.216.34"  # the policy saw a public address first ...
    assert server.requests == []  # ... and the private one was never contacted


# --- probe_image --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, not an image", b"<html><body>404</body></html>", b"\x89PNG\r\n\x1a\n", os.urandom(4096)],
)
def test_probe_of_non_image_bytes(tmp_path, data):
    path = tmp_path / "source.img"
    path.write_bytes(data)
    assert code_of(lambda: probe_image(path, make_settings())) == "image_invalid"


def test_probe_reads_size_and_format(tmp_path):
    path = tmp_path / "source.img"
    path.write_bytes(png_bytes(37, 21, "RGB"))
    assert probe_image(path, make_settings()) == ImageInfo(width=37, height=21, format="PNG")
    path.write_bytes(jpeg_bytes(np.zeros((21, 37, 3), dtype=np.uint8)))
    assert probe_image(path, make_settings()) == ImageInfo(width=37, height=21, format="JPEG")


def test_probe_pixel_limit_boundary(tmp_path):
    path = tmp_path / "source.img"
    path.write_bytes(png_bytes(40, 25))
    assert probe_image(path, make_settings(max_image_pixels=1000)).width == 40
    assert code_of(lambda: probe_image(path, make_settings(max_image_pixels=999))) == "image_too_many_pixels"


def test_probe_refuses_a_big_header_without_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(10_000, 5_000))  # 50 Mpx > the 40 Mpx default; the pixel data is 4x4
    with pytest.raises(JobError) as info:
        probe_image(path, make_settings())
    assert info.value.code == "image_too_many_pixels"
    assert "10000x5000" in info.value.message


@pytest.mark.parametrize(
    "pillow_limit",
    [
        None,  # samseg's import-time setting
        pytest.param(
            PILLOW_DEFAULT_MAX_PIXELS,
        ),
    ],
    ids=["after-load_rgb", "fresh-process"],
)
def test_probe_refuses_a_bomb_header_as_too_many_pixels(tmp_path, monkeypatch, pillow_limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(50_000, 50_000))
    with pytest.raises(JobError) as info:
        probe_image(path, make_settings())
    assert info.value.code == "image_too_many_pixels", info.value.message


# --- load_rgb -----------------------------------------------------------------------------------------


def test_load_rgb_of_png(tmp_path):
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (21, 37, 4), dtype=np.uint8)
    path = tmp_path / "source.img"
    Image.fromarray(rgba, "RGBA").save(path, format="PNG")
    array = load_rgb(path, make_settings())
    assert array.shape == (21, 37, 3)
    assert array.dtype == np.uint8
    np.testing.assert_array_equal(array, rgba[..., :3])


def test_load_rgb_of_grayscale(tmp_path):
    gray = np.arange(60, dtype=np.uint8).reshape(6, 10)
    path = tmp_path / "source.img"
    Image.fromarray(gray, "L").save(path, format="PNG")
    array = load_rgb(path, make_settings())
    assert array.shape == (6, 10, 3)
    for channel in range(3):
        np.testing.assert_array_equal(array[..., channel], gray)


def test_load_rgb_of_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(5)
    data = jpeg_bytes(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    path = tmp_path / "source.img"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(JobError) as info:
        load_rgb(path, make_settings())
    assert info.value.code == "image_invalid"


def test_load_rgb_refuses_too_many_pixels(tmp_path):
    path = tmp_path / "source.img"
    path.write_bytes(png_bytes(50, 50))
    assert code_of(lambda: load_rgb(path, make_settings(max_image_pixels=2499))) == "image_too_many_pixels"


def test_load_rgb_applies_exif_orientation(tmp_path):
    # Stored 60 wide x 40 high with a red block in the stored top-left corner; orientation 6 means
    # "rotate 90 degrees clockwise to display", so the displayed image is 40 wide x 60 high with the red
    # block in its top-right corner.
    stored = np.full((40, 60, 3), 255, dtype=np.uint8)
    stored[:16, :16] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "source.img"
    path.write_bytes(jpeg_bytes(stored, exif=exif.tobytes()))
    with Image.open(path) as image:
        assert image.size == (60, 40)
        assert image.getexif()[0x0112] == 6

    array = load_rgb(path, make_settings())

    assert array.shape == (60, 40, 3)
    expected = np.rot90(stored, k=-1)  # clockwise
    assert expected.shape == array.shape
    top_right = array[2:12, -12:-2].reshape(-1, 3).mean(axis=0)
    top_left = array[2:12, 2:12].reshape(-1, 3).mean(axis=0)
    assert top_right[0] > 200 and top_right[1] < 60 and top_right[2] < 60  # red
    assert top_left.min() > 200  # white
    assert np.abs(array.astype(int) - expected.astype(int)).mean() < 8  # JPEG noise only
