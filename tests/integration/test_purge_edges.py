"""Issue #15 (3c, 3h): the purge survives one bad record, removes only the checked run's work files, and
keeps the seed's promise — every job folder older than the TTL goes, record or not, the whole key space
covered within a bounded number of runs. A real directory and S3 (moto's server), a real SQLite job store.
"""

from __future__ import annotations

import math
import secrets
import time
from pathlib import Path

import boto3
import pytest

from samseg.core.contracts import CallbackBody, JobState, Stage
from samseg.core.settings import Settings
from samseg.stores import Stores
from samseg.stores.blobs import BlobStore, LocalBlobs, S3Blobs
from samseg.stores.jobs import JobStore
from samseg.stores.layout import Assets, work_key
from samseg.stores.purge import purge_expired, sweep_job_folders
from samseg.stores.sql_jobs import SqlJobs

TTL = 3600


@pytest.fixture(params=["local", "s3"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Stores:
    blobs: BlobStore
    if request.param == "local":
        blobs = LocalBlobs(tmp_path / "assets")
    else:
        client = boto3.client(
            "s3",
            endpoint_url=request.getfixturevalue("moto_url"),
            region_name="us-east-1",
            aws_access_key_id="t",
            aws_secret_access_key="t",
        )
        bucket = f"b-{secrets.token_hex(4)}"
        client.create_bucket(Bucket=bucket)
        blobs = S3Blobs(client, bucket, "pre/fix", concurrency=4)
    return Stores(blobs=blobs, jobs=JobStore(SqlJobs(tmp_path / "jobs.sqlite", 14 * 86400), 7200))


def _publish(stores: Stores, uuid: str) -> None:
    stores.blobs.put(f"{uuid}/mask_images/mask_000.png", b"png")
    stores.blobs.put(f"{uuid}/result.json", CallbackBody(uuid=uuid, status="completed").model_dump_json().encode())


def _finish(stores: Stores, uuid: str, at: float) -> str:
    claim = stores.jobs.claim(uuid, f"m-{uuid}", now=at)
    assert stores.jobs.advance(uuid, claim.run_id, JobState.COMPLETED, now=at)
    return claim.run_id


def _folders(stores: Stores) -> list[str]:
    return [name for name in stores.blobs.children("") if not name.startswith(".")]


def test_job_folders_without_a_record_go_once_older_than_the_ttl(stores):
    settings = Settings(asset_ttl_seconds=TTL)
    now = time.time()
    _publish(stores, "no-record")  # store reset / record expired / crash between publish and record
    _publish(stores, "running")
    run = stores.jobs.claim("running", "m-run", now=now)
    stores.jobs.advance("running", run.run_id, JobState.RUNNING, Stage.PERSIST, now=now)
    assert sweep_job_folders(stores, settings, now) == 0  # younger than the TTL: kept
    assert sweep_job_folders(stores, settings, now + TTL + 60) == 1
    assert _folders(stores) == ["running"]  # a run still going keeps its folder
    assert not Assets(stores.blobs).is_published("no-record")
    report = purge_expired(stores, settings, now=now + TTL + 60)
    assert report["orphan_jobs"] == 0 and _folders(stores) == ["running"]


def test_the_cursor_covers_every_folder_within_a_bounded_number_of_runs(stores):
    settings = Settings(asset_ttl_seconds=TTL)
    uuids = [f"lost-{i:02d}" for i in range(7)]
    for uuid in uuids:
        _publish(stores, uuid)
    limit, later = 3, time.time() + TTL + 60
    removed_per_run = []
    for _ in range(math.ceil(len(uuids) / limit) + 1):  # the bound the module promises
        removed_per_run.append(sweep_job_folders(stores, settings, later, limit=limit))
    assert _folders(stores) == [], removed_per_run
    assert max(removed_per_run) <= limit  # the cost per run is bounded
    _publish(stores, "lost-00")  # a new orphan before the cursor's position is found on a later pass
    assert sum(sweep_job_folders(stores, settings, later, limit=limit) for _ in range(2)) == 1


def test_one_bad_record_does_not_stop_the_purge(stores, monkeypatch):
    settings = Settings(asset_ttl_seconds=TTL)
    now = time.time()
    for uuid in ("bad", "good-1", "good-2"):
        _finish(stores, uuid, now - 2 * TTL)
        _publish(stores, uuid)
    remove = Assets.remove_job

    def refusing(self: Assets, uuid: str, run_id: str | None = None) -> int:
        if uuid == "bad":
            raise OSError("the store refused one delete")  # e.g. S3 DeleteObjects failing for one key
        return remove(self, uuid, run_id)

    monkeypatch.setattr(Assets, "remove_job", refusing)
    report = purge_expired(stores, settings, now=now)
    assert report["jobs"] == 2 and report["failed"] == 1, report
    assert _folders(stores) == ["bad"]
    assert not stores.jobs.get("bad").assets_purged  # tried again by the next run
    monkeypatch.setattr(Assets, "remove_job", remove)
    assert purge_expired(stores, settings, now=now)["jobs"] == 1 and _folders(stores) == []


def test_the_purge_discards_only_the_checked_runs_work_files(stores):
    settings = Settings(asset_ttl_seconds=TTL)
    now = time.time()
    old_run = _finish(stores, "rerun", now - 2 * TTL)
    _publish(stores, "rerun")
    stores.blobs.put(work_key("rerun", old_run, "masks"), b"old run's leftovers")
    # A new run's work files appear before its record does (samseg.stores.purge: orphan sweep's grace).
    stores.blobs.put(work_key("rerun", "abcdef12", "source"), b"new run's image")
    assert purge_expired(stores, settings, now=now)["jobs"] == 1
    assert stores.blobs.get(work_key("rerun", old_run, "masks")) is None
    assert stores.blobs.get(work_key("rerun", "abcdef12", "source")) == b"new run's image"
