"""The job message contract of issue #16: options, outputs, ttl, events, cancel; every error names its field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from samseg.core.contracts import (
    CallbackBody,
    CancelMessage,
    CocoRle,
    EffectiveOptions,
    JobMessage,
    JobOptions,
    ModelInfo,
    ResultDocument,
    ResultSegment,
    parse_message,
)
from samseg.core.options import check_server_limits, resolve_options, server_options
from samseg.core.settings import Settings

BASE = {"uuid": "job-1", "image_url": "https://example.com/a.jpg"}


def error_locations(data: Any, **kwargs: Any) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        parse_message(data, **kwargs)
    return [".".join(str(part) for part in error["loc"]) for error in caught.value.errors()]


def test_a_plain_message_is_unchanged() -> None:
    job = parse_message(dict(BASE))
    assert isinstance(job, JobMessage)
    assert job.options is None and job.outputs == [] and job.ttl_seconds is None and job.events == []
    assert job.model_dump() == BASE  # the chain and the queue see the same dict as before
    # Unknown top-level keys are still ignored, as before.
    assert parse_message({**BASE, "extra": 1}) == job
    # What a sender puts on the wire without the optional fields round-trips to the same job.
    assert parse_message(json.loads(job.model_dump_json(exclude_defaults=True))) == job


def test_every_option_accepted_at_its_limits() -> None:
    low = {
        "points_per_side": 4,
        "pred_iou_thresh": 0,
        "stability_score_thresh": 0.0,
        "box_nms_thresh": 1e-9,
        "min_mask_region_area": 0,
        "max_masks": 1,
        "sort_by": "area",
        "multimask_output": False,
        "polygon_tolerance": 0,
    }
    high = {
        "points_per_side": 64,
        "pred_iou_thresh": 1,
        "stability_score_thresh": 1.0,
        "box_nms_thresh": 1,
        "min_mask_region_area": 10_000,
        "max_masks": 1000,
        "sort_by": "predicted_iou",
        "multimask_output": True,
        "polygon_tolerance": 10,
    }
    for options in (low, high):
        job = parse_message(
            {**BASE, "options": options, "outputs": ["coco_rle", "polygons", "label_map", "overlay"], "ttl_seconds": 10}
        )
        assert isinstance(job, JobMessage) and job.options is not None
        assert job.options.model_dump() == options
    assert parse_message({**BASE, "ttl_seconds": 604_800, "events": ["running"]}).ttl_seconds == 604_800  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("points_per_side", 3),
        ("points_per_side", 65),
        ("points_per_side", "32"),
        ("points_per_side", 32.5),
        ("points_per_side", True),
        ("pred_iou_thresh", -0.1),
        ("pred_iou_thresh", 1.01),
        ("pred_iou_thresh", "0.5"),
        ("stability_score_thresh", 2),
        ("box_nms_thresh", 0),
        ("box_nms_thresh", 1.5),
        ("min_mask_region_area", -1),
        ("min_mask_region_area", 10_001),
        ("max_masks", 0),
        ("max_masks", 1001),
        ("sort_by", "size"),
        ("multimask_output", 1),
        ("multimask_output", "true"),
        ("polygon_tolerance", -1),
        ("polygon_tolerance", 10.5),
        ("colour", "red"),
    ],
)
def test_bad_options_name_their_field(field: str, value: Any) -> None:
    assert error_locations({**BASE, "options": {field: value}}) == [f"options.{field}"]


@pytest.mark.parametrize(
    ("data", "location"),
    [
        ({"outputs": ["coco_rle", "svg"]}, "outputs.1"),
        ({"outputs": "coco_rle"}, "outputs"),
        ({"ttl_seconds": 9}, "ttl_seconds"),
        ({"ttl_seconds": 604_801}, "ttl_seconds"),
        ({"ttl_seconds": "600"}, "ttl_seconds"),
        ({"events": ["completed"]}, "events.0"),
        ({"options": "fast"}, "options"),
        ({"options": [1]}, "options"),
    ],
)
def test_bad_job_fields_name_their_field(data: dict[str, Any], location: str) -> None:
    assert error_locations({**BASE, **data}) == [location]


def test_duplicates_are_dropped_in_order() -> None:
    job = parse_message({**BASE, "outputs": ["overlay", "coco_rle", "overlay"], "events": ["running", "running"]})
    assert isinstance(job, JobMessage)
    assert job.outputs == ["overlay", "coco_rle"] and job.events == ["running"]


def test_server_cap_on_points_per_side() -> None:
    data = {**BASE, "options": {"points_per_side": 48}}
    assert error_locations(data, max_points_per_side=32) == ["options.points_per_side"]
    assert isinstance(parse_message(data, max_points_per_side=48), JobMessage)
    job = parse_message(data)
    assert isinstance(job, JobMessage)
    settings = Settings(job_max_points_per_side=32)
    with pytest.raises(ValidationError) as caught:
        check_server_limits(job.options, settings)
    assert [e["loc"] for e in caught.value.errors()] == [("options", "points_per_side")]
    assert "at most 32" in str(caught.value)
    with pytest.raises(ValidationError):
        resolve_options(job.options, settings)
    check_server_limits(job.options, Settings(job_max_points_per_side=48))


def test_effective_options() -> None:
    settings = Settings(amg_points_per_side=24, amg_pred_iou_thresh=0.7, polygon_tolerance=0.5)
    assert resolve_options(None, settings) == server_options(settings)
    assert server_options(settings).points_per_side == 24
    assert server_options(settings).max_masks is None and server_options(settings).sort_by == "area"
    effective = resolve_options(JobOptions(max_masks=10, pred_iou_thresh=0.9), settings)
    assert effective.max_masks == 10 and effective.pred_iou_thresh == 0.9
    assert effective.points_per_side == 24 and effective.polygon_tolerance == 0.5
    assert EffectiveOptions.model_validate(effective.model_dump()) == effective


def test_cancel_messages() -> None:
    cancel = parse_message({"uuid": "job-1", "action": "cancel"})
    assert cancel == CancelMessage(uuid="job-1", action="cancel")
    assert error_locations({"uuid": "job-1", "action": "stop"}) == ["action"]
    assert error_locations({"uuid": "../x", "action": "cancel"}) == ["uuid"]
    assert error_locations({"uuid": "job-1", "action": "cancel", "image_url": "x"}) == ["image_url"]
    assert error_locations({"image_url": "x"}) == ["uuid"]


def test_callback_and_result_additions() -> None:
    # The callback as before still validates; the new fields are optional.
    old = {"uuid": "j", "status": "completed", "segments": [], "image_width": 4, "image_height": 3}
    assert CallbackBody.model_validate(old).model_dump(exclude_none=True) == old
    assert CallbackBody(uuid="j", status="canceled").status == "canceled"
    segment = {
        "segment_id": 0,
        "mask_url": "/assets/j/mask_images/mask_000.png",
        "bbox": {"x": 0, "y": 0, "width": 1, "height": 1},
        "area": 1,
        "stability_score": 0.9,
        "predicted_iou": 0.8,
        "center_point": {"x": 0, "y": 0},
    }
    document = ResultDocument(
        uuid="j",
        status="completed",
        segments=[
            ResultSegment.model_validate(
                {**segment, "rle": CocoRle(size=(3, 4), counts="01;"), "polygons": [[[[0, 0], [1, 0], [1, 1], [0, 0]]]]}
            )
        ],
        result_url="/assets/j/result.json",
        label_map_url="/assets/j/label_map.png",
        params=server_options(Settings()),
        outputs=["coco_rle", "polygons", "label_map"],
        model=ModelInfo(config="sam2.1_hiera_tiny", checkpoint_sha256="ab" * 32),
        samseg_version="0.1.0",
    )
    data = json.loads(document.model_dump_json(exclude_none=True))
    assert data["segments"][0]["rle"] == {"size": [3, 4], "counts": "01;"}
    # What the deliver task does with result.json: the CallbackBody fields only, the rest stays in the document.
    assert CallbackBody.model_validate(data) == document.callback_body()
    assert data["params"]["points_per_side"] == 32 and data["model"]["config"] == "sam2.1_hiera_tiny"
    body = document.callback_body()
    dumped = json.loads(body.model_dump_json(exclude_none=True))
    assert dumped["segments"] == [segment]  # no rle/polygons in the callback
    assert dumped["result_url"] == "/assets/j/result.json" and dumped["label_map_url"] == "/assets/j/label_map.png"
    with pytest.raises(ValidationError) as caught:
        ResultSegment.model_validate({**segment, "polygons": [[[[0, 0, 1]]]]})
    assert caught.value.errors()[0]["loc"][0] == "polygons"
