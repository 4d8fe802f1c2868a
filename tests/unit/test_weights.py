"""Checkpoint manifest and downloader.

Meta's download host (dl.fbaipublicfiles.com) is unreachable from CI, so a real HTTP server on
127.0.0.1 stands in for it: the downloader runs its real httpx/streaming/rename code against a real
socket serving a generated payload. Only the bytes differ from production, and a test manifest entry
carries that payload's size and SHA-256 in place of the real checkpoint's. Two processes racing for one
download are tests/integration/test_weights_processes.py.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import socket
import threading
import time
import typing
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from samseg.core.settings import ModelName, Settings
from samseg.runtime.build import MODEL_CONFIGS
from samseg.runtime.weights import ModelEntry, WeightsError, download_checkpoint, ensure_checkpoint, load_manifest

MODEL = "sam2.1_hiera_tiny"
PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)  # not a multiple of the chunk size
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class FakeMeta:
    """What the loopback server does; tests flip `mode` and read `hits`."""

    mode: str = "ok"  # ok | truncate | stall | slow | missing
    hits: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/segment_anything_2/092824"

    def url(self, name: str = f"{MODEL}.pt") -> str:
        return f"{self.base_url}/{name}"


def _handler(state: FakeMeta) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with state.lock:
                state.hits[self.path] += 1
            if state.mode == "missing":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            if state.mode == "truncate":  # promise N bytes, send N/2, hang up
                self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if state.mode == "stall":  # send half, then go silent past the client's read timeout
                self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
                self.wfile.flush()
                time.sleep(3)
                return
            step = len(PAYLOAD) // 20 + 1
            for start in range(0, len(PAYLOAD), step):
                self.wfile.write(PAYLOAD[start : start + step])
                if state.mode == "slow":  # ~1 s per download, so concurrent callers overlap
                    self.wfile.flush()
                    time.sleep(0.05)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def meta() -> Iterator[FakeMeta]:
    state = FakeMeta()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def manifest(meta: FakeMeta) -> dict[str, ModelEntry]:
    """The real manifest, with tiny's URL, size and hash swapped for the loopback payload's."""
    real = load_manifest()
    return {**real, MODEL: replace(real[MODEL], url=meta.url(), size=len(PAYLOAD), sha256=PAYLOAD_SHA)}


def _leftovers(directory: Path, dest: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p != dest and not p.name.endswith(".lock"))


# --- manifest -----------------------------------------------------------------------------------------


def test_manifest_matches_models_and_settings() -> None:
    entries = load_manifest()
    assert set(entries) == set(MODEL_CONFIGS) == set(typing.get_args(ModelName))
    for name, entry in entries.items():
        assert entry.config == MODEL_CONFIGS[name]
        assert entry.url == f"https://dl.fbaipublicfiles.com/segment_anything_2/092824/{name}.pt"
        # The file name is what Settings.checkpoint_path expects under weights/.
        assert Path("weights") / entry.filename == Settings(sam2_model=name).checkpoint_path
        assert entry.sha256 is not None and re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
        assert entry.size is not None and entry.size > 100_000_000
        assert entry.parameters is not None and entry.parameters > 0
    sizes = [entries[m].size or 0 for m in MODEL_CONFIGS]  # tiny < small < base+ < large
    assert sizes == sorted(sizes)


def test_manifest_rejects_bad_hash(tmp_path: Path) -> None:
    bad = tmp_path / "manifest.json"
    bad.write_text('{"m": {"url": "https://x/m.pt", "size": 1, "sha256": "abc", "config": "c"}}')
    with pytest.raises(WeightsError, match="64 hex"):
        load_manifest(bad)


def test_base_url_replaces_host() -> None:
    entry = load_manifest()[MODEL]
    assert entry.url_for("http://mirror.local/w/") == f"http://mirror.local/w/{MODEL}.pt"
    assert entry.url_for(None) == entry.url


# --- download -----------------------------------------------------------------------------------------


def test_download_verifies_and_installs(tmp_path: Path, meta: FakeMeta, manifest: dict[str, ModelEntry]) -> None:
    dest = tmp_path / "weights" / f"{MODEL}.pt"
    assert download_checkpoint(MODEL, dest, progress=False, manifest=manifest) == dest
    assert dest.read_bytes() == PAYLOAD
    assert _leftovers(dest.parent, dest) == []
    assert meta.hits == {f"/segment_anything_2/092824/{MODEL}.pt": 1}


def test_download_with_explicit_url_and_hash(tmp_path: Path, meta: FakeMeta) -> None:
    """The shipped manifest, overridden per call: the manifest size no longer applies."""
    dest = tmp_path / f"{MODEL}.pt"
    download_checkpoint(MODEL, dest, url=meta.url("other.pt"), expected_sha256=PAYLOAD_SHA.upper(), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert meta.hits == {"/segment_anything_2/092824/other.pt": 1}


def test_download_from_base_url(tmp_path: Path, meta: FakeMeta) -> None:
    dest = tmp_path / f"{MODEL}.pt"
    download_checkpoint(MODEL, dest, base_url=meta.base_url, expected_sha256=PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert meta.hits == {f"/segment_anything_2/092824/{MODEL}.pt": 1}


def test_checksum_mismatch_leaves_nothing(tmp_path: Path, meta: FakeMeta, manifest: dict[str, ModelEntry]) -> None:
    wrong = "0" * 64
    manifest[MODEL] = replace(manifest[MODEL], sha256=wrong)
    dest = tmp_path / f"{MODEL}.pt"
    with pytest.raises(WeightsError) as info:
        download_checkpoint(MODEL, dest, progress=False, manifest=manifest)
    assert wrong in str(info.value) and PAYLOAD_SHA in str(info.value)
    assert not dest.exists()
    assert _leftovers(tmp_path, dest) == []


def test_checksum_mismatch_keeps_previous_file(tmp_path: Path, meta: FakeMeta) -> None:
    dest = tmp_path / f"{MODEL}.pt"
    dest.write_bytes(b"previous")
    with pytest.raises(WeightsError, match="checksum mismatch"):
        download_checkpoint(MODEL, dest, url=meta.url(), expected_sha256="1" * 64, progress=False)
    assert dest.read_bytes() == b"previous"
    assert _leftovers(tmp_path, dest) == []


def test_wrong_announced_size_fails_before_body(
    tmp_path: Path, meta: FakeMeta, manifest: dict[str, ModelEntry]
) -> None:
    manifest[MODEL] = replace(manifest[MODEL], size=len(PAYLOAD) + 1)
    dest = tmp_path / f"{MODEL}.pt"
    with pytest.raises(WeightsError, match="announces"):
        download_checkpoint(MODEL, dest, progress=False, manifest=manifest)
    assert not dest.exists() and _leftovers(tmp_path, dest) == []


@pytest.mark.parametrize(("mode", "expected"), [("truncate", "interrupted"), ("stall", "timed out")])
def test_interrupted_download_leaves_nothing(
    tmp_path: Path, meta: FakeMeta, manifest: dict[str, ModelEntry], mode: str, expected: str
) -> None:
    """Server promises N bytes and hangs up after N/2, or goes silent past the read timeout."""
    meta.mode = mode
    dest = tmp_path / f"{MODEL}.pt"
    with pytest.raises(WeightsError, match=expected) as info:
        download_checkpoint(MODEL, dest, progress=False, timeout=0.5, manifest=manifest)
    assert str(dest.resolve()) in str(info.value)
    assert not dest.exists()
    assert _leftovers(tmp_path, dest) == []


def test_http_error_names_url_and_path(tmp_path: Path, meta: FakeMeta, manifest: dict[str, ModelEntry]) -> None:
    meta.mode = "missing"
    dest = tmp_path / f"{MODEL}.pt"
    with pytest.raises(WeightsError, match="HTTP 404") as info:
        download_checkpoint(MODEL, dest, progress=False, manifest=manifest)
    assert meta.url() in str(info.value) and str(dest.resolve()) in str(info.value)
    assert _leftovers(tmp_path, dest) == []


def test_unreachable_host_says_where_to_put_the_file(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dest = tmp_path / "weights" / f"{MODEL}.pt"
    entry = load_manifest()[MODEL]
    with pytest.raises(WeightsError, match="cannot reach") as info:
        download_checkpoint(MODEL, dest, base_url=f"http://127.0.0.1:{port}", progress=False, timeout=5)
    message = str(info.value)
    assert str(dest.resolve()) in message
    assert f"http://127.0.0.1:{port}/{MODEL}.pt" in message
    assert entry.sha256 is not None and entry.sha256 in message
    assert not dest.exists() and _leftovers(dest.parent, dest) == []


def test_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="unknown SAM-2 model"):
        download_checkpoint("sam3", tmp_path / "x.pt", progress=False)


def test_unverified_entry_is_refused_unless_allowed(
    tmp_path: Path, meta: FakeMeta, manifest: dict[str, ModelEntry]
) -> None:
    manifest[MODEL] = replace(manifest[MODEL], sha256=None, size=None)
    dest = tmp_path / f"{MODEL}.pt"
    with pytest.raises(WeightsError, match="no SHA-256"):
        ensure_checkpoint(MODEL, dest, progress=False, manifest=manifest)
    assert meta.hits == {}
    download_checkpoint(MODEL, dest, progress=False, manifest=manifest, allow_unverified=True)
    assert dest.read_bytes() == PAYLOAD


def test_progress_bar_goes_to_stderr(
    tmp_path: Path, meta: FakeMeta, manifest: dict[str, ModelEntry], capsys: pytest.CaptureFixture[str]
) -> None:
    download_checkpoint(MODEL, tmp_path / f"{MODEL}.pt", progress=True, manifest=manifest)
    assert MODEL in capsys.readouterr().err  # tqdm writes its bar to stderr, never stdout


# --- ensure -------------------------------------------------------------------------------------------


def test_ensure_present_makes_no_request(tmp_path: Path, meta: FakeMeta, manifest: dict[str, ModelEntry]) -> None:
    dest = tmp_path / f"{MODEL}.pt"
    dest.write_bytes(PAYLOAD)
    assert ensure_checkpoint(MODEL, dest, progress=False, manifest=manifest) == dest
    assert meta.hits == {}


def test_ensure_replaces_wrong_size_file(tmp_path: Path, meta: FakeMeta, manifest: dict[str, ModelEntry]) -> None:
    dest = tmp_path / f"{MODEL}.pt"
    dest.write_bytes(PAYLOAD[:1000])  # e.g. a copy that was cut short
    ensure_checkpoint(MODEL, dest, progress=False, manifest=manifest)
    assert dest.read_bytes() == PAYLOAD
    assert sum(meta.hits.values()) == 1


def test_ensure_from_threads_downloads_once(tmp_path: Path, meta: FakeMeta, manifest: dict[str, ModelEntry]) -> None:
    meta.mode = "slow"
    dest = tmp_path / f"{MODEL}.pt"
    barrier = threading.Barrier(3)
    results: list[Path | BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            results.append(ensure_checkpoint(MODEL, dest, progress=False, manifest=manifest))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [dest, dest, dest]
    assert sum(meta.hits.values()) == 1
    assert dest.read_bytes() == PAYLOAD
