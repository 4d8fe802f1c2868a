"""Download an image the app server points at, as an untrusted input.

`image_url` ultimately comes from end users, so: http(s) only; every hop (redirects included) must
resolve to public addresses unless private networks are allowed (the EC2 metadata service at
169.254.169.254 hands out the worker's IAM credentials) and use a port in SAMSEG_ALLOWED_IMAGE_PORTS
(80 and 443: a public host's admin ports are no business of an image fetch); bytes are streamed under a
cap and an overall deadline; the pixel count is checked from the header before anything is decoded
(decompression bombs). URLs in error messages go through `redact_url`: a presigned URL's query string is
a credential, and these messages reach logs, the callback and GET /jobs/{uuid}.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from samseg.core.errors import JobError
from samseg.core.logs import redact_text, redact_url
from samseg.core.settings import Settings

# samseg enforces SAMSEG_MAX_IMAGE_PIXELS itself, from the header, before decoding; Pillow's own guard
# would answer a different error for the same image depending on its size.
Image.MAX_IMAGE_PIXELS = None

MAX_REDIRECTS = 5
USER_AGENT = "samseg/0.1 (+image fetch)"


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str | None


def check_url(url: str, settings: Settings) -> None:
    """Refuse schemes other than http(s), hosts that resolve to non-public addresses, and ports not allowed."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"}:
        raise JobError("image_url_scheme", f"only http and https image URLs are accepted, not {parts.scheme!r}")
    if not parts.hostname:
        raise JobError("image_url_invalid", "image URL has no host")
    if parts.username or parts.password:
        raise JobError("image_url_invalid", "image URL must not carry credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise JobError("image_url_invalid", f"image URL has an invalid port: {exc}") from exc
    resolve_public(parts.hostname, port, settings)
    check_port(parts.hostname, port, settings)


def check_port(host: str, port: int, settings: Settings) -> None:
    """Only SAMSEG_ALLOWED_IMAGE_PORTS, unless private networks are allowed or the host is allow-listed.

    Checked after the address, so a private address is reported as such whatever its port. Hosts named in
    SAMSEG_ALLOWED_IMAGE_HOSTS are trusted whole (an internal image store on :9000 is the usual reason).
    """
    if settings.allow_private_networks or host.lower() in settings.allowed_image_hosts:
        return
    if port not in settings.allowed_image_ports:
        allowed = ",".join(str(p) for p in settings.allowed_image_ports)
        raise JobError(
            "image_url_port",
            f"port {port} of {host!r} is not an allowed image port ({allowed}); "
            "set SAMSEG_ALLOWED_IMAGE_PORTS to allow it",
        )


def resolve_public(host: str, port: int, settings: Settings) -> list[str]:
    """Every address `host` resolves to, refusing the lot if any is not public (unless allowed)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise JobError("image_host_unresolvable", f"cannot resolve {host!r}: {exc}") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if settings.allow_private_networks or host.lower() in settings.allowed_image_hosts:
        return addresses
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if not _is_public(address):
            raise JobError(
                "image_url_forbidden",
                f"{host!r} resolves to {address}, a non-public address; "
                "set SAMSEG_ALLOW_PRIVATE_NETWORKS=true or SAMSEG_ALLOWED_IMAGE_HOSTS to allow it",
            )
    return addresses


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: IPv4 in the low 32 bits
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765 SIIT: IPv4 in the low 32 bits
# Never global, whatever the IPv4 part, though Python 3.11's `is_global` says they are:
_NEVER_PUBLIC = (
    ipaddress.ip_network("64:ff9b:1::/48"),  # RFC 8215 local-use NAT64: a site's own translator
    ipaddress.ip_network("::/96"),  # IPv4-compatible ::a.b.c.d, deprecated (RFC 4291); includes :: and ::1
)


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Global unicast, and so is any IPv4 address embedded in it (mapped, translated, NAT64, 6to4, Teredo)."""
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in network for network in _NEVER_PUBLIC):
            return False
        embedded: list[ipaddress.IPv4Address] = []
        if address.ipv4_mapped is not None:
            embedded.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            embedded.append(address.sixtofour)
        if address.teredo is not None:
            embedded.extend(address.teredo)
        if address in _NAT64 or address in _IPV4_TRANSLATED:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        return all(_is_public(v4) for v4 in embedded)
    return True


