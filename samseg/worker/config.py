"""Celery's configuration for samseg, derived from the one Settings class: `celery_config(settings)`.

A function, not a module of globals: `samseg.worker.app.create_app` calls it, so importing this reads no
settings and creates no directory. Every value keeps its reason next to it.
"""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

from samseg.core.settings import Settings
from samseg.worker import chain as names


def celery_config(s: Settings) -> dict[str, Any]:
    broker_url = s.broker_url
    broker_transport_options = {
        "region": s.aws_region,
        "is_secure": s.sqs_is_secure,
        # Applied by kombu only to queues it creates; `samseg queues ensure` sets it on existing ones.
        "visibility_timeout": s.visibility_timeout_seconds,
        "wait_time_seconds": 10,  # long polling: one ReceiveMessage per 10 s per idle queue, no busy loop
        # With SAMSEG_SQS_PROMPT_POLLING (samseg/queue/polling.py) a queue is polled again at once after an empty
        # long poll and as soon as a prefetch slot frees; this interval is then only the wait after a failed poll
        # and the safety re-check of a queue whose slots are full. Without it, kombu waits this long in both cases.
        "polling_interval": 1,
        # samseg prefixes its own queue names itself (see task_queues): kombu's queue_name_prefix would also
        # rename the app server's jobs queue, whose name must stay exactly SAMSEG_JOBS_QUEUE.
        "queue_name_prefix": "",
        # SentTimestamp for samseg_queue_wait_seconds (samseg/ops/scaling_signal.py); kombu needs the other.
        "fetch_message_attributes": ["ApproximateReceiveCount", "SentTimestamp"],
    }
    broker_connection_retry_on_startup = True
    # Publishing the next link of a chain (or a retry) rides out a short SQS outage: ~1 min of retries before the
    # stage gives up and its message is left to SQS's redelivery (samseg.worker.stages.StageTask).
    task_publish_retry = True
    task_publish_retry_policy = {"max_retries": 15, "interval_start": 0.5, "interval_step": 1.0, "interval_max": 5.0}
    broker_connection_max_retries = None  # keep retrying while SQS is unreachable

    # No result backend: chain results travel with the messages, and job status has its own store
    # (samseg.stores: SQLite or DynamoDB, every write conditional), which Celery's backends are not.
    result_backend = None
    task_ignore_result = True

    task_serializer = "json"
    result_serializer = "json"
    accept_content = ["json"]

    # At-least-once: a task is acknowledged only after it finished, and a task whose worker died is
    # redelivered (after the visibility timeout) instead of being lost.
    task_acks_late = True
    task_reject_on_worker_lost = True
    task_acks_on_failure_or_timeout = True
    # One message per pool slot by default; a worker command may prefetch more (`samseg up`'s prefork segment
    # worker takes --prefetch-multiplier 2 so the next segment message is already local when one ends).
    worker_prefetch_multiplier = 1
    # Prefork workers with REMAP_SIGTERM=SIGQUIT (the io worker in deploy/): SIGTERM waits this long for running
    # tasks, then hands their messages back to SQS. Thread pools use samseg/ops/soft_shutdown.py instead (Celery
    # cannot cancel a thread). docs/deployment-kubernetes.md "Grace periods". 0 = Celery's default (no soft wait).
    worker_soft_shutdown_timeout = s.worker_soft_shutdown_timeout_seconds
    worker_hijack_root_logger = False
    worker_send_task_events = False
    task_send_sent_event = False

    default_exchange = Exchange("samseg", type="direct")
    task_queues = (
        Queue(s.io_queue, default_exchange, routing_key=s.io_queue),
        Queue(s.gpu_queue, default_exchange, routing_key=s.gpu_queue),
    )
    task_default_queue = s.io_queue
    task_default_exchange = "samseg"
    task_default_routing_key = s.io_queue
    task_routes = {names.SEGMENT: {"queue": s.gpu_queue, "routing_key": s.gpu_queue}}
    task_create_missing_queues = True

    task_soft_time_limit = s.io_soft_time_limit_seconds  # 300 s by default
    task_time_limit = s.io_time_limit_seconds  # 360 s by default
    # The segment and notify tasks get their own limits, as annotations so the task modules read no settings.
    segment_limit = s.segment_time_limit_seconds
    # notify only ends the run; each callback attempt is its own task (samseg.worker.outbox).
    notify_limit = int(3 * s.callback_timeout_seconds + 60)
    task_annotations = {
        # The soft limit leaves the task time to fail cleanly (status, callback) before the hard kill.
        names.SEGMENT: {"time_limit": segment_limit, "soft_time_limit": max(0.8 * segment_limit, segment_limit - 30)},
        names.NOTIFY: {"time_limit": notify_limit, "soft_time_limit": notify_limit - 10},
        names.DELIVER_CALLBACK: {"time_limit": notify_limit, "soft_time_limit": notify_limit - 10},
    }

    beat_schedule = {
        "purge-old-assets": {
            "task": names.PURGE,
            "schedule": s.cleanup_interval_seconds,
            # A purge nobody ran within a period is superseded by the next one (at least 5 min of slack).
            "options": {"queue": s.io_queue, "expires": max(300.0, s.cleanup_interval_seconds)},
        },
        # Runs stuck past their stage's lease, their claim's publish lease or their callback's due time.
        "sweep-stuck-runs": {
            "task": names.SWEEP,
            "schedule": 60.0,
            "options": {"queue": s.io_queue, "expires": 60.0},
        },
        # Stage messages the io/gpu queues dead-lettered (their worker died on every delivery) end their run.
        "reap-dead-tasks": {
            "task": names.REAP_DEAD_TASKS,
            "schedule": 60.0,
            "options": {"queue": s.io_queue, "expires": 60.0},
        },
    }
    # Beat's own host-local file; its scheduler makes its folder before opening it (a fresh host has none).
    beat_schedule_filename = str(s.state_dir / "celerybeat-schedule")
    beat_scheduler = "samseg.worker.beat_schedule:StateDirScheduler"
    beat_max_loop_interval = min(300.0, s.cleanup_interval_seconds)

    timezone = "UTC"
    enable_utc = True

    # Every local above that is a Celery setting name is returned; the helpers are not.
    helpers = {"s", "default_exchange", "segment_limit", "notify_limit"}
    return {name: value for name, value in locals().items() if name not in helpers and name != "helpers"}
