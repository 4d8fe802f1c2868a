"""samseg.worker.ingress: parsing the app server's raw JSON job bodies (pure functions, no broker)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from samseg.core.contracts import CancelMessage, JobMessage
from samseg.worker.ingress import InvalidJob, parse_job, raw_body

UUID = "6f1c2d3e-4a5b-4c6d-8e7f-0123456789ab"
URL = "https://images.example.com/photos/cat.jpg"

UNSAFE_UUIDS = ["../x", "a/b", "", "x" * 300, "a\x00b", ".env", "-rf", "a b", "é"]


def body(**fields: object) -> str:
    return json.dumps(fields)


# --- parse_job ----------------------------------------------------------------------------------------


def test_valid_job():
    job = parse_job(body(uuid=UUID, image_url=URL))
    assert isinstance(job, JobMessage)
    assert (job.uuid, job.image_url) == (UUID, URL)


def test_extra_fields_are_ignored():
    job = parse_job(body(uuid=UUID, image_url=URL, priority=5, user={"id": 7}, callback="http://x"))
    assert (job.uuid, job.image_url) == (UUID, URL)
    assert not hasattr(job, "priority")
    assert job.model_dump() == {"uuid": UUID, "image_url": URL}


def test_top_level_properties_key_is_just_data():
    # kombu would mistake this body for its own envelope; parse_job must see it as plain job JSON.
    raw = body(
        uuid=UUID,
        image_url=URL,
        properties={"delivery_tag": "x", "body_encoding": "base64"},
        headers={},
        body="eyJmYWtlIjogdHJ1ZX0=",
    )
    job = parse_job(raw)
    assert (job.uuid, job.image_url) == (UUID, URL)


def test_surrounding_whitespace_in_values_is_stripped():
    job = parse_job(body(uuid=UUID, image_url=f"  {URL}\n"))
    assert job.image_url == URL


@pytest.mark.parametrize("raw", ["", "not json", "{uuid: 1}", '{"uuid": "a",}', "{'uuid': 'a'}", '{"uuid": "a"'])
def test_not_json(raw):
    with pytest.raises(InvalidJob) as info:
        parse_job(raw)
    assert info.value.uuid is None
    assert info.value.reason.startswith("body is not JSON")
    assert str(info.value) == info.value.reason


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ("[]", "list"),
        (json.dumps([{"uuid": UUID, "image_url": URL}]), "list"),
        ('"text"', "str"),
        ("42", "int"),
        ("4.5", "float"),
        ("null", "NoneType"),
        ("true", "bool"),
    ],
)
def test_json_that_is_not_an_object(raw, kind):
    with pytest.raises(InvalidJob) as info:
        parse_job(raw)
    assert info.value.uuid is None
    assert "not an object" in info.value.reason
    assert kind in info.value.reason


def test_missing_uuid():
    with pytest.raises(InvalidJob) as info:
        parse_job(body(image_url=URL))
    assert info.value.uuid is None
    assert "uuid" in info.value.reason
    assert "Field required" in info.value.reason


def test_missing_image_url_keeps_the_trusted_uuid():
    with pytest.raises(InvalidJob) as info:
        parse_job(body(uuid=UUID))
    assert info.value.uuid == UUID
    assert "image_url" in info.value.reason


def test_empty_object_reports_both_fields():
    with pytest.raises(InvalidJob) as info:
        parse_job("{}")
    assert info.value.uuid is None
    assert "uuid" in info.value.reason and "image_url" in info.value.reason


@pytest.mark.parametrize("uuid", [12345, 1.5, True, None, ["a"], {"id": "a"}])
def test_uuid_of_wrong_type(uuid):
    with pytest.raises(InvalidJob) as info:
        parse_job(body(uuid=uuid, image_url=URL))
    assert info.value.uuid is None
    assert "uuid" in info.value.reason


@pytest.mark.parametrize("image_url", [[URL], 123, None, {"href": URL}, "", "   ", "h" * 5000])
def test_bad_image_url_keeps_the_uuid_for_a_failed_callback(image_url):
    with pytest.raises(InvalidJob) as info:
        parse_job(body(uuid=UUID, image_url=image_url))
    assert info.value.uuid == UUID
    assert info.value.reason.startswith("invalid job: ")
    assert "image_url" in info.value.reason


@pytest.mark.parametrize("uuid", UNSAFE_UUIDS)
def test_unsafe_uuid_is_not_trusted(uuid):
    with pytest.raises(InvalidJob) as info:
        parse_job(body(uuid=uuid, image_url=URL))
    assert info.value.uuid is None
    assert "uuid" in info.value.reason


@pytest.mark.parametrize("uuid", UNSAFE_UUIDS)
def test_unsafe_uuid_with_bad_url_is_still_not_trusted(uuid):
    with pytest.raises(InvalidJob) as info:
        parse_job(body(uuid=uuid, image_url=7))
    assert info.value.uuid is None


def test_invalid_job_is_a_value_error():
    with pytest.raises(ValueError):
        parse_job("nope")


@pytest.mark.parametrize("raw", ["[" * 100_000, '{"uuid": "abc", "image_url": "http://x/", "x": ' + "[" * 100_000])
def test_deeply_nested_json_is_an_invalid_job(raw):
    # A ~100 KB body fits in one SQS message (256 KB); it must be dead-lettered, not crash the consumer.
    with pytest.raises(InvalidJob):
        parse_job(raw)


# --- raw_body -----------------------------------------------------------------------------------------


def message(delivery_info: object) -> SimpleNamespace:
    """Stand-in for kombu's Message: raw_body only reads .delivery_info."""
    return SimpleNamespace(delivery_info=delivery_info)