class _GuardedBackend(httpcore.SyncBackend):
    """Resolves and checks the host at connect time and connects to the checked address.

    Checking the URL first and letting the HTTP client resolve again would leave a DNS-rebinding window
    (a name that answers a public address to the check and 169.254.169.254 to the connect).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.aborted = False

    def abort(self) -> None:
        """The overall deadline passed: cut every connection, so even a server trickling bytes stops."""
        with self._lock:
            self.aborted = True
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = resolve_public(host, port, self.settings)
            check_port(host, port, self.settings)  # check_url did too; this is the connection itself
        except JobError as exc:
            raise _Refused(exc) from None
        error: Exception | None = None
        for address in addresses:
            try:
                stream = super().connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
                continue
            with self._lock:
                self._sockets.append(stream.get_extra_info("socket"))
                if self.aborted:
                    self.abort()
            return stream
        raise error or httpcore.ConnectError(f"no address for {host}")


class _Refused(httpcore.ConnectError):
    def __init__(self, error: JobError) -> None:
        super().__init__(error.message)
        self.error = error


def _client(settings: Settings, backend: _GuardedBackend) -> httpx.Client:
    timeout = httpx.Timeout(settings.download_timeout_seconds, connect=min(10.0, settings.download_timeout_seconds))
    transport = httpx.HTTPTransport(retries=0)
    transport._pool._network_backend = backend  # httpx exposes no public hook for this
    return httpx.Client(
        transport=transport, timeout=timeout, follow_redirects=False, headers={"User-Agent": USER_AGENT}
    )


def download_image(url: str, dest: Path, settings: Settings) -> int:
    """Stream `url` to `dest` (≤ SAMSEG_MAX_IMAGE_BYTES, ≤ SAMSEG_DOWNLOAD_TIMEOUT_SECONDS in all)."""
    backend = _GuardedBackend(settings)
    watchdog = threading.Timer(settings.download_timeout_seconds, backend.abort)
    watchdog.daemon = True
    watchdog.start()
    try:
        return _download(url, dest, settings, backend)
    finally:
        watchdog.cancel()


def _download(url: str, dest: Path, settings: Settings, backend: _GuardedBackend) -> int:
    tmp = dest.with_name(dest.name + ".part")
    with _client(settings, backend) as client:
        for _hop in range(MAX_REDIRECTS + 1):
            check_url(url, settings)
            try:
                with client.stream("GET", url) as response:
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise JobError("image_http_error", f"redirect without Location from {redact_url(url)}")
                        url = urljoin(url, location)
                        continue
                    _check_status(response)
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > settings.max_image_bytes:
                        raise JobError("image_too_large", _too_large(int(declared), settings))
                    size = 0
                    with tmp.open("wb") as out:
                        for chunk in response.iter_bytes():  # as they arrive: the cap is checked per read
                            size += len(chunk)
                            if size > settings.max_image_bytes:
                                raise JobError("image_too_large", _too_large(size, settings))
                            out.write(chunk)
                    if backend.aborted:  # the body ended because the watchdog cut it, not because it was complete
                        raise JobError("image_download_timeout", _timed_out(settings))
                    if size == 0:
                        raise JobError("image_empty", "the image URL returned an empty body")
                    tmp.replace(dest)
                    return size
            except httpx.HTTPError as exc:
                raise _download_error(exc, backend, settings) from exc
            finally:
                tmp.unlink(missing_ok=True)
        raise JobError("image_too_many_redirects", f"more than {MAX_REDIRECTS} redirects")


def probe_image(path: Path, settings: Settings) -> ImageInfo:
    """Read only the header, so a 50k x 50k PNG is refused before it is decompressed."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            fmt = image.format
    except UnidentifiedImageError as exc:
        raise JobError("image_invalid", "the downloaded bytes are not an image format samseg can read") from exc
    except Image.DecompressionBombError as exc:
        raise JobError("image_too_many_pixels", f"the image header declares too many pixels: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise JobError("image_invalid", f"cannot read the image header: {exc}") from exc
    if width * height > settings.max_image_pixels:
        raise JobError(
            "image_too_many_pixels",
            f"{width}x{height} is more than SAMSEG_MAX_IMAGE_PIXELS={settings.max_image_pixels} pixels",
        )
    return ImageInfo(width=width, height=height, format=fmt)


def load_rgb(path: Path, settings: Settings) -> npt.NDArray[np.uint8]:
    """Decode to RGB, applying EXIF orientation so masks line up with the image as browsers show it."""
    probe_image(path, settings)
    try:
        with Image.open(path) as image:
            image.load()
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise JobError("image_invalid", f"the image cannot be decoded (truncated or corrupt): {exc}") from exc
    return np.asarray(rgb, dtype=np.uint8)


def _download_error(exc: httpx.HTTPError, backend: _GuardedBackend, settings: Settings) -> JobError:
    if backend.aborted or isinstance(exc, httpx.TimeoutException):
        return JobError("image_download_timeout", _timed_out(settings))
    if isinstance(exc, httpx.ConnectError):
        if isinstance(exc.__context__, _Refused):
            return exc.__context__.error
        return JobError("image_download_failed", redact_text(f"cannot connect to the image host: {exc}"))
    return JobError("image_download_failed", redact_text(f"cannot download the image: {exc!r}"))


def _check_status(response: httpx.Response) -> None:
    if response.status_code == 404:
        raise JobError("image_not_found", f"the image URL answered 404 Not Found ({redact_url(str(response.url))})")
    if response.status_code != 200:
        raise JobError("image_http_error", f"the image URL answered HTTP {response.status_code}")


def _too_large(size: int, settings: Settings) -> str:
    return f"the image is larger than SAMSEG_MAX_IMAGE_BYTES={settings.max_image_bytes} bytes (got {size}+)"


def _timed_out(settings: Settings) -> str:
    return f"the download took longer than SAMSEG_DOWNLOAD_TIMEOUT_SECONDS={settings.download_timeout_seconds}"
