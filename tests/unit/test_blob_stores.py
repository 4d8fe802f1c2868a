"""Blob stores (a local directory, S3) and the asset layout on top of them: publication order, re-runs,
removal, key safety, and the purge that the job store drives.

The local store is a real directory. The same store cases run against S3 — moto's server on loopback, the
AWS stand-in speaking the real S3 protocol — in tests/integration/test_blob_stores_s3.py.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from samseg.core.contracts import BBox, CallbackBody, ErrorInfo, JobState, Point, Segment, Stage
from samseg.core.masks import PackedMasks, decode_png, write_packed_masks
from samseg.core.settings import Settings
from samseg.stores import Stores
from samseg.stores.blobs import BlobStore, LocalBlobs, S3Blobs, Upload, check_key
from samseg.stores.jobs import JobStore
from samseg.stores.layout import Assets, checked, result_key, work_key, work_prefix
from samseg.stores.purge import purge_expired, sweep_orphans
from samseg.stores.sql_jobs import SqlJobs


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    """A local directory here; tests/integration/test_blob_stores_s3.py overrides it with S3 on moto."""
    return LocalBlobs(tmp_path / "assets")


def _masks(tmp_path: Path, count: int, height: int = 20, width: int = 30, seed: int = 0) -> PackedMasks:
    rng = np.random.default_rng(seed)
    arrays = [rng.random((height, width)) > 0.5 for _ in range(count)]
    path = tmp_path / f"masks-{seed}-{count}.npy"
    write_packed_masks(path, arrays, count, height, width)
    return PackedMasks(path, width)


def _body(uuid: str, count: int) -> CallbackBody:
    segment = Segment(
        segment_id=0,
        mask_url="u",
        bbox=BBox(x=0, y=0, width=1, height=1),
        area=1,
        stability_score=1,
        predicted_iou=1,
        center_point=Point(x=0, y=0),
    )
    return CallbackBody(uuid=uuid, status="completed", segments=[segment] * count)


# --- the store itself ---------------------------------------------------------------------------------------
def test_put_get_head_walk_delete(blobs):
    blobs.put("job-1/a.txt", b"hello", "text/plain")
    blobs.put_many(Upload(f"job-1/many/{i:02d}", lambda i=i: bytes([i]) * 10) for i in range(25))
    assert blobs.get("job-1/a.txt") == b"hello"
    assert blobs.get("job-1/missing") is None
    info = blobs.head("job-1/a.txt")
    assert info is not None and info.size == 5 and info.etag and abs(info.modified - time.time()) < 120
    assert blobs.head("job-1/missing") is None
    keys = [key for key, _ in blobs.walk("job-1/many")]
    assert keys == [f"job-1/many/{i:02d}" for i in range(25)]
    opened = blobs.open("job-1/many/03")
    assert opened is not None and b"".join(opened[1]) == bytes([3]) * 10
    assert blobs.delete_prefix("job-1/many") == 25
    assert list(blobs.walk("job-1/many")) == []
    blobs.delete(["job-1/a.txt", "job-1/never-existed"])
    assert blobs.get("job-1/a.txt") is None


def test_files_round_trip_and_children_are_listed_in_order(blobs, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(secrets.token_bytes(100_000))
    blobs.put_file(".samseg/work/job-b/run1/source", source)
    blobs.put(".samseg/work/job-a/run2/x", b"x")
    blobs.put(".samseg/work/job-c/run3/x", b"x")
    dest = tmp_path / "copy.bin"
    assert blobs.get_file(".samseg/work/job-b/run1/source", dest) and dest.read_bytes() == source.read_bytes()
    assert not blobs.get_file(".samseg/work/job-b/run1/missing", tmp_path / "none")
    assert blobs.children(".samseg/work") == ["job-a", "job-b", "job-c"]
    assert blobs.children(".samseg/work", start_after="job-a") == ["job-b", "job-c"]
    assert blobs.children(".samseg/work", limit=2) == ["job-a", "job-b"]
    assert blobs.children(".samseg/work/job-b") == ["run1"]


def test_a_failing_upload_stops_the_batch_and_raises(blobs):
    def broken() -> bytes:
        raise OSError("disk on fire")

    uploads = [Upload(f"j/ok{i}", lambda: b"ok") for i in range(3)] + [Upload("j/bad", broken)]
    with pytest.raises(OSError, match="disk on fire"):
        blobs.put_many(uploads)


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", "a\\\\b", "a/\\0"])
def test_unsafe_keys_are_refused(blobs, key):
    with pytest.raises(ValueError):
        blobs.put(key.replace("\\\\0", "\\0"), b"x")
    with pytest.raises(ValueError):
        check_key(key.replace("\\\\0", "\\0"))


def test_check_reports_the_store_and_fails_for_a_missing_bucket(blobs):
    assert blobs.check()
    if isinstance(blobs, S3Blobs):
        gone = S3Blobs(blobs.client, "no-such-bucket-" + secrets.token_hex(3))
        with pytest.raises(Exception):  # noqa: B017 (botocore's ClientError, 404)
            gone.check()


def test_local_store_never_follows_a_planted_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    root = tmp_path / "assets"
    (root / "job-1").mkdir(parents=True)
    (root / "job-1" / "mask_images").symlink_to(outside)
    blobs = LocalBlobs(root)
    assert blobs.get("job-1/mask_images/secret") is None
    assert blobs.local_path("job-1/mask_images/secret") is None
    assert list(blobs.walk("job-1/mask_images")) == []


# --- the asset layout -------------------------------------------------------------------------------------------
def test_publish_writes_masks_then_the_result_and_masks_decode_to_what_was_packed(blobs, tmp_path):
    assets = Assets(blobs)
    masks = _masks(tmp_path, 3)
    assets.publish("job-p", masks, _body("job-p", 3))
    keys = [key for key, _ in blobs.walk("job-p")]
    assert keys == ["job-p/mask_images/mask_000.png", "job-p/mask_images/mask_001.png",
                    "job-p/mask_images/mask_002.png", "job-p/result.json"]  # fmt: skip
    assert assets.is_published("job-p")
    assert assets.read_result("job-p")["uuid"] == "job-p"  # type: ignore[index]
    for index in range(3):
        png = blobs.get(f"job-p/mask_images/mask_{index:03d}.png")
        assert png is not None
        expected = np.unpackbits(masks.read(index), axis=1, count=masks.width).astype(bool)
        np.testing.assert_array_equal(decode_png(png), expected)


def test_a_re_run_with_fewer_masks_leaves_no_stale_mask_behind(blobs, tmp_path):
    assets = Assets(blobs)
    assets.publish("job-r", _masks(tmp_path, 5), _body("job-r", 5))
    assets.publish("job-r", _masks(tmp_path, 2, seed=1), _body("job-r", 2))
    assert [key for key, _ in blobs.walk("job-r/mask_images")] == [
        "job-r/mask_images/mask_000.png",
        "job-r/mask_images/mask_001.png",
    ]
    assert len(assets.read_result("job-r")["segments"]) == 2  # type: ignore[index]


def test_a_failed_publish_leaves_the_job_unpublished_and_empty(blobs, tmp_path):
    class Broken(PackedMasks):
        def read(self, index: int) -> Any:
            if index == 2:
                raise OSError(28, "No space left on device")
            return super().read(index)

    good = _masks(tmp_path, 4)
    broken = Broken(good.path, good.width)
    assets = Assets(blobs)
    assets.publish("job-f", _masks(tmp_path, 1, seed=3), _body("job-f", 1))  # an earlier run's result
    with pytest.raises(OSError):
        assets.publish("job-f", broken, _body("job-f", 4))
    assert not assets.is_published("job-f")
    assert list(blobs.walk("job-f")) == []


def test_remove_job_unpublishes_first_and_counts_what_it_removed(blobs, tmp_path):
    assets = Assets(blobs)
    assets.publish("job-x", _masks(tmp_path, 2), _body("job-x", 2))
    blobs.put(work_key("job-x", "abc123", "source"), b"img")
    assert assets.remove_job("job-x") == 4
    assert not assets.is_published("job-x") and list(blobs.walk("job-x")) == []
    assert list(blobs.walk(work_prefix("job-x"))) == []


def test_work_files_are_keyed_by_run_so_discarding_one_run_keeps_the_other(blobs):
    assets = Assets(blobs)
    blobs.put(work_key("job-w", "aaaaaa", "source"), b"first run")
    blobs.put(work_key("job-w", "bbbbbb", "source"), b"second run")
    assets.discard_work("job-w", "aaaaaa")
    assert blobs.get(work_key("job-w", "bbbbbb", "source")) == b"second run"
    assert blobs.get(work_key("job-w", "aaaaaa", "source")) is None


@pytest.mark.parametrize("uuid", ["", ".", "..", ".samseg", "a/b", "a b", "-x", "x" * 129])
def test_layout_refuses_unsafe_job_ids(uuid):
    with pytest.raises(ValueError):
        checked(uuid)
    with pytest.raises(ValueError):
        result_key(uuid)


@pytest.mark.parametrize("run_id", ["", "../x", "ABC", "zz/yy"])
def test_layout_refuses_unsafe_run_ids(run_id):
    with pytest.raises(ValueError):
        work_key("job", run_id, "source")


# --- the purge --------------------------------------------------------------------------------------------------
@pytest.fixture
def stores(blobs, tmp_path) -> Stores:
    return Stores(blobs=blobs, jobs=JobStore(SqlJobs(tmp_path / "jobs.sqlite", 14 * 86400), 7200))


def _finish(stores: Stores, uuid: str, at: float, state: JobState = JobState.COMPLETED) -> str:
    claim = stores.jobs.claim(uuid, f"m-{uuid}", now=at)
    error = ErrorInfo(code="x", message="y") if state is JobState.FAILED else None
    assert stores.jobs.advance(uuid, claim.run_id, state, error=error, now=at)
    return claim.run_id


def test_purge_removes_expired_jobs_only_and_keeps_their_records(stores, tmp_path):
    settings = Settings(asset_ttl_seconds=3600)
    now = time.time()
    for uuid, age in (("old-1", 7200), ("old-2", 5000), ("fresh", 60)):
        _finish(stores, uuid, now - age)
        stores.assets.publish(uuid, _masks(tmp_path, 2), _body(uuid, 2))
    report = purge_expired(stores, settings, now=now)
    assert report["jobs"] == 2 and report["objects"] == 6
    assert not stores.assets.is_published("old-1") and not stores.assets.is_published("old-2")
    assert stores.assets.is_published("fresh")
    assert stores.jobs.get("old-1").assets_purged and stores.jobs.get("old-1").status is JobState.COMPLETED
    assert purge_expired(stores, settings, now=now)["jobs"] == 0  # nothing listed twice


def test_purge_sweeps_work_of_dead_runs_and_keeps_live_and_recent_ones(stores):
    settings = Settings(stale_run_seconds=600)
    now = time.time()
    live = stores.jobs.claim("live", "m1", now=now)
    stores.jobs.advance("live", live.run_id, JobState.RUNNING, Stage.SEGMENT, now=now)
    stores.blobs.put(work_key("live", live.run_id, "source"), b"in use")
    done_run = _finish(stores, "done", now)
    stores.blobs.put(work_key("done", done_run, "source"), b"left by a crash")
    stores.blobs.put(work_key("unknown", "0bad0bad", "source"), b"no record at all")
    # Files just written belong to a run whose first status write may not be visible yet: kept for now.
    assert sweep_orphans(stores, settings, now=now) == 0
    assert sweep_orphans(stores, settings, now=now + 3600) == 2
    assert stores.blobs.get(work_key("live", live.run_id, "source")) == b"in use"
    assert stores.blobs.get(work_key("done", done_run, "source")) is None
    assert stores.blobs.get(work_key("unknown", "0bad0bad", "source")) is None
