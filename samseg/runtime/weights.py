"""SAM-2 checkpoints: the pinned manifest, a verified downloader and a once-per-host `ensure`.

A checkpoint only ever appears at its destination whole and verified: bytes stream into a temporary
file beside it, are hashed on the way, and are renamed into place only after size and SHA-256 match.
Anything else (mismatch, a dropped connection, a timeout, Ctrl-C) removes the temporary file, so a
worker never loads half a checkpoint and a rerun starts clean.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import filelock
import httpx
import structlog
from tqdm import tqdm

from samseg.core.settings import Settings

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

# Resolved from the package, not the working directory: editable installs and the Docker image both
# carry the repository tree, so weights/ sits next to samseg/.
DEFAULT_MANIFEST = Path(__file__).resolve().parent / "weights_manifest.json"

# Long enough for a slow link to fetch the 860 MiB large model while another worker waits on it.
DEFAULT_LOCK_TIMEOUT = 3600.0

_CHUNK = 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


class WeightsError(RuntimeError):
    """A checkpoint could not be obtained or verified; the message says what to do by hand."""


@dataclass(frozen=True)
class ModelEntry:
    """One manifest row. `size`/`sha256` are None only where no trustworthy value was published."""

    name: str
    url: str
    size: int | None
    sha256: str | None
    config: str
    parameters: int | None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def url_for(self, base_url: str | None = None) -> str:
        """Meta's URL, or the same file name under a mirror (SAMSEG_WEIGHTS_BASE_URL)."""
        return f"{base_url.rstrip('/')}/{self.filename}" if base_url else self.url


