"""The job store in DynamoDB (`dynamodb://TABLE`): what lets every host share job state without a disk.

Each operation is one PutItem/UpdateItem whose ConditionExpression is the rule (DynamoDB evaluates it
atomically with the write); a refused condition is the normal "someone else got there first" answer, not an
error. Reads are strongly consistent. The table is on-demand (no capacity to plan), items carry an
`expires_at` TTL attribute, and a sparse global secondary index over finished-but-not-purged records lets
the purge read exactly the expired jobs instead of scanning the table.
"""

from __future__ import annotations

import contextlib
import json
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import structlog

from samseg.core.contracts import CallbackStatus, ErrorInfo, JobState, Stage
from samseg.stores.jobs import TERMINAL_RANK, JobRecord, lifecycle_fields, parse_lifecycle_fields, rank

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

log = structlog.get_logger(__name__)

PURGE_INDEX = "purge-due"
PURGE_SHARD = "due"  # the one partition of the sparse purge index: present only while assets await the purge
SWEEP_INDEX = "sweep-due"
SWEEP_SHARD = "active"  # the one partition of the sparse index of active runs: present only while sweep_due is set


SWEEP_ATTRIBUTES: Any = (
    {"AttributeName": "sweep_shard", "AttributeType": "S"},
    {"AttributeName": "sweep_due", "AttributeType": "N"},
)
SWEEP_GSI: Any = {
    "IndexName": SWEEP_INDEX,
    "KeySchema": [
        {"AttributeName": "sweep_shard", "KeyType": "HASH"},
        {"AttributeName": "sweep_due", "KeyType": "RANGE"},
    ],
    "Projection": {"ProjectionType": "ALL"},
}


