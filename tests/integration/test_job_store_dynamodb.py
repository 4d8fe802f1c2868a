"""The job store's guarantees on DynamoDB, and across processes on every backend.

DynamoDB is moto's server on loopback (the AWS stand-in: same wire protocol, conditional writes evaluated
server-side). The cases are tests/unit/test_job_store.py's, collected here again with the `target` fixture
below, so both backends run the same code. Separate processes (spawned, each building its own backend from
plain strings) race on one uuid the way several workers on several hosts do. Nothing of samseg is mocked.
"""

from __future__ import annotations

import multiprocessing
import secrets
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from samseg.stores.jobs import JobStore
from tests.unit.test_job_store import (  # noqa: F401  (the unit cases, collected again here against DynamoDB)
    STALE,
    dynamo_client,
    make_backend,
    store,
    test_a_publisher_that_died_before_publishing_is_resumed_by_the_next_delivery,
    test_a_write_for_a_replaced_run_is_refused,
    test_failed_and_stale_runs_are_taken_over_completed_and_live_ones_are_not,
    test_impossible_state_stage_pairs_are_refused_before_the_store,
    test_many_threads_claiming_one_uuid_get_exactly_one_run,
    test_marking_purged_is_refused_once_the_job_was_re_run,
    test_post_jobs_placeholder_never_overwrites_a_record,
    test_purge_index_lists_finished_unpurged_jobs_oldest_first_and_forgets_purged_ones,
    test_racing_takeovers_of_a_failed_run_give_one_new_run,
    test_statuses_never_go_backwards_under_concurrent_writes,
    test_the_same_message_delivered_twice_at_once_yields_one_run,
)


@pytest.fixture
def target(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """DynamoDB on moto for the unit cases; the process race below asks for each backend by name."""
    kind = getattr(request, "param", "dynamodb")
    if kind == "sqlite":
        return "sqlite", str(tmp_path / "jobs.sqlite")
    moto_url = request.getfixturevalue("moto_url")
    return "dynamodb", f"{moto_url}|jobs-{secrets.token_hex(4)}"


def _claim_in_child(kind: str, where: str, uuid: str, worker: int, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    jobs = JobStore(make_backend(kind, where), STALE)
    for attempt in range(4):
        claim = jobs.claim(uuid, f"m-{worker}-{attempt}")
        results.put((claim.decision.value, claim.record.run_id))


@pytest.mark.parametrize("target", ["sqlite", "dynamodb"], indirect=True)
def test_many_processes_claiming_one_uuid_get_exactly_one_run(store, target):  # noqa: F811  (the fixture)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    children = [context.Process(target=_claim_in_child, args=(*target, "job-p", w, results)) for w in range(6)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=120) for _ in range(6 * 4)]
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    runs = [run_id for decision, run_id in outcomes if decision == "run"]
    assert len(runs) == 1, Counter(d for d, _ in outcomes)
    assert {run_id for _, run_id in outcomes} == {runs[0]}  # everyone saw the same run
    assert store.get("job-p").run_id == runs[0]


def test_the_stand_in_evaluates_a_condition_and_writes_as_one_step(moto_url):
    """The exactly-once claim rests on DynamoDB checking a ConditionExpression and writing in one step. moto does
    not by itself (tests.support.make_moto_atomic); this pins the fix: twelve threads race a create-if-absent on
    one key, many rounds, with Python switching threads as often as it can, and each round has one winner."""
    table = f"race-{secrets.token_hex(4)}"
    dynamo_client(moto_url).create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "u", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "u", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    clients = [dynamo_client(moto_url) for _ in range(12)]  # one per thread
    winners: list[list[int]] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # widen the race window the unlocked stand-in had (9 of 150 rounds lost)
    try:
        for round_ in range(60):
            won: list[int] = []
            start = threading.Barrier(len(clients))
            threads = [
                threading.Thread(target=_create_if_absent, args=(c, table, f"k{round_}", start, won)) for c in clients
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            winners.append(won)
    finally:
        sys.setswitchinterval(interval)
    assert [len(won) for won in winners] == [1] * len(winners)


def _create_if_absent(client, table: str, key: str, start: threading.Barrier, won: list[int]) -> None:  # type: ignore[no-untyped-def]
    start.wait()
    try:
        client.put_item(
            TableName=table,
            Item={"u": {"S": key}, "w": {"N": str(threading.get_ident())}},
            ConditionExpression="attribute_not_exists(u)",
        )
        won.append(threading.get_ident())
    except client.exceptions.ConditionalCheckFailedException:
        pass