def load_manifest(path: Path | None = None) -> dict[str, ModelEntry]:
    """Read and validate the manifest, so a bad edit fails here rather than mid-download."""
    path = path or DEFAULT_MANIFEST
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read weights manifest {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise WeightsError(f"weights manifest {path} must be a JSON object of model name -> entry")
    return {name: _parse_entry(path, name, fields) for name, fields in raw.items()}


def _parse_entry(path: Path, name: str, fields: Any) -> ModelEntry:
    def bad(why: str) -> WeightsError:
        return WeightsError(f"weights manifest {path}: {name!r} {why}")

    if not isinstance(fields, dict):
        raise bad("must be an object")
    url, config = fields.get("url"), fields.get("config")
    size, sha, params = fields.get("size"), fields.get("sha256"), fields.get("parameters")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise bad("needs an http(s) 'url'")
    if not isinstance(config, str) or not config:
        raise bad("needs a 'config'")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise bad("'size' must be a positive integer or null")
    if sha is not None and (not isinstance(sha, str) or not _SHA256.fullmatch(sha.lower())):
        raise bad("'sha256' must be 64 hex digits or null")
    if params is not None and (not isinstance(params, int) or isinstance(params, bool)):
        raise bad("'parameters' must be an integer or null")
    return ModelEntry(name, url, size, sha.lower() if sha else None, config, params)


def _entry(model: str, manifest: Mapping[str, ModelEntry] | None) -> ModelEntry:
    entries = load_manifest() if manifest is None else manifest
    try:
        return entries[model]
    except KeyError:
        raise WeightsError(f"unknown SAM-2 model {model!r}; choose one of {', '.join(entries)}") from None


def _expectations(
    entry: ModelEntry, expected_sha256: str | None, allow_unverified: bool
) -> tuple[str | None, int | None]:
    """The hash to verify and the size that goes with it.

    The manifest size is only meaningful alongside the manifest hash; a caller-supplied hash names a
    different file (a re-release, a mirror's own build), so its size is taken from the server.
    """
    if expected_sha256 is not None:
        sha = expected_sha256.strip().lower()
        if not _SHA256.fullmatch(sha):
            raise WeightsError(f"expected_sha256 must be 64 hex digits, got {expected_sha256!r}")
        return sha, (entry.size if sha == entry.sha256 else None)
    if entry.sha256 is None and not allow_unverified:
        raise WeightsError(
            f"the manifest has no SHA-256 for {entry.name}, so a download cannot be verified; pass an "
            "expected sha256 you trust, or allow_unverified=True to accept whatever the server sends"
        )
    return entry.sha256, entry.size


def _by_hand(entry: ModelEntry, url: str, dest: Path, sha: str | None, size: int | None) -> str:
    checks = ", ".join(part for part in (f"{size} bytes" if size else "", f"sha256 {sha}" if sha else "") if part)
    where = url if url == entry.url else f"{url} (or Meta's original, {entry.url})"
    return (
        f"To install it by hand, fetch {where} on a machine with internet access and copy it to "
        f"{dest.resolve()}" + (f" ({checks})" if checks else "") + "."
    )


def download_checkpoint(
    model: str,
    dest: Path,
    *,
    url: str | None = None,
    base_url: str | None = None,
    expected_sha256: str | None = None,
    allow_unverified: bool = False,
    progress: bool = True,
    timeout: float = 30.0,
    manifest: Mapping[str, ModelEntry] | None = None,
) -> Path:
    """Download `model` to `dest`, verified, replacing whatever is there only once verified.

    `url` beats `base_url` beats the manifest URL. `timeout` bounds connecting and each read, so a
    stalled transfer fails instead of hanging a worker's start-up. Raises WeightsError for every
    failure, always naming the URL and the path to fill by hand.
    """
    entry = _entry(model, manifest)
    sha, size = _expectations(entry, expected_sha256, allow_unverified)
    source = url or entry.url_for(base_url)
    hint = _by_hand(entry, source, dest, sha, size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.stem}.", suffix=".pt.part")
    part = Path(tmp_name)
    log.info("weights.download.start", model=model, url=source, dest=str(dest), size=size)
    done = False
    try:
        with os.fdopen(fd, "wb") as out:
            actual, received = _stream(source, out, size, progress, timeout, entry.filename, hint)
            out.flush()
            os.fsync(out.fileno())
        if size is not None and received != size:
            raise WeightsError(f"{source} sent {received} bytes, expected {size}. {hint}")
        if sha is None:
            log.warning("weights.download.unverified", model=model, sha256=actual, size=received)
        elif actual != sha:
            raise WeightsError(
                f"checksum mismatch for {source}: expected sha256 {sha}, got {actual} ({received} bytes); "
                f"the file was discarded. {hint}"
            )
        os.replace(part, dest)
        done = True
        _fsync_dir(dest.parent)
    finally:
        if not done:
            part.unlink(missing_ok=True)
    log.info("weights.download.done", model=model, dest=str(dest), size=received, sha256=actual)
    return dest


def _stream(
    url: str, out: BinaryIO, size: int | None, progress: bool, timeout: float, label: str, hint: str
) -> tuple[str, int]:
    """Copy the response body into `out`; return its SHA-256 and length. Maps every transport failure."""
    digest = hashlib.sha256()
    received = 0
    try:
        with (
            httpx.Client(timeout=timeout, follow_redirects=True) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise WeightsError(f"{url} answered HTTP {response.status_code}. {hint}")
            length = _content_length(response)
            if size is not None and length is not None and length != size:
                raise WeightsError(
                    f"{url} announces {length} bytes but the manifest expects {size}; it is not the "
                    f"published checkpoint. {hint}"
                )
            with tqdm(
                total=length or size, unit="B", unit_scale=True, unit_divisor=1024,
                desc=label, file=sys.stderr, disable=not progress, leave=False,
            ) as bar:  # fmt: skip
                for chunk in response.iter_bytes(_CHUNK):
                    received += len(chunk)
                    if size is not None and received > size:
                        raise WeightsError(f"{url} sent more than the expected {size} bytes. {hint}")
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
            if length is not None and received != length:
                raise WeightsError(f"download of {url} stopped at {received} of {length} bytes. {hint}")
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise WeightsError(f"cannot reach {url} ({str(exc) or type(exc).__name__}); offline? {hint}") from exc
    except httpx.TimeoutException as exc:
        raise WeightsError(
            f"download of {url} timed out after {received} bytes (no data for {timeout:g}s). {hint}"
        ) from exc
    except httpx.HTTPError as exc:
        raise WeightsError(f"download of {url} was interrupted after {received} bytes ({exc!r}). {hint}") from exc
    except OSError as exc:
        raise WeightsError(f"cannot write the download next to the destination: {exc}. {hint}") from exc
    return digest.hexdigest(), received


def _content_length(response: httpx.Response) -> int | None:
    # A compressed transfer's length is of the encoded body, not of the checkpoint.
    if response.headers.get("content-encoding", "identity") != "identity":
        return None
    try:
        return int(response.headers["content-length"])
    except (KeyError, ValueError):
        return None


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable, so a power cut cannot bring back the old name."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _present(dest: Path, size: int | None) -> bool:
    """Cheap presence check: existence plus size when known. Hashing 860 MiB on every start is not."""
    if not dest.is_file():
        return False
    actual = dest.stat().st_size
    if size is None or actual == size:
        return True
    log.warning("weights.size_mismatch", dest=str(dest), size=actual, expected=size)
    return False


def ensure_checkpoint(
    model: str,
    dest: Path,
    *,
    url: str | None = None,
    base_url: str | None = None,
    expected_sha256: str | None = None,
    allow_unverified: bool = False,
    progress: bool = True,
    timeout: float = 30.0,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    manifest: Mapping[str, ModelEntry] | None = None,
) -> Path:
    """Return `dest` once it holds `model`, downloading it at most once per host.

    Workers sharing a volume start together; a file lock next to `dest` lets one download while the
    others wait and then find the file. A file of the wrong size (when the size is known) is
    replaced, but only by a verified download.
    """
    entry = _entry(model, manifest)
    _, size = _expectations(entry, expected_sha256, allow_unverified)
    if _present(dest, size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(dest) + ".lock")
    try:
        lock.acquire(blocking=False)
    except filelock.Timeout:
        log.info("weights.waiting_for_lock", model=model, lock=lock.lock_file, timeout_s=lock_timeout)
        try:
            lock.acquire(timeout=lock_timeout)
        except filelock.Timeout:
            raise WeightsError(
                f"gave up after {lock_timeout:g}s waiting for another process to download {model} "
                f"(lock {lock.lock_file}); if none is running, delete the lock file and retry"
            ) from None
    try:
        if _present(dest, size):
            log.info("weights.present_after_wait", model=model, dest=str(dest))
            return dest
        return download_checkpoint(
            model, dest, url=url, base_url=base_url, expected_sha256=expected_sha256,
            allow_unverified=allow_unverified, progress=progress, timeout=timeout, manifest=manifest,
        )  # fmt: skip
    finally:
        lock.release()


def ensure_configured(settings: Settings, *, progress: bool = False) -> Path:
    """The checkpoint the settings name, downloaded (locked, verified) if it is Meta's and missing.

    A path set in SAMSEG_SAM2_CHECKPOINT may be a fine-tuned model: it is used as it is, never downloaded or
    replaced, and its absence is an error.
    """
    if settings.sam2_checkpoint is not None:
        if settings.sam2_checkpoint.is_file():
            return settings.sam2_checkpoint
        raise WeightsError(f"SAMSEG_SAM2_CHECKPOINT={settings.sam2_checkpoint} does not exist")
    return ensure_checkpoint(
        settings.sam2_model, settings.checkpoint_path, base_url=settings.weights_base_url, progress=progress
    )


def checkpoint_sha256(path: Path) -> str:
    """The SHA-256 of the checkpoint file a worker loaded: result.json's `model.checkpoint_sha256`, so a result
    says which weights produced it. Hashed once per file version (path, size, mtime) per process."""
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
