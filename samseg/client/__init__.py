"""samseg's app-server SDK: send jobs, verify and parse callbacks, decode masks.

Importable without torch or Celery (pydantic, numpy, Pillow, httpx, standardwebhooks; boto3 only when an
SQS sender is built). docs/client.md has a complete example.
"""

from samseg.client.callbacks import CallbackVerificationError, parse_result, verify_callback
from samseg.client.decode import mask_from_png, mask_from_polygons, mask_from_rle, segment_mask
from samseg.client.jobs import HttpJobs, SqsJobs, build_job, cancel_body, job_body
from samseg.core.contracts import (
    CallbackBody,
    CancelMessage,
    JobAccepted,
    JobMessage,
    JobOptions,
    JobStatus,
    ResultDocument,
    ResultSegment,
    Segment,
)

__all__ = [
    "CallbackBody",
    "CallbackVerificationError",
    "CancelMessage",
    "HttpJobs",
    "JobAccepted",
    "JobMessage",
    "JobOptions",
    "JobStatus",
    "ResultDocument",
    "ResultSegment",
    "Segment",
    "SqsJobs",
    "build_job",
    "cancel_body",
    "job_body",
    "mask_from_png",
    "mask_from_polygons",
    "mask_from_rle",
    "parse_result",
    "segment_mask",
    "verify_callback",
]
