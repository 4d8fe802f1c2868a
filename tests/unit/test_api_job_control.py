"""Issue 16's job control on the real API app, in-process: DELETE /jobs/{uuid}, the re-send rules at POST /jobs,
the server's limits as 422s naming the field, and the job-level files (result.json, label_map.png, overlay.jpg)
behind signed URLs.

The app, its stores (local blobs, SQLite job store in tmp_path) and the lifecycle are the production ones
(test_api_security.py's harness); SQS is the recording stand-in there (no SQS server in the unit tier).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from samseg.core.contracts import JobMessage, Stage
from samseg.core.options import fingerprint
from samseg.stores.lifecycle import Hold, Lifecycle
from samseg.stores.signed_urls import sign
from tests.unit.test_api_security import ASSET_SECRET, NEW, Api, _publish, _serve, _settings

AUTH = {"Authorization": f"Bearer {NEW}"}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from _serve(_settings(tmp_path, SAMSEG_API_TOKEN=NEW))


def lifecycle(api: Api) -> Lifecycle:
    return Lifecycle(api.client.app.state.stores.jobs, api.settings)  # type: ignore[attr-defined]


def submit(api: Api, body: dict[str, object]) -> int:
    return api.client.post("/jobs", json=body, headers=AUTH).status_code


def test_delete_cancels_a_queued_job_and_its_own_message_is_then_dropped(api: Api) -> None:
    job = {"uuid": "c-queued", "image_url": "https://example.com/a.png"}
    assert submit(api, job) == 202
    response = api.client.delete("/jobs/c-queued", headers=AUTH)
    assert response.status_code == 202 and response.json()["status"] == "canceled"
    assert api.queues.sent[-1] == {"uuid": "c-queued", "action": "cancel"}  # the ingress queues the callback
    record = api.client.app.state.stores.jobs.get("c-queued")  # type: ignore[attr-defined]
    assert record.run_id is not None and record.callback.open  # a canceled callback with its own webhook-id
    # The job message POST sent reaches the ingress afterwards: the same message, canceled: dropped, not run.
    claim = api.client.app.state.stores.jobs.claim("c-queued", "message-1", fingerprint=fingerprint(JobMessage(**job)))  # type: ignore[attr-defined]
    assert claim.decision.value == "duplicate"
    again = api.client.delete("/jobs/c-queued", headers=AUTH)
    assert again.status_code == 409 and again.json()["detail"]["status"] == "canceled"


def test_delete_of_a_running_job_marks_it_for_its_holder(api: Api) -> None:
    jobs = api.client.app.state.stores.jobs  # type: ignore[attr-defined]
    claim = jobs.claim("c-run", "m-1", payload={"uuid": "c-run"})
    hold = lifecycle(api).start_stage("c-run", claim.run_id, Stage.DOWNLOAD, {"uuid": "c-run", "run_id": claim.run_id})
    assert isinstance(hold, Hold)
    response = api.client.delete("/jobs/c-run", headers=AUTH)
    assert response.status_code == 202
    assert response.json()["status"] == "running" and response.json()["cancel_requested"] is True
    status = api.client.get("/jobs/c-run", headers=AUTH).json()
    assert status["cancel_requested"] is True and status["stage"] == "download"


def test_delete_answers_404_for_unknown_or_unsafe_uuids_and_401_without_a_token(api: Api) -> None:
    assert api.client.delete("/jobs/nobody", headers=AUTH).status_code == 404
    assert api.client.delete("/jobs/..%2Fx", headers=AUTH).status_code == 404
    assert api.client.delete("/jobs/nobody").status_code == 401


def test_a_different_body_for_an_active_uuid_is_409_and_the_same_body_is_accepted(api: Api) -> None:
    first = {"uuid": "r-1", "image_url": "https://example.com/a.png", "outputs": ["coco_rle"]}
    jobs = api.client.app.state.stores.jobs  # type: ignore[attr-defined]
    jobs.claim("r-1", "m-1", fingerprint=fingerprint(JobMessage.model_validate(first)))
    assert submit(api, first) == 202  # the same job again: a duplicate the ingress drops
    assert submit(api, {**first, "outputs": ["coco_rle", "polygons"]}) == 409
    assert submit(api, {**first, "image_url": "https://example.com/b.png"}) == 409
    assert submit(api, {**first, "options": {"max_masks": 3}}) == 409
    assert submit(api, {**first, "ttl_seconds": 600}) == 202  # a new deadline is not another job
    assert len([sent for sent in api.queues.sent if sent.get("uuid") == "r-1"]) == 2


def test_the_servers_points_per_side_cap_is_a_422_naming_the_field(tmp_path: Path) -> None:
    for api in _serve(_settings(tmp_path, SAMSEG_API_TOKEN=NEW, SAMSEG_JOB_MAX_POINTS_PER_SIDE="32")):
        body = {"uuid": "cap-1", "image_url": "https://example.com/a.png", "options": {"points_per_side": 48}}
        response = api.client.post("/jobs", json=body, headers=AUTH)
        assert response.status_code == 422 and api.queues.sent == []
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", "options", "points_per_side"] and "at most 32" in error["msg"]
        assert submit(api, {**body, "options": {"points_per_side": 32}}) == 202


@pytest.mark.parametrize(
    ("extra", "loc"),
    [
        ({"options": {"points_per_side": 65}}, ["body", "options", "points_per_side"]),
        ({"options": {"unknown": 1}}, ["body", "options", "unknown"]),
        ({"outputs": ["zip"]}, ["body", "outputs", 0]),
        ({"ttl_seconds": 1}, ["body", "ttl_seconds"]),
        ({"events": ["done"]}, ["body", "events", 0]),
    ],
)
def test_every_bad_optional_field_is_a_422_naming_it(api: Api, extra: dict[str, object], loc: list[object]) -> None:
    response = api.client.post("/jobs", json={"uuid": "v-1", "image_url": "https://x/a.png", **extra}, headers=AUTH)
    assert response.status_code == 422 and any(e["loc"] == loc for e in response.json()["detail"]), response.text


# --- the job-level files ------------------------------------------------------------------------------------------
@pytest.fixture
def signed(tmp_path: Path) -> Iterator[Api]:
    settings = _settings(tmp_path, SAMSEG_API_TOKEN=NEW, SAMSEG_ASSET_URL_SECRET=ASSET_SECRET)
    _publish(settings.assets_dir, "files-job", 2, tmp_path)
    (settings.assets_dir / "files-job" / "label_map.png").write_bytes(b"\x89PNG-label-map")
    yield from _serve(settings)


@pytest.mark.parametrize("name", ["result.json", "label_map.png"])
def test_job_files_are_served_by_signed_url_or_the_api_token(signed: Api, name: str) -> None:
    path = f"/assets/files-job/{name}"
    assert signed.client.get(f"{path}?{sign(path, ASSET_SECRET, 600, time.time())}").status_code == 200
    assert signed.client.get(path, headers=AUTH).status_code == 200
    assert signed.client.get(path).status_code == 401
    other = "/assets/files-job/overlay.jpg"
    assert signed.client.get(f"{path}?{sign(other, ASSET_SECRET, 600, time.time())}").status_code == 403


def test_a_job_file_that_was_not_produced_or_is_not_a_job_file_is_404(signed: Api) -> None:
    assert signed.client.get("/assets/files-job/overlay.jpg", headers=AUTH).status_code == 404
    assert signed.client.get("/assets/files-job/secrets.txt", headers=AUTH).status_code == 404
    assert signed.client.get("/assets/unpublished/label_map.png", headers=AUTH).status_code == 404
