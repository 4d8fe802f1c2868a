"""A stage retried after an outage runs again from its inputs: the run's work files stay until notify holds the
run (persist's input until its hand-off is recorded), and a completed run leaves none.

Found by the long-outage chaos test (tests/system/test_chaos_outage.py) in CI: persist published the masks,
deleted the run's work files, then could not record its hand-off (all of AWS went down between the two); its
retry found masks.npy gone and failed the job `work_missing`. Here the same thing runs in one process on the real
stores (local blobs, SQLite job store) and Celery's real retry path (`Task.apply` re-runs a retried task at
once). Mocked, because they cannot be real in the unit tier: a store's answer replaced by a connection error
(the outage), and in the notify test the callback's broker publish (the integration and system tiers publish it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from botocore.exceptions import EndpointConnectionError

from samseg.core.contracts import Stage
from samseg.core.masks import write_packed_masks
from samseg.core.settings import Settings
from samseg.stores import Stores, build_stores
from samseg.stores.jobs import Decision
from samseg.stores.layout import work_key, work_prefix
from samseg.stores.lifecycle import Hold, Lifecycle
from samseg.worker import stages
from samseg.worker.base import StageTask
from samseg.worker.leases import LeaseKeeper

UUID = "retry-1"
HEIGHT, WIDTH = 12, 20


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Stores:
    settings = Settings(
        assets_dir=tmp_path / "assets",
        job_store_url=f"sqlite:///{tmp_path / 'jobs.sqlite'}",
        stage_lease_seconds=30,
    )
    built = build_stores(settings)
    built.jobs.ensure()
    monkeypatch.setattr(StageTask, "settings", property(lambda self: settings))
    monkeypatch.setattr(StageTask, "_stores", (os.getpid(), built))
    monkeypatch.setattr(LeaseKeeper, "_instance", None)  # this test's lifecycle, not another test's
    return built


def run_at_persist(stores: Stores, settings: Settings) -> dict[str, Any]:
    """A run whose download and segment stages are done, with segment's work files in the blob store."""
    life = Lifecycle(stores.jobs, settings)
    claim = stores.jobs.claim(UUID, "m-1", now=life.clock(), payload={"uuid": UUID})
    assert claim.decision is Decision.RUN
    run_id = claim.run_id
    stores.jobs.mark_published(UUID, run_id, now=life.clock())
    job = {"uuid": UUID, "run_id": run_id, "image_url": "http://127.0.0.1:9/x.png"}
    for stage in (Stage.DOWNLOAD, Stage.SEGMENT):
        hold = life.start_stage(UUID, run_id, stage, job)
        assert isinstance(hold, Hold), hold
        assert life.hand_off(UUID, run_id, hold.token, job)
    masks = [np.zeros((HEIGHT, WIDTH), bool) for _ in range(3)]
    for i, mask in enumerate(masks):
        mask[i : i + 4, 2 * i : 2 * i + 5] = True
    local = settings.state_dir / "masks.npy"
    local.parent.mkdir(parents=True, exist_ok=True)
    write_packed_masks(local, masks, len(masks), HEIGHT, WIDTH)
    stores.blobs.put_file(work_key(UUID, run_id, stages.MASKS_FILE), local)
    scores = {"predicted_iou": [0.9, 0.8, 0.7], "stability_score": [0.95, 0.9, 0.85]}
    stores.blobs.put(work_key(UUID, run_id, stages.SCORES_FILE), json.dumps(scores).encode())
    return {**job, "width": WIDTH, "height": HEIGHT, "mask_count": len(masks)}


def test_a_persist_whose_hand_off_meets_an_outage_is_retried_from_its_work_files(stores: Stores) -> None:
    task: Any = stages.persist._get_current_object()
    settings = task.settings
    job = run_at_persist(stores, settings)
    original = Lifecycle.hand_off
    calls: list[bool] = []  # True: this call was turned into the outage

    def hand_off(self: Lifecycle, *args: Any, **kwargs: Any) -> Any:
        calls.append(not calls)
        if calls[-1]:
            raise EndpointConnectionError(endpoint_url="http://dynamodb.invalid")  # the store went down here
        return original(self, *args, **kwargs)

    with mock.patch.object(Lifecycle, "hand_off", hand_off):
        result = task.apply(args=[job])

    assert result.successful(), result.traceback
    assert result.get()["mask_count"] == 3
    assert calls == [True, False]  # the first copy's hand-off failed; its retry recorded one
    record = stores.jobs.get(UUID)
    assert record is not None and record.stage is Stage.PERSIST and record.handed_off
    document = stores.assets.read_result(UUID)
    assert document is not None and len(document["segments"]) == 3
    # Persist never deletes its own input: notify does, once it holds the run.
    assert sorted(key for key, _ in stores.blobs.walk(work_prefix(UUID, job["run_id"]))) == work_files(job)


def work_files(job: dict[str, Any]) -> list[str]:
    return sorted(work_key(UUID, job["run_id"], name) for name in (stages.MASKS_FILE, stages.SCORES_FILE))


def test_notify_removes_the_work_files_before_the_run_completes(stores: Stores) -> None:
    """A completed run leaves no work file; a store outage at that delete retries notify like its own writes."""
    persist: Any = stages.persist._get_current_object()
    notify: Any = stages.notify._get_current_object()
    job = run_at_persist(stores, persist.settings)
    assert persist.apply(args=[job]).successful()
    original = type(stores.assets).discard_work
    seen: list[str | None] = []  # the run's status at each delete: still running, not yet completed

    def discard_work(assets: Any, uuid: str, run_id: str | None = None) -> int:
        record = stores.jobs.get(uuid)
        seen.append(record.status.value if record else None)
        if len(seen) == 1:
            raise EndpointConnectionError(endpoint_url="http://s3.invalid")
        return original(assets, uuid, run_id)

    # The callback's publish needs a broker, which the unit tier has none of (tests/integration has the real one).
    with (
        mock.patch.object(type(stores.assets), "discard_work", discard_work),
        mock.patch.object(stages.names, "queue_delivery") as queued,
    ):
        result = notify.apply(args=[{**job, "mask_count": 3}])
    assert result.successful(), result.traceback
    assert result.get()["status"] == "completed"
    assert seen == ["running", "running"]
    assert queued.call_count == 1
    assert not list(stores.blobs.walk(work_prefix(UUID, job["run_id"])))