def test_raw_body_prefers_the_untouched_sqs_body():
    original = body(uuid=UUID, image_url=URL, properties={"x": 1})
    mangled = {"x": 1}  # what kombu hands over when it mistakes `properties` for its envelope
    raw = raw_body(mangled, message({"sqs_message": {"Body": original, "MessageId": "m-1"}}))
    assert raw == original
    assert parse_job(raw).uuid == UUID


@pytest.mark.parametrize(
    "delivery_info", [None, {}, {"sqs_message": None}, {"sqs_message": {}}, {"sqs_message": {"Body": None}}]
)
def test_raw_body_falls_back_to_the_decoded_body(delivery_info):
    as_dict = {"uuid": UUID, "image_url": URL}
    assert json.loads(raw_body(as_dict, message(delivery_info))) == as_dict
    assert raw_body('{"a": 1}', message(delivery_info)) == '{"a": 1}'
    assert raw_body(b'{"b": 2}', message(delivery_info)) == '{"b": 2}'
    assert raw_body(b"\xff\xfe", message(delivery_info)) == "\ufffd\ufffd"
    assert raw_body([1, 2], message(delivery_info)) == "[1, 2]"


@pytest.mark.parametrize(
    "extra",
    [
        {"options": {"points_per_side": 16, "sort_by": "predicted_iou"}},
        {"outputs": ["coco_rle", "label_map"]},
        {"ttl_seconds": 60},
        {"events": ["running"]},
    ],
)
def test_per_job_fields_are_carried_in_the_job(extra: dict[str, object]) -> None:
    job = parse_job(json.dumps({"uuid": "opt-1", "image_url": "https://example.com/a.png", **extra}))
    assert isinstance(job, JobMessage)
    assert {key: value for key, value in job.model_dump().items() if key in extra} == extra


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"options": {"points_per_side": 2}}, "options.points_per_side"),
        ({"options": {"max_masks": "10"}}, "options.max_masks"),
        ({"options": {"colour": "red"}}, "options.colour"),
        ({"outputs": ["zip"]}, "outputs.0"),
        ({"ttl_seconds": 5}, "ttl_seconds"),
        ({"events": ["started"]}, "events.0"),
    ],
)
def test_a_bad_optional_field_is_invalid_options_naming_the_field(extra: dict[str, object], field: str) -> None:
    """Only the optional fields are wrong: `invalid_options` (a `failed` callback with this code), the field named."""
    with pytest.raises(InvalidJob) as refused:
        parse_job(json.dumps({"uuid": "opt-2", "image_url": "https://x/a.png", **extra}))
    assert refused.value.code == "invalid_options" and refused.value.uuid == "opt-2"
    assert field in refused.value.reason


def test_the_servers_cap_on_points_per_side_is_invalid_options() -> None:
    body = json.dumps({"uuid": "opt-3", "image_url": "https://x/a.png", "options": {"points_per_side": 48}})
    assert isinstance(parse_job(body), JobMessage)
    with pytest.raises(InvalidJob) as refused:
        parse_job(body, max_points_per_side=32)
    assert refused.value.code == "invalid_options" and "options.points_per_side" in refused.value.reason
    assert "at most 32" in refused.value.reason


def test_a_bad_required_field_stays_invalid_job_even_with_bad_options() -> None:
    with pytest.raises(InvalidJob) as refused:
        parse_job(json.dumps({"uuid": "opt-4", "image_url": "", "options": {"points_per_side": 2}}))
    assert refused.value.code == "invalid_job"
    assert "image_url" in refused.value.reason and "options.points_per_side" in refused.value.reason


def test_cancel_messages_parse_and_bad_ones_are_named() -> None:
    cancel = parse_job(json.dumps({"uuid": "c-1", "action": "cancel"}))
    assert isinstance(cancel, CancelMessage) and cancel.uuid == "c-1"
    with pytest.raises(InvalidJob) as refused:
        parse_job(json.dumps({"uuid": "c-1", "action": "pause"}))
    assert "action" in refused.value.reason and refused.value.uuid is None  # never a callback for a bad cancel