class DynamoJobs:
    def __init__(self, client: DynamoDBClient, table: str, record_ttl_seconds: float) -> None:
        self.client = client
        self.table = table
        self.record_ttl_seconds = record_ttl_seconds

    def ensure(self) -> None:
        """Create the table, its purge and sweep indexes and TTL if missing (idempotent; several hosts may race).

        A table made by an older samseg gets the sweep index added (DynamoDB backfills it online)."""
        try:
            table = self.client.describe_table(TableName=self.table)["Table"]
        except self.client.exceptions.ResourceNotFoundException:
            pass
        else:
            if SWEEP_INDEX not in {index["IndexName"] for index in table.get("GlobalSecondaryIndexes", [])}:
                with contextlib.suppress(self.client.exceptions.ResourceInUseException):
                    self.client.update_table(
                        TableName=self.table,
                        AttributeDefinitions=list(SWEEP_ATTRIBUTES),
                        GlobalSecondaryIndexUpdates=[{"Create": SWEEP_GSI}],
                    )
                log.info("job_table_sweep_index_added", table=self.table)
            return
        # ResourceInUse: another host created it in between.
        with contextlib.suppress(self.client.exceptions.ResourceInUseException):
            self.client.create_table(
                TableName=self.table,
                BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[
                    {"AttributeName": "uuid", "AttributeType": "S"},
                    {"AttributeName": "purge_shard", "AttributeType": "S"},
                    {"AttributeName": "finished_at", "AttributeType": "N"},
                    *SWEEP_ATTRIBUTES,
                ],
                KeySchema=[{"AttributeName": "uuid", "KeyType": "HASH"}],
                GlobalSecondaryIndexes=[
                    {
                        "IndexName": PURGE_INDEX,
                        "KeySchema": [
                            {"AttributeName": "purge_shard", "KeyType": "HASH"},
                            {"AttributeName": "finished_at", "KeyType": "RANGE"},
                        ],
                        "Projection": {"ProjectionType": "ALL"},
                    },
                    SWEEP_GSI,
                ],
            )
        self.client.get_waiter("table_exists").wait(TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
        try:
            self.client.update_time_to_live(
                TableName=self.table, TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"}
            )
        except self.client.exceptions.ClientError as exc:  # already enabled by a racing host
            log.info("job_table_ttl_unchanged", error=str(exc))
        log.info("job_table_created", table=self.table)

    def get(self, uuid: str) -> JobRecord | None:
        item = self.client.get_item(TableName=self.table, Key={"uuid": {"S": uuid}}, ConsistentRead=True).get("Item")
        return _record(item) if item else None

    def insert(self, record: JobRecord) -> bool:
        return self._conditional(
            lambda: self.client.put_item(
                TableName=self.table,
                Item=self._item(record),
                ConditionExpression="attribute_not_exists(#u)",
                ExpressionAttributeNames={"#u": "uuid"},
            )
        )

    def swap(self, expected_version: int, record: JobRecord) -> bool:
        return self._conditional(
            lambda: self.client.put_item(
                TableName=self.table,
                Item=self._item(record),
                ConditionExpression="#v = :v",
                ExpressionAttributeNames={"#v": "version"},
                ExpressionAttributeValues={":v": {"N": str(expected_version)}},
            )
        )

    def advance(
        self,
        uuid: str,
        run_id: str,
        state: JobState,
        stage: Stage | None,
        now: float,
        error: ErrorInfo | None,
        callback: CallbackStatus | None,
    ) -> bool:
        new_rank = rank(state, stage)
        sets = ["#s = :s", "#r = :r", "updated_at = :now", "expires_at = :exp", "version = version + :one"]
        removes: list[str] = []
        values: dict[str, Any] = {
            ":s": {"S": state.value},
            ":r": {"N": str(new_rank)},
            ":now": _n(now),
            ":exp": {"N": str(int(now + self.record_ttl_seconds))},
            ":one": {"N": "1"},
            ":run": {"S": run_id},
        }
        if stage is not None:
            sets.append("stage = :stage")
            values[":stage"] = {"S": stage.value}
        else:
            removes.append("stage")
        if error is not None:
            sets.append("#e = :e")
            values[":e"] = {"S": error.model_dump_json()}
        elif state is JobState.COMPLETED:
            removes.append("#e")
        if callback is not None:
            sets.append("callback = :cb")
            values[":cb"] = {"S": callback.model_dump_json()}
        if new_rank == TERMINAL_RANK:
            sets += ["finished_at = if_not_exists(finished_at, :now)", "purge_shard = :due"]
            values[":due"] = {"S": PURGE_SHARD}
        names = {"#s": "status", "#r": "rank"}
        if "#e" in " ".join(sets + removes):
            names["#e"] = "error"
        expression = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
        return self._conditional(
            lambda: self.client.update_item(
                TableName=self.table,
                Key={"uuid": {"S": uuid}},
                UpdateExpression=expression,
                ConditionExpression="run_id = :run AND (#r < :r OR (#r = :r AND #s = :s))",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        )

    def mark_published(self, uuid: str, run_id: str) -> bool:
        return self._conditional(
            lambda: self.client.update_item(
                TableName=self.table,
                Key={"uuid": {"S": uuid}},
                UpdateExpression="SET published = :t, version = version + :one",
                ConditionExpression="run_id = :run",
                ExpressionAttributeValues={":t": {"BOOL": True}, ":one": {"N": "1"}, ":run": {"S": run_id}},
            )
        )

    def finished_before(self, before: float, limit: int) -> list[JobRecord]:
        response = self.client.query(
            TableName=self.table,
            IndexName=PURGE_INDEX,
            KeyConditionExpression="purge_shard = :due AND finished_at < :before",
            ExpressionAttributeValues={":due": {"S": PURGE_SHARD}, ":before": _n(before)},
            Limit=limit,
        )
        return [_record(item) for item in response.get("Items", [])]

    def sweep_due_before(self, before: float, limit: int) -> list[JobRecord]:
        response = self.client.query(
            TableName=self.table,
            IndexName=SWEEP_INDEX,
            KeyConditionExpression="sweep_shard = :active AND sweep_due < :before",
            ExpressionAttributeValues={":active": {"S": SWEEP_SHARD}, ":before": _n(before)},
            Limit=limit,
        )
        # The index is eventually consistent: re-read each record before acting on it (the caller does).
        return [_record(item) for item in response.get("Items", [])]

    def mark_purged(self, uuid: str, run_id: str | None, finished_at: float) -> bool:
        values: dict[str, Any] = {":t": {"BOOL": True}, ":one": {"N": "1"}, ":f": _n(finished_at)}
        condition = "finished_at = :f AND "
        if run_id is None:
            condition += "attribute_not_exists(run_id)"
        else:
            condition += "run_id = :run"
            values[":run"] = {"S": run_id}
        return self._conditional(
            lambda: self.client.update_item(
                TableName=self.table,
                Key={"uuid": {"S": uuid}},
                UpdateExpression="SET assets_purged = :t, version = version + :one REMOVE purge_shard",
                ConditionExpression=condition,
                ExpressionAttributeValues=values,
            )
        )

    def delete_expired(self, now: float, limit: int = 1000) -> int:
        return 0  # DynamoDB's TTL deletes expired items itself (within about two days of expires_at)

    def describe(self) -> str:
        self.client.describe_table(TableName=self.table)
        return f"dynamodb table {self.table}"

    def _conditional(self, write: Any) -> bool:
        try:
            write()
        except self.client.exceptions.ConditionalCheckFailedException:
            return False
        return True

    def _item(self, r: JobRecord) -> dict[str, Any]:
        item: dict[str, Any] = {
            "uuid": {"S": r.uuid},
            "status": {"S": r.status.value},
            "rank": {"N": str(r.rank)},
            "updated_at": _n(r.updated_at),
            "published": {"BOOL": r.published},
            "claimed_at": _n(r.claimed_at),
            "assets_purged": {"BOOL": r.assets_purged},
            "version": {"N": str(r.version)},
            "expires_at": {"N": str(int(r.updated_at + self.record_ttl_seconds))},
        }
        optional = {
            "stage": r.stage.value if r.stage else None,
            "run_id": r.run_id,
            "message_id": r.message_id,
            "error": r.error.model_dump_json() if r.error else None,
            "callback": r.callback.model_dump_json() if r.callback else None,
            "lifecycle": json.dumps(lifecycle_fields(r)),
        }
        item.update({name: {"S": value} for name, value in optional.items() if value is not None})
        if r.finished_at is not None:
            item["finished_at"] = _n(r.finished_at)
            if not r.assets_purged:
                item["purge_shard"] = {"S": PURGE_SHARD}
        if r.sweep_due is not None:
            item["sweep_due"] = _n(r.sweep_due)
            item["sweep_shard"] = {"S": SWEEP_SHARD}
        return item


def _n(value: float) -> dict[str, str]:
    return {"N": str(Decimal(repr(round(value, 6))))}


def _record(item: dict[str, Any]) -> JobRecord:
    def text(name: str) -> str | None:
        value = item.get(name)
        return str(value["S"]) if value else None

    def number(name: str) -> float | None:
        value = item.get(name)
        return float(value["N"]) if value else None

    error, callback, stage = text("error"), text("callback"), text("stage")
    return JobRecord(
        uuid=str(item["uuid"]["S"]),
        status=JobState(item["status"]["S"]),
        stage=Stage(stage) if stage else None,
        updated_at=number("updated_at") or time.time(),
        run_id=text("run_id"),
        message_id=text("message_id"),
        published=bool(item.get("published", {}).get("BOOL", False)),
        claimed_at=number("claimed_at") or 0.0,
        finished_at=number("finished_at"),
        error=ErrorInfo.model_validate(json.loads(error)) if error else None,
        callback=CallbackStatus.model_validate(json.loads(callback)) if callback else None,
        assets_purged=bool(item.get("assets_purged", {}).get("BOOL", False)),
        version=int(item.get("version", {}).get("N", "0")),
        sweep_due=number("sweep_due"),
        **parse_lifecycle_fields(text("lifecycle")),
    )
