"""Celery monitoring events over SQS, fanned out through SNS, so that Flower shows workers and tasks.

Why Flower shows nothing on a plain SQS broker: Celery publishes its events to a `topic` exchange
(`celery.events.event.get_exchange` switches to `fanout` only for Redis and Pub/Sub). kombu's SQS transport
routes topic and direct exchanges through binding tables held in the memory of the process that declared
them, so the worker's events match no binding and are dropped. kombu 5.7 can fan out through SNS
(`transport_options["supports_fanout"] = True`, kombu PR #2372): a message published to a `fanout` exchange
becomes one SNS Publish to a topic named after the exchange, and every queue bound to that exchange is
subscribed to the topic (raw message delivery) when its consumer starts.

`enable_sqs_events` turns that on for samseg with configuration plus two small patches:

1. Configuration (`app.conf`): `supports_fanout` in the broker transport options; task events on
   (`worker_send_task_events`: Flower cannot switch them on remotely, see 4.); the event exchange, the event
   queues and the remote-control exchange named with samseg's queue prefix, so the SNS topic is
   `<prefix>celeryev`, each Flower's queue `<prefix>celeryev-<uuid>`, and an IAM policy can be scoped to
   `<prefix>*`; remote control kept off (see 4.).
2. Patch `get_exchange` (where the event dispatcher and receiver look it up) to return a `fanout` exchange
   on SQS when `supports_fanout` is set: the worker then publishes each event to the SNS topic, and each
   Flower subscribes its own SQS queue to it.
3. (samseg.queue.transport's Channel, not a patch) the no-ack delete goes through the synchronous
   boto3 client when the channel has no event loop. Flower consumes events synchronously with no kombu hub,
   and kombu deletes no-ack messages through its pycurl client, which needs a hub: it fails with
   `'NoneType' object has no attribute 'on_close'` on the first event (kombu issues #746/#758 are the same
   family). The worker always has a hub and keeps kombu's asynchronous path.
4. Not enabled: remote control (inspect, ping, stats, revoke, pool and rate-limit commands). Broadcasts would
   reach workers through SNS, but replies go to a `direct` exchange whose only binding lives in the memory of
   the requesting process, so no reply arrives; and kombu deletes the reply queue after each call, while SQS
   refuses to re-create a queue name for 60 s after it was deleted. Celery switches the worker's remote-control
   consumer on only for transports that declare `fanout` in `Transport.implements`; kombu 5.7's SQS transport
   does not, and `worker_enable_remote_control = False` keeps it off if a later kombu does.
   Gossip and mingle (worker-to-worker) stay off too: Celery enables them only on amqp/redis(/gcpubsub).
   Both would need every worker to own a subscribed queue and poll it, for features samseg does not use.

Clean-up: SQS ignores `x-expires`/`x-message-ttl` (`event_queue_expires`, `event_queue_ttl`), so a Flower's
event queue and its SNS subscription outlive it. Each process that consumes events deletes its queues and
prunes the topic's subscriptions to deleted queues (kombu's `remove_stale_sns_subscriptions`) when it exits
normally (Flower exits through `sys.exit` on SIGTERM, so `atexit` runs). `sweep_event_queues` removes what a
killed process left behind: an unconsumed event queue fills up with heartbeats, a live one stays near empty.

The patches are applied only with the exact celery and kombu versions they were written against, and only
when the broker is SQS; otherwise nothing is changed and a warning says why.
"""

from __future__ import annotations

import atexit
import functools
import logging
import threading
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from celery import Celery

from samseg.core.settings import Settings

# Standard logging, not structlog: this runs while celery_app is imported, before logging is configured, and
# an unconfigured structlog prints to stdout (which the CLI's output would then carry). Once configured, these
# records go through samseg's renderer like Celery's own.
logger = logging.getLogger(__name__)

#: Versions the patches were written against and tested with. Any other version: nothing is patched.
TESTED_VERSIONS: dict[str, str] = {"celery": "5.7.0", "kombu": "5.7.0"}
#: Flower itself is not patched (its process only needs the celery/kombu patches), so another Flower version
#: is only reported. Flower is an optional dependency (the `ops` extra).
TESTED_FLOWER_VERSION = "2.2.0"

