"""Issue #15 (3d): S3 answers 403, not 404, for a missing key unless the caller may list the bucket.

Decision: fix the shipped IAM policy (s3:ListBucket on the bucket, with no s3:prefix condition — such a
condition does not count for GET/HEAD) and keep 403 an error in code (a real denial must never read as "not
published yet"), with a start-up/readiness check that names the missing grant. moto ignores IAM, so the 403
is injected on the wire (a botocore hook raising the ClientError S3 would send).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from samseg.stores.blobs import BlobError, S3Blobs
from tests.support import REPO

FORBIDDEN = {"Error": {"Code": "403", "Message": "Forbidden"}, "ResponseMetadata": {"HTTPStatusCode": 403}}


def test_the_shipped_policy_lets_samseg_list_its_bucket_so_missing_keys_answer_404():
    policy = json.loads((REPO / "config" / "iam-policy.json").read_text())
    statements = {s["Sid"]: s for s in policy["Statement"]}
    listing = statements["SamsegBucketListing"]
    assert listing["Action"] == ["s3:ListBucket"] and listing["Resource"] == "arn:aws:s3:::YOUR-BUCKET"
    assert "Condition" not in listing  # an s3:prefix condition does not apply to GetObject/HeadObject
    objects = statements["SamsegObjects"]
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= set(objects["Action"])
    assert objects["Resource"].startswith("arn:aws:s3:::YOUR-BUCKET/")


@pytest.fixture
def s3(moto_url: str) -> tuple[Any, S3Blobs]:
    client = boto3.client(
        "s3", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
    )
    bucket = f"b-{secrets.token_hex(4)}"
    client.create_bucket(Bucket=bucket)
    return client, S3Blobs(client, bucket, "samseg", concurrency=2)


def test_the_check_passes_where_missing_keys_answer_404(s3):
    _, blobs = s3
    assert blobs.check().startswith("s3://")
    assert blobs.head("job-1/result.json") is None and blobs.get("job-1/result.json") is None


def test_the_check_names_the_missing_grant_where_missing_keys_answer_403(s3):
    client, blobs = s3

    def forbid(**_: Any) -> None:
        raise ClientError(FORBIDDEN, "HeadObject")  # what S3 answers a role without s3:ListBucket

    client.meta.events.register("before-call.s3.HeadObject", forbid)
    with pytest.raises(BlobError, match="grant s3:ListBucket"):
        blobs.check()
    with pytest.raises(ClientError):
        blobs.head("job-1/result.json")  # still an error, never "absent": a denial must not look unpublished
