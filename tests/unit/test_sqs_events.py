"""samseg.queue.events in-process: what enable_sqs_events configures on a Celery app, and when it refuses.

Flower and a worker exchanging those events over moto's SQS and SNS are tests/integration/test_flower.py.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from samseg.core.settings import Settings


def _settings(**kw: Any) -> Settings:
    return Settings(_env_file=None, **kw)


def test_enable_configures_app_and_patches_only_sqs_fanout() -> None:
    from celery.events import dispatcher, receiver
    from kombu import Connection

    from samseg.queue.events import enable_sqs_events

    app = Celery("t", set_as_current=False)
    app.conf.broker_url = "sqs://127.0.0.1:1"
    app.conf.broker_transport_options = {"region": "us-east-1"}
    enable_sqs_events(app, _settings(queue_prefix="abc-"))

    assert app.conf.broker_transport_options == {"region": "us-east-1", "supports_fanout": True}
    assert app.conf.event_exchange == "abc-celeryev"
    assert app.conf.event_queue_prefix == "abc-celeryev"
    assert app.conf.worker_send_task_events is True
    assert app.conf.worker_enable_remote_control is False
    fanout = Connection("sqs://127.0.0.1:1", transport_options={"supports_fanout": True})
    plain = Connection("sqs://127.0.0.1:1")
    assert dispatcher.get_exchange(fanout, name="x").type == "fanout"
    assert receiver.get_exchange(fanout, name="x").type == "fanout"
    assert dispatcher.get_exchange(plain, name="x").type == "topic"  # unchanged without supports_fanout
    assert dispatcher.get_exchange(Connection("memory://"), name="x").type == "topic"


def test_enable_refuses_untested_versions_and_other_brokers(monkeypatch, caplog) -> None:
    import samseg.queue.events as events

    caplog.set_level(logging.WARNING, logger="samseg.queue.events")
    app = Celery("t", set_as_current=False)
    app.conf.broker_url = "sqs://"
    monkeypatch.setitem(events.TESTED_VERSIONS, "kombu", "0.0.1")
    events.enable_sqs_events(app, _settings())
    assert "sqs_events_refused" in caplog.text
    assert "supports_fanout" not in (app.conf.broker_transport_options or {})
    assert app.conf.worker_send_task_events is False

    monkeypatch.undo()
    events.enable_sqs_events(app, _settings(queue_prefix="p" * (events.MAX_PREFIX_LENGTH + 1)))
    assert "SAMSEG_QUEUE_PREFIX is 36 characters" in caplog.text
    assert app.conf.worker_send_task_events is False

    other = Celery("t", set_as_current=False)
    other.conf.broker_url = "redis://localhost"
    events.enable_sqs_events(other, _settings())
    assert "sqs_events_skipped" in caplog.text
    assert other.conf.event_exchange == "celeryev"
