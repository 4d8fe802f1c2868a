"""The blob-store cases of tests/unit/test_blob_stores.py against S3: moto's server on loopback (the AWS
stand-in, speaking the real S3 protocol), one fresh bucket per test. The cases are collected here again with
the `blobs` fixture below; `stores` (imported with them) builds on whichever `blobs` the test sees.
"""

from __future__ import annotations

import secrets

import boto3
import pytest

from samseg.stores.blobs import BlobStore, S3Blobs
from tests.unit.test_blob_stores import (  # noqa: F401  (the unit cases, collected again here against S3)
    stores,
    test_a_failed_publish_leaves_the_job_unpublished_and_empty,
    test_a_failing_upload_stops_the_batch_and_raises,
    test_a_re_run_with_fewer_masks_leaves_no_stale_mask_behind,
    test_check_reports_the_store_and_fails_for_a_missing_bucket,
    test_files_round_trip_and_children_are_listed_in_order,
    test_publish_writes_masks_then_the_result_and_masks_decode_to_what_was_packed,
    test_purge_removes_expired_jobs_only_and_keeps_their_records,
    test_purge_sweeps_work_of_dead_runs_and_keeps_live_and_recent_ones,
    test_put_get_head_walk_delete,
    test_remove_job_unpublishes_first_and_counts_what_it_removed,
    test_unsafe_keys_are_refused,
    test_work_files_are_keyed_by_run_so_discarding_one_run_keeps_the_other,
)


@pytest.fixture
def blobs(moto_url: str) -> BlobStore:
    client = boto3.client(
        "s3", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
    )
    bucket = f"b-{secrets.token_hex(4)}"
    client.create_bucket(Bucket=bucket)
    return S3Blobs(client, bucket, "some/prefix", concurrency=4)