#: Visible messages above which `sweep_event_queues` treats an event queue as abandoned. A live Flower
#: deletes each event as it receives it; one worker's heartbeats alone (every 2 s) pass this in ~17 min.
DEFAULT_SWEEP_BACKLOG = 500

#: Longest queue prefix for which `<prefix>celeryev-<uuid>` (Flower's event queue) is a valid SQS name.
MAX_PREFIX_LENGTH = 80 - len("celeryev-") - 36

_MARK = "__samseg_sqs_events__"
_lock = threading.Lock()
_receiver_queues: dict[str, set[str]] = {}  # exchange name => event queue names this process consumed from
_exit_hook: list[Callable[[], None]] = []


def event_exchange_name(settings: Settings) -> str:
    """The event exchange, i.e. the SNS topic name: `<prefix>celeryev`."""
    return f"{settings.queue_prefix}celeryev"


def enable_sqs_events(app: Celery, settings: Settings) -> None:
    """Make the worker publish monitoring events to SNS and let Flower receive them (see the module docstring).

    Call once, right after `app.config_from_object(...)`, in every process that builds the app: the worker
    (publishes), Flower (receives), and the others (harmless: they send no events). Idempotent.
    """
    if not str(app.conf.broker_url or "").startswith("sqs://"):
        logger.warning("sqs_events_skipped: the broker is not SQS (%s)", str(app.conf.broker_url).split(":", 1)[0])
        return
    mismatch = _version_mismatch()
    if mismatch:
        logger.warning(
            "sqs_events_refused: tested with %s, found %s; Celery events stay off (Flower shows nothing)",
            TESTED_VERSIONS,
            mismatch,
        )
        return
    _check_flower_version()

    prefix = settings.queue_prefix
    if len(prefix) > MAX_PREFIX_LENGTH:
        logger.warning(
            "sqs_events_refused: SAMSEG_QUEUE_PREFIX is %d characters; event queues (<prefix>celeryev-<uuid>) "
            "fit SQS's 80-character names only with at most %d",
            len(prefix),
            MAX_PREFIX_LENGTH,
        )
        return
    app.conf.broker_transport_options = {**(app.conf.broker_transport_options or {}), "supports_fanout": True}
    app.conf.update(
        worker_send_task_events=True,  # task-received/started/succeeded/failed; Flower cannot turn them on
        event_exchange=event_exchange_name(settings),  # SNS topic name
        event_queue_prefix=f"{prefix}celeryev",  # each receiver's queue: <prefix>celeryev.<uuid>
        control_exchange=f"{prefix}celery",  # Flower's broadcasts, if any, go to topic <prefix>celery-pidbox
        worker_enable_remote_control=False,  # no replies on SQS (see module docstring, 4.)
    )
    _patch_event_exchange()
    _patch_receiver_cleanup(app)
    logger.info("sqs_events_enabled: SNS topic %s, event queues %sceleryev-*", event_exchange_name(settings), prefix)


def sweep_event_queues(app: Celery, settings: Settings, min_backlog: int = DEFAULT_SWEEP_BACKLOG) -> list[str]:
    """Delete event queues abandoned by killed receivers (Flower), then their SNS subscriptions.

    An event queue whose consumer is alive is kept near empty (no-ack: each message is deleted as it is
    received); one whose consumer is gone accumulates every event. Queues with at least `min_backlog`
    visible messages are deleted. Returns the SQS names of the deleted queues.
    """
    from botocore.exceptions import ClientError

    exchange = event_exchange_name(settings)
    deleted: list[str] = []
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        sqs = channel.sqs()
        listing_prefix = channel.canonical_queue_name(f"{settings.queue_prefix}celeryev.")
        for page in sqs.get_paginator("list_queues").paginate(QueueNamePrefix=listing_prefix):
            for url in page.get("QueueUrls", []):
                try:
                    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
                    backlog = int(attrs["Attributes"]["ApproximateNumberOfMessages"])
                    if backlog >= min_backlog:
                        sqs.delete_queue(QueueUrl=url)
                        deleted.append(url.rsplit("/", 1)[-1])
                except ClientError as exc:
                    logger.warning("sqs_events_sweep_failed: %s: %s", url, exc)
        _remove_stale_subscriptions(channel, exchange)
    if deleted:
        logger.info("sqs_events_swept: %s", deleted)
    return deleted


