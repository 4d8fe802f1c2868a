"""The lifecycle's promises for every interleaving, on the DynamoDB job store (a moto server stands in for
DynamoDB: conditional writes are evaluated by moto exactly as the API specifies). The same machine as the
SQLite run in tests/unit/test_lifecycle_properties.py; fewer examples, each on a fresh table."""

from __future__ import annotations

import secrets

from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from samseg.stores.dynamo_jobs import DynamoJobs
from tests.lifecycle_machine import LifecycleMachine
from tests.unit.test_job_store import DAY, dynamo_client
from tests.unit.test_lifecycle_properties import MACHINE_SETTINGS, quiet_logs  # noqa: F401  (fixture)

EXAMPLES = 30


def test_every_interleaving_ends_each_run_once_on_dynamodb(moto_url: str) -> None:
    client = dynamo_client(moto_url)

    class OnDynamo(LifecycleMachine):
        def make_backend(self) -> DynamoJobs:  # type: ignore[override]
            backend = DynamoJobs(client, f"lifecycle-{secrets.token_hex(4)}", DAY)
            backend.ensure()
            return backend

    run_state_machine_as_test(OnDynamo, settings=settings(MACHINE_SETTINGS, max_examples=EXAMPLES))
