"""Celery settings for samseg, derived from the one Settings class (environment and `.env`)."""

from __future__ import annotations

from kombu import Exchange, Queue

from samseg.core.settings import get_settings

_s = get_settings()

broker_url = _s.broker_url
broker_transport_options = {
    "region": _s.aws_region,
    "is_secure": _s.sqs_is_secure,
    # Applied by kombu only to queues it creates; `samseg queues ensure` sets it on existing ones.
    "visibility_timeout": _s.visibility_timeout_seconds,
    "wait_time_seconds": 10,  # long polling: one ReceiveMessage per 10 s per idle queue, no busy loop
    # With SAMSEG_SQS_PROMPT_POLLING (samseg/queue/polling.py) a queue is polled again at once after an empty
    # long poll and as soon as a prefetch slot frees; this interval is then only the wait after a failed poll
    # and the safety re-check of a queue whose slots are full. Without it, kombu waits this long in both cases.
    "polling_interval": 1,
    # samseg prefixes its own queue names itself (see task_queues): kombu's queue_name_prefix would also
    # rename the app server's jobs queue, whose name must stay exactly SAMSEG_JOBS_QUEUE.
    "queue_name_prefix": "",
    # prod-k8s: SentTimestamp for samseg_queue_wait_seconds (samseg/ops/scaling_signal.py); kombu needs the other.
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
# prod-k8s: prefork workers with REMAP_SIGTERM=SIGQUIT (the io worker in deploy/): SIGTERM waits this long for running
# tasks, then hands their messages back to SQS. Thread pools use samseg/ops/soft_shutdown.py instead (Celery cannot
# cancel a thread). docs/deployment-kubernetes.md "Grace periods". 0 = Celery's default (no soft wait).
worker_soft_shutdown_timeout = _s.worker_soft_shutdown_timeout_seconds
worker_hijack_root_logger = False
worker_send_task_events = False
task_send_sent_event = False

_default_exchange = Exchange("samseg", type="direct")
task_queues = (
    Queue(_s.io_queue, _default_exchange, routing_key=_s.io_queue),
    Queue(_s.gpu_queue, _default_exchange, routing_key=_s.gpu_queue),
)
task_default_queue = _s.io_queue
task_default_exchange = "samseg"
task_default_routing_key = _s.io_queue
task_routes = {"samseg.segment": {"queue": _s.gpu_queue, "routing_key": _s.gpu_queue}}
task_create_missing_queues = True

task_soft_time_limit = _s.io_soft_time_limit_seconds  # 300 s by default
task_time_limit = _s.io_time_limit_seconds  # 360 s by default
# The segment task gets its own limits (SAMSEG_SEGMENT_TIME_LIMIT_SECONDS) via task options.

beat_schedule = {
    "purge-old-assets": {
        "task": "samseg.stores.purge",
        "schedule": _s.cleanup_interval_seconds,
        # A purge nobody ran within a period is superseded by the next one (at least 5 min of slack).
        "options": {"queue": _s.io_queue, "expires": max(300.0, _s.cleanup_interval_seconds)},
    },
    # Stage messages the io/gpu queues dead-lettered (their worker died on every delivery) end their run.
    "reap-dead-tasks": {
        "task": "samseg.reap_dead_tasks",
        "schedule": 60.0,
        "options": {"queue": _s.io_queue, "expires": 60.0},
    },
}
beat_schedule_filename = str(_s.state_dir / "celerybeat-schedule")  # beat's own host-local file
# Beat opens that file before any samseg signal handler runs; a fresh host has no state dir yet.
_s.state_dir.mkdir(parents=True, exist_ok=True)
beat_max_loop_interval = min(300.0, _s.cleanup_interval_seconds)

timezone = "UTC"
enable_utc = True
