"""Checkpoint download across processes: two spawned processes ensure one checkpoint on one volume.

The loopback stand-in for Meta's download host and its payload are tests/unit/test_weights.py's.
"""

from __future__ import annotations

import multiprocessing
import typing
from dataclasses import replace
from pathlib import Path

from samseg.runtime.weights import ensure_checkpoint, load_manifest
from tests.unit.test_weights import MODEL, PAYLOAD, PAYLOAD_SHA, FakeMeta, meta  # noqa: F401  (meta: the fixture)


def _ensure_in_child(url: str, dest: str, sha: str, size: int, barrier: typing.Any, queue: typing.Any) -> None:
    manifest = {MODEL: replace(load_manifest()[MODEL], url=url, size=size, sha256=sha)}
    barrier.wait()
    try:
        queue.put(str(ensure_checkpoint(MODEL, Path(dest), progress=False, manifest=manifest)))
    except BaseException as exc:
        queue.put(repr(exc))


def test_ensure_from_processes_downloads_once(tmp_path: Path, meta: FakeMeta) -> None:  # noqa: F811
    """Two worker processes starting together on one volume: one download, both get the file.

    Children are spawned (they re-import this module, so they get the parent's hash as an argument).
    """
    meta.mode = "slow"
    dest = tmp_path / f"{MODEL}.pt"
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    args = (meta.url(), str(dest), PAYLOAD_SHA, len(PAYLOAD), barrier, queue)
    procs = [ctx.Process(target=_ensure_in_child, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert results == [str(dest), str(dest)]
    assert sum(meta.hits.values()) == 1
    assert dest.read_bytes() == PAYLOAD
