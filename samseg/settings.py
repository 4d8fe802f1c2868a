"""The one place samseg reads its configuration from (environment and `.env`).

Every other module takes a `Settings` (usually `get_settings()`); nothing else reads `os.environ`.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote, urlsplit

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ModelName = Literal["sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large"]
AmgImpl = Literal["upstream", "fast"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAMSEG_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- AWS / SQS -------------------------------------------------------------------------------------
    aws_region: str = Field("us-east-1", validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION"))
    aws_access_key_id: str | None = Field(None, validation_alias="AWS_ACCESS_KEY_ID")
    aws_secret_access_key: str | None = Field(None, validation_alias="AWS_SECRET_ACCESS_KEY")
    aws_endpoint_url_sqs: str | None = Field(
        None, validation_alias=AliasChoices("AWS_ENDPOINT_URL_SQS", "AWS_ENDPOINT_URL")
    )
    jobs_queue: str = "samseg-jobs"
    queue_prefix: str = "samseg-"
    # The base visibility timeout of samseg's queues. Workers extend it every third of itself for each
    # message they hold (running or prefetched), so a task may run longer; it bounds how long the messages
    # of a killed worker stay hidden before SQS redelivers them.
    visibility_timeout_seconds: int = Field(120, ge=30, le=43200)
    jobs_max_receive_count: int = Field(5, ge=1, le=1000)
    # Ask SQS for the next message as soon as a prefetch slot frees (samseg/sqs_polling.py), instead of
    # kombu's re-check every polling interval. Off only to compare with kombu's own timing.
    sqs_prompt_polling: bool = True
    # Celery monitoring events through SNS, so that Flower shows workers and tasks (docs/flower-on-sqs.md).
    # One SNS publish per event (a heartbeat every 2 s per worker): off unless Flower is used.
    events: bool = False

    # --- callback --------------------------------------------------------------------------------------
    app_server_url: str | None = None
    app_server_token: str | None = None
    public_base_url: str = "http://localhost:8000"
    callback_timeout_seconds: float = Field(10.0, gt=0)
    callback_max_attempts: int = Field(6, ge=1, le=20)
    callback_backoff_seconds: float = Field(1.0, ge=0)
    callback_backoff_max_seconds: float = Field(60.0, ge=0)

    # --- storage ---------------------------------------------------------------------------------------
    assets_dir: Path = Path("./assets")
    asset_ttl_seconds: int = Field(3600, ge=1)
    cleanup_interval_seconds: float = Field(3600, gt=0)
    result_backend: str | None = None

    # --- download --------------------------------------------------------------------------------------
    max_image_bytes: int = Field(50 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    download_timeout_seconds: float = Field(30.0, gt=0)
    allow_private_networks: bool = False
    allowed_image_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # --- model -----------------------------------------------------------------------------------------
    sam2_model: ModelName = "sam2.1_hiera_tiny"
    sam2_checkpoint: Path | None = None
    device: str = "auto"
    amg_impl: AmgImpl = "fast"
    amg_points_per_side: int = Field(32, ge=1, le=128)
    amg_points_per_batch: int = Field(64, ge=1, le=4096)
    amg_pred_iou_thresh: float = Field(0.8, ge=0.0, le=1.0)
    amg_stability_score_thresh: float = Field(0.95, ge=0.0, le=1.0)
    amg_box_nms_thresh: float = Field(0.7, ge=0.0, le=1.0)
    amg_min_mask_region_area: int = Field(0, ge=0)
    amg_int8: bool = False
    amg_compile: bool = False
    amg_half: bool = False
    amg_prune: bool = False
    segment_time_limit_seconds: int = Field(1800, ge=10)
    weights_base_url: str | None = None

    # --- health ------------------------------------------------------------------------------------------
    worker_heartbeat_file: Path = Path("/tmp/samseg-worker.heartbeat")
    worker_heartbeat_interval_seconds: float = Field(10.0, gt=0)
    preload_model: bool = True
    min_free_disk_bytes: int = Field(1024**3, ge=0)

    # --- logging ---------------------------------------------------------------------------------------
    log_level: str = "INFO"
    log_json: bool | None = None

    @model_validator(mode="after")
    def _check_amg_modes(self) -> Settings:
        if self.amg_int8 and self.amg_half:
            raise ValueError("SAMSEG_AMG_INT8 and SAMSEG_AMG_HALF cannot both be on (int8 is a CPU mode)")
        if self.amg_impl == "upstream" and (self.amg_int8 or self.amg_compile or self.amg_half or self.amg_prune):
            raise ValueError("SAMSEG_AMG_INT8/COMPILE/HALF/PRUNE apply to SAMSEG_AMG_IMPL=fast only")
        if self.amg_int8 and self.device.startswith("cuda"):
            raise ValueError("SAMSEG_AMG_INT8 is a CPU mode; it cannot run with SAMSEG_DEVICE=cuda")
        return self

    @field_validator("allowed_image_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        ok = value in {"auto", "cpu", "cuda"} or (value.startswith("cuda:") and value[5:].isdigit())
        if not ok:
            raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value

    @field_validator("app_server_url", "aws_endpoint_url_sqs", "weights_base_url")
    @classmethod
    def _check_optional_url(cls, value: str | None) -> str | None:
        return _http_url(value) if value else None

    @field_validator("public_base_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        return _http_url(value)

    @field_validator("jobs_queue")
    @classmethod
    def _check_queue_name(cls, value: str) -> str:
        # 76 leaves room for the "-dlq" suffix within SQS's 80-character limit.
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,76}", value):
            raise ValueError("SQS queue names are 1-76 characters: ASCII letters, digits, '-' and '_'")
        return value

    @field_validator("queue_prefix")
    @classmethod
    def _check_queue_prefix(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{0,60}", value):
            raise ValueError("the queue prefix is at most 60 ASCII letters, digits, '-' and '_'")
        return value

    # --- derived values (one definition each) ---------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.sam2_checkpoint or Path("weights") / f"{self.sam2_model}.pt"

    @property
    def state_dir(self) -> Path:
        """samseg's private area inside the assets volume: work files, staging, job database."""
        return self.assets_dir / ".samseg"

    @property
    def result_backend_url(self) -> str:
        if self.result_backend:
            return self.result_backend
        return f"db+sqlite:///{(self.state_dir / 'jobs.sqlite').resolve()}"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.jobs_queue}-dlq"

    @property
    def io_queue(self) -> str:
        return f"{self.queue_prefix}io"

    @property
    def gpu_queue(self) -> str:
        return f"{self.queue_prefix}gpu"

    @property
    def broker_url(self) -> str:
        """kombu's SQS URL: credentials (if any) and the endpoint override (if any) in one string."""
        creds = ""
        if self.aws_access_key_id and self.aws_secret_access_key:
            creds = f"{quote(self.aws_access_key_id, safe='')}:{quote(self.aws_secret_access_key, safe='')}@"
        if not self.aws_endpoint_url_sqs:
            return f"sqs://{creds}"
        parts = urlsplit(self.aws_endpoint_url_sqs)
        port = f":{parts.port}" if parts.port else ""
        host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
        return f"sqs://{creds}{host}{port}"

    @property
    def sqs_is_secure(self) -> bool:
        return not self.aws_endpoint_url_sqs or self.aws_endpoint_url_sqs.startswith("https:")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"must be an http(s) URL, got {value!r}")
    return value.rstrip("/")


@functools.cache
def get_settings() -> Settings:
    return Settings()
