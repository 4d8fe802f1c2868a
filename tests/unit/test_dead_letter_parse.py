"""samseg.queue.dead_letters: bodies that are not Celery task messages are refused with the reason.

Real task messages, published by samseg's own Celery app to moto and dead-lettered there, are
tests/integration/test_dead_letters.py.
"""

from __future__ import annotations

import json

import pytest

from samseg.queue.dead_letters import NotATaskMessage, parse_task_message


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("", "neither JSON"),
        (json.dumps({"uuid": "x", "image_url": "y"}), "no task headers"),
        (
            json.dumps({"headers": {"task": "t", "id": "i"}, "body": "%%%", "properties": {"body_encoding": "base64"}}),
            "not valid base64",
        ),
        (json.dumps({"headers": {"task": "t", "id": "i"}, "body": "[1]", "properties": {}}), "not an \\[args"),
    ],
)
def test_unreadable_bodies_say_why(body, why):
    with pytest.raises(NotATaskMessage, match=why):
        parse_task_message(body)