# --- version guard -----------------------------------------------------------------------------------------
def _installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _version_mismatch() -> dict[str, str | None]:
    found = {name: _installed(name) for name in TESTED_VERSIONS}
    return {name: v for name, v in found.items() if v != TESTED_VERSIONS[name]}


def _check_flower_version() -> None:
    flower = _installed("flower")
    if flower is not None and flower != TESTED_FLOWER_VERSION:
        logger.warning("sqs_events_untested_flower: tested with flower %s, found %s", TESTED_FLOWER_VERSION, flower)


# --- patches ---------------------------------------------------------------------------------------------
def _is_sqs_fanout(conn: Any) -> bool:
    """True for a kombu Connection to SQS with SNS fan-out switched on."""
    try:
        return bool(conn.transport.driver_type == "sqs" and (conn.transport_options or {}).get("supports_fanout"))
    except AttributeError:
        return False


def _patch_event_exchange() -> None:
    """Patch 2: a `fanout` event exchange on SQS with `supports_fanout` (Celery does this for Redis only).

    `EventDispatcher` (worker) and `EventReceiver` (Flower) each imported `get_exchange` by name, so the
    function is replaced in their modules (and in `celery.events`/`celery.events.event` for anyone else).
    """
    from celery import events as events_pkg
    from celery.events import dispatcher, event, receiver

    original = event.get_exchange
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def get_exchange(conn: Any, name: str = event.EVENT_EXCHANGE_NAME) -> Any:
        exchange = original(conn, name=name)
        if _is_sqs_fanout(conn):
            exchange.type = "fanout"
        return exchange

    setattr(get_exchange, _MARK, True)
    for module in (event, events_pkg, dispatcher, receiver):
        if getattr(module, "get_exchange", None) is original:
            module.get_exchange = get_exchange


def _patch_receiver_cleanup(app: Celery) -> None:
    """Record every event queue an `EventReceiver` in this process consumes from; delete them at exit.

    SQS has no auto-delete or expiry, so without this each Flower start (and each of its reconnects, which
    create a new receiver with a new uuid) leaves a queue and an SNS subscription behind.
    """
    from celery.events.receiver import EventReceiver

    original = EventReceiver.get_consumers
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def get_consumers(self: Any, consumer_cls: Any, channel: Any) -> Any:
        if self.exchange.type == "fanout" and _is_sqs_fanout(self.connection):
            with _lock:
                _receiver_queues.setdefault(self.exchange.name, set()).add(self.queue.name)
                if not _exit_hook:
                    _exit_hook.append(functools.partial(_delete_receiver_queues, app))
                    atexit.register(_exit_hook[0])
        return original(self, consumer_cls, channel)

    setattr(get_consumers, _MARK, True)
    EventReceiver.get_consumers = get_consumers


# --- clean-up --------------------------------------------------------------------------------------------
def _delete_receiver_queues(app: Celery) -> None:
    """atexit: delete this process's event queues, then the topic's subscriptions to deleted queues."""
    from botocore.exceptions import ClientError

    with _lock:
        pending = {exchange: sorted(names) for exchange, names in _receiver_queues.items()}
        _receiver_queues.clear()
    try:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            sqs = channel.sqs()
            for exchange, names in pending.items():
                for name in names:
                    try:
                        url = sqs.get_queue_url(QueueName=channel.canonical_queue_name(name))["QueueUrl"]
                        sqs.delete_queue(QueueUrl=url)
                    except ClientError as exc:
                        logger.warning("sqs_events_queue_not_deleted: %s: %s", name, exc)
                _remove_stale_subscriptions(channel, exchange)
    except Exception as exc:  # at exit: report, never raise (the sweep catches up)
        logger.warning("sqs_events_cleanup_failed: %r", exc)


def _remove_stale_subscriptions(channel: Any, exchange: str) -> None:
    """kombu's helper: unsubscribe the topic's SQS subscriptions whose queue no longer exists.

    SQS may still answer GetQueueUrl for a just-deleted queue for up to a minute; such a subscription goes at
    the next clean-up (any receiver's start runs this helper too, through kombu's exchange initialisation).
    """
    channel.exchange_declare(exchange=exchange, type="fanout")  # the helper acts on declared fanout exchanges
    channel.remove_stale_sns_subscriptions(exchange)
