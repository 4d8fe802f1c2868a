"""The one place samseg reads its configuration from (environment and `.env`).

Every other module takes a `Settings` (usually `get_settings()`); nothing else reads `os.environ`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote, urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ModelName = Literal["sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large"]
AmgImpl = Literal["upstream", "fast"]


# RFC 6750's b64token: what a bearer token may contain so that it travels unchanged in an Authorization header.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MIN_API_TOKEN_CHARS = 16
MIN_WEBHOOK_SECRET_BYTES = 24  # Standard Webhooks: 24 to 64 random bytes
MIN_ASSET_URL_SECRET_CHARS = 32


class Settings(BaseSettings):
    # hide_input_in_errors: a rejected value can be a secret (a token, a database URL with a password), and
    # pydantic would otherwise print it in the start-up error. Validators name the value where it is safe.
    model_config = SettingsConfigDict(
        env_prefix="SAMSEG_", env_file=".env", env_file_encoding="utf-8", extra="ignore", hide_input_in_errors=True
    )

    # --- AWS / SQS -------------------------------------------------------------------------------------
    aws_region: str = Field("us-east-1", validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION"))
    aws_access_key_id: str | None = Field(None, validation_alias="AWS_ACCESS_KEY_ID")
    # repr=False: kept a str for boto3 and kombu, but never printed with the settings.
    aws_secret_access_key: str | None = Field(None, validation_alias="AWS_SECRET_ACCESS_KEY", repr=False)
    aws_endpoint_url_sqs: str | None = Field(
        None, validation_alias=AliasChoices("AWS_ENDPOINT_URL_SQS", "AWS_ENDPOINT_URL")
    )
    # Port of the SQS emulator (moto) that `samseg up` starts on 127.0.0.1 when no SQS endpoint is configured.
    # Fixed, so that a client in another shell keeps one endpoint across restarts; 9324 is the port local SQS
    # emulators (ElasticMQ) use by convention. 0 = a free port at every start.
    local_sqs_port: int = Field(9324, ge=0, le=65535)
    jobs_queue: str = "samseg-jobs"
    queue_prefix: str = "samseg-"
    # The base visibility timeout of samseg's queues. Workers extend it every third of itself for each
    # message they hold (running or prefetched), so a task may run longer; it bounds how long the messages
    # of a killed worker stay hidden before SQS redelivers them.
    visibility_timeout_seconds: int = Field(120, ge=30, le=43200)
    jobs_max_receive_count: int = Field(5, ge=1, le=1000)
    # Receives of one Celery task message (io, gpu) before SQS moves it to `<queue>-dlq`: a task whose worker
    # dies every time (the OOM killer on one huge image) stops there instead of being redelivered forever.
    task_max_receive_count: int = Field(5, ge=1, le=1000)
    # Ask SQS for the next message as soon as a prefetch slot frees (samseg/queue/polling.py), instead of
    # kombu's re-check every polling interval. Off only to compare with kombu's own timing.
    sqs_prompt_polling: bool = True
    # Celery monitoring events through SNS, so that Flower shows workers and tasks (docs/flower-on-sqs.md).
    # One SNS publish per event (a heartbeat every 2 s per worker): off unless Flower is used.
    events: bool = False

    # --- callback --------------------------------------------------------------------------------------
    app_server_url: str | None = None
    app_server_token: SecretStr | None = None
    # Standard Webhooks signing of every callback (webhook-id/-timestamp/-signature headers), "whsec_<base64>".
    webhook_secret: SecretStr | None = None
    # An app-server URL that is neither https nor loopback: a warning at worker start, or with this an error.
    require_https_callback: bool = False
    public_base_url: str = "http://localhost:8000"
    callback_timeout_seconds: float = Field(10.0, gt=0)
    # The callback outbox: each attempt is its own short task; attempts are spread with exponential backoff and
    # full jitter (honouring Retry-After, stopping on 410) until one is accepted, this many were made, or the
    # horizon since the first attempt is spent (then the outbox says `expired`).
    callback_max_attempts: int = Field(40, ge=1, le=1000)
    callback_backoff_seconds: float = Field(1.0, ge=0)
    callback_backoff_max_seconds: float = Field(1800.0, ge=0)
    callback_horizon_seconds: float = Field(24 * 3600.0, gt=0)
    # A stage holds a lease on its run while it works, renewed every third of this by the process running it;
    # another copy of the stage takes over only after the lease ran out (its holder died).
    stage_lease_seconds: float = Field(120.0, ge=10)
    # The sweeper (beat) resolves runs stuck this long past their stage's lease or their callback's due time.
    sweep_grace_seconds: float = Field(60.0, ge=1)
    # How often a stuck stage is republished before its run fails `stalled`.
    sweep_max_republish: int = Field(3, ge=0, le=20)

    # --- storage ---------------------------------------------------------------------------------------
    # This host's directory: the published assets and work files when SAMSEG_STORAGE_URL is unset, else only
    # host-local scratch space (downloads in flight, the beat schedule).
    assets_dir: Path = Path("./assets")
    # Unset: files live under assets_dir (one host). s3://BUCKET/PREFIX: in S3, shared by every host.
    storage_url: str | None = None
    aws_endpoint_url_s3: str | None = Field(
        None, validation_alias=AliasChoices("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    )
    # How the API serves assets kept in S3: stream them (any HTTP client works) or redirect to a presigned GET.
    s3_assets: Literal["proxy", "redirect"] = "proxy"
    s3_max_concurrency: int = Field(16, ge=1, le=256)
    # Unset: sqlite in assets_dir (one host). sqlite:///PATH, or dynamodb://TABLE (shared by every host).
    job_store_url: str = ""
    aws_endpoint_url_dynamodb: str | None = Field(
        None, validation_alias=AliasChoices("AWS_ENDPOINT_URL_DYNAMODB", "AWS_ENDPOINT_URL")
    )
    # Job records outlive their assets so GET /jobs answers "completed, assets expired" instead of 404; at least
    # SQS's longest retention, after which no message can revive a job.
    job_record_ttl_seconds: int = Field(14 * 24 * 3600, ge=3600)
    # A run whose record made no progress for this long is taken for dead: a new message for its uuid replaces it,
    # and the purge may remove its work files. Longer than any stage and any wait in a GPU backlog.
    stale_run_seconds: int = Field(4 * 3600, ge=600)
    asset_ttl_seconds: int = Field(3600, ge=1)
    cleanup_interval_seconds: float = Field(3600, gt=0)
    # Signed mask URLs (?expires=&signature=, HMAC-SHA256 bound to the path); unset = plain URLs.
    asset_url_secret: SecretStr | None = None
    # How long a signed mask URL stays valid; unset = SAMSEG_ASSET_TTL_SECONDS (see asset_url_ttl).
    asset_url_ttl_seconds: int | None = Field(None, ge=1)

    # --- API -------------------------------------------------------------------------------------------
    # Bearer token(s) for POST /jobs, GET /jobs/{uuid} and /metrics; comma-separated to rotate. Unset = those
    # routes answer 401 (secure by default: the app server's way in is SQS, guarded by IAM).
    api_token: SecretStr | None = None
    # Largest request body the API reads (POST /jobs), checked before the body is read (samseg.api.limits).
    api_max_body_bytes: int = Field(64 * 1024, ge=1024, le=64 * 1024 * 1024)

    # --- download --------------------------------------------------------------------------------------
    max_image_bytes: int = Field(50 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    download_timeout_seconds: float = Field(30.0, gt=0)
    allow_private_networks: bool = False
    allowed_image_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allowed_image_ports: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [80, 443])

    # --- model -----------------------------------------------------------------------------------------
    sam2_model: ModelName = "sam2.1_hiera_tiny"
    sam2_checkpoint: Path | None = None
    device: str = "auto"
    amg_impl: AmgImpl = "fast"
    amg_points_per_side: int = Field(32, ge=1, le=128)
    # Unset: per device (resolved_points_per_batch): 8 on CPU (small per-prompt activations stay off mmap, see
    # docs/performance-cpu.md), 64 on CUDA.
    amg_points_per_batch: int | None = Field(None, ge=1, le=4096)
    amg_pred_iou_thresh: float = Field(0.8, ge=0.0, le=1.0)
    amg_stability_score_thresh: float = Field(0.95, ge=0.0, le=1.0)
    amg_box_nms_thresh: float = Field(0.7, ge=0.0, le=1.0)
    amg_min_mask_region_area: int = Field(0, ge=0)
    # Server defaults of the per-job options (samseg.core.options) that have no amg_ setting above.
    amg_max_masks: int | None = Field(None, ge=1)  # None: every mask the generator keeps
    amg_sort_by: Literal["area", "predicted_iou"] = "area"
    amg_multimask_output: bool = True
    polygon_tolerance: float = Field(0.0, ge=0.0, le=10.0)
    # A mask whose polygons would need more vertices gets `polygons_error` instead (docs/outputs.md).
    polygon_max_vertices: int = Field(100_000, ge=100, le=10_000_000)
    # The most `options.points_per_side` a job may ask for on this server (the contract's hard limit is 64).
    job_max_points_per_side: int = Field(64, ge=4, le=64)
    # Default deadline of a job that sets no `ttl_seconds` (seconds from when it was sent); unset = none.
    job_ttl_seconds: int | None = Field(None, ge=10, le=604_800)
    amg_int8: bool = False
    amg_compile: bool = False
    amg_half: bool = False
    amg_prune: bool = False
    # glibc mallopt thresholds set when the model loads (samseg.runtime.allocator); off: glibc's defaults.
    malloc_tuning: bool = True
    segment_time_limit_seconds: int = Field(1800, ge=10)
    # Hard time limit of the io tasks (download, persist, purge); the soft limit is 20 % (at most 60 s)
    # earlier. Enforced by Celery in prefork pools and by samseg.ops.watchdog in solo and threads pools.
    io_time_limit_seconds: int = Field(360, ge=2)
    weights_base_url: str | None = None

    # --- health ------------------------------------------------------------------------------------------
    worker_heartbeat_file: Path = Path("/tmp/samseg-worker.heartbeat")
    worker_heartbeat_interval_seconds: float = Field(10.0, gt=0)
    preload_model: bool = True
    min_free_disk_bytes: int = Field(1024**3, ge=0)
    # /readyz answers from its last round of checks for this long (0 = check on every request): a probe
    # storm costs at most one round of SQS/store calls per period.
    readyz_cache_seconds: float = Field(5.0, ge=0, le=60)

    # --- metrics ---------------------------------------------------------------------------------------
    # Per-host directory for prometheus_client's multiprocess files (never the assets volume); unset: the
    # system temp dir's samseg-metrics/. Each process tree uses {dir}/{pid namespace}/{root pid}.
    metrics_dir: Path | None = None
    metrics_port: int = Field(0, ge=0, le=65535)  # a worker's own /metrics (main process); 0 = off
    metrics_host: str = "0.0.0.0"
    queue_depth_interval_seconds: float = Field(15.0, gt=0)  # the API's background read of queue depths

    # --- platform: scale-in and shutdown (docs/deployment-kubernetes.md) ------------------------------------
    # While a worker runs a segment it asks its platform not to remove it (samseg/ops/scale_in.py): `kubernetes`
    # (its own pod's pod-deletion-cost and do-not-evict annotations) or `ecs` (ECS task scale-in protection).
    scale_in_protection: Literal["off", "kubernetes", "ecs"] = "off"
    # Timeout (s) of one protection request; they run on their own thread, never on a task's.
    scale_in_request_timeout_seconds: float = Field(2.0, gt=0, le=30)
    # ECS protection lifetime (min), renewed every third of it while busy: how long a dead worker stays protected.
    scale_in_ecs_expires_minutes: int = Field(30, ge=1, le=2880)
    # Kubernetes API for the pod annotations; unset: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT.
    # The next five also read the platform's own variable (KUBERNETES_SERVICE_HOST/PORT, POD_NAME, POD_NAMESPACE,
    # ECS_AGENT_URI); the SAMSEG_ name wins where both are set.
    kubernetes_api_url: str | None = None
    kubernetes_service_host: str | None = Field(
        None, validation_alias=AliasChoices("SAMSEG_KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_HOST")
    )
    kubernetes_service_port: int = Field(
        443, validation_alias=AliasChoices("SAMSEG_KUBERNETES_SERVICE_PORT", "KUBERNETES_SERVICE_PORT"), ge=1, le=65535
    )
    # The pod's service-account token, CA and namespace (mounted by Kubernetes).
    kubernetes_service_account_dir: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount")
    # This pod's name and namespace, from the downward API (the namespace falls back to the service-account file).
    pod_name: str | None = Field(None, validation_alias=AliasChoices("SAMSEG_POD_NAME", "POD_NAME"))
    pod_namespace: str | None = Field(None, validation_alias=AliasChoices("SAMSEG_POD_NAMESPACE", "POD_NAMESPACE"))
    # Set by the ECS agent in every task (ECS container agent >= 1.39).
    ecs_agent_uri: str | None = Field(None, validation_alias=AliasChoices("SAMSEG_ECS_AGENT_URI", "ECS_AGENT_URI"))
    # Celery's worker_soft_shutdown_timeout: with REMAP_SIGTERM=SIGQUIT, SIGTERM lets running tasks work this long,
    # then hands their messages back to SQS; keep it below the platform's grace period. 0 = wait for the tasks.
    worker_soft_shutdown_timeout_seconds: float = Field(0.0, ge=0, le=3600)

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

    @model_validator(mode="after")
    def _default_job_store(self) -> Settings:
        if not self.job_store_url:
            self.job_store_url = f"sqlite:///{(self.state_dir / 'jobs.sqlite').resolve()}"
        return self

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme != "s3" or not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", parts.netloc or ""):
            raise ValueError(f"must be s3://BUCKET or s3://BUCKET/PREFIX with a valid bucket name, got {value!r}")
        if parts.query or parts.fragment or ".." in parts.path.split("/"):
            raise ValueError(f"the S3 prefix must be a plain path, got {value!r}")
        return value

    @field_validator("job_store_url")
    @classmethod
    def _check_job_store_url(cls, value: str) -> str:
        if not value:
            return value
        if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
            return value
        if value.startswith("dynamodb://") and re.fullmatch(r"[A-Za-z0-9_.-]{3,255}", value[len("dynamodb://") :]):
            return value
        raise ValueError(f"must be sqlite:///PATH or dynamodb://TABLE, got {value!r}")

    @field_validator("allowed_image_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return value

    @field_validator("allowed_image_ports", mode="before")
    @classmethod
    def _split_ports(cls, value: object) -> object:
        if isinstance(value, str):
            ports: list[int] = []
            for item in (p.strip() for p in value.split(",")):
                if not item:
                    continue
                if not item.isdigit():
                    raise ValueError(f"ports are comma-separated numbers, got {item!r}")
                ports.append(int(item))
            return ports
        return value

    @field_validator("allowed_image_ports")
    @classmethod
    def _check_ports(cls, value: list[int]) -> list[int]:
        bad = [p for p in value if not 1 <= p <= 65535]
        if bad:
            raise ValueError(f"ports are 1-65535, got {bad}")
        if not value:
            raise ValueError("at least one port (the default is 80,443)")
        return list(dict.fromkeys(value))

    @field_validator("api_token", "webhook_secret", "asset_url_secret", "app_server_token", mode="before")
    @classmethod
    def _blank_secret_is_unset(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, SecretStr) and not value.get_secret_value().strip():
            return None
        return value

    @field_validator("api_token")
    @classmethod
    def _check_api_tokens(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        tokens = _split_tokens(value.get_secret_value())
        if not tokens:
            return None
        for position, token in enumerate(tokens, 1):
            # Never echo the token itself: say which one of the list is wrong and why.
            if not _BEARER_TOKEN.fullmatch(token):
                raise ValueError(
                    f"token {position} of SAMSEG_API_TOKEN has characters a bearer token cannot carry "
                    "(allowed: letters, digits, - . _ ~ + / and trailing =)"
                )
            if len(token) < MIN_API_TOKEN_CHARS:
                raise ValueError(
                    f"token {position} of SAMSEG_API_TOKEN is {len(token)} characters; use at least "
                    f"{MIN_API_TOKEN_CHARS} (python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        hint = (
            "SAMSEG_WEBHOOK_SECRET must be 'whsec_' followed by the base64 of "
            f"{MIN_WEBHOOK_SECRET_BYTES} to 64 random bytes, e.g. python -c 'import base64, secrets; "
            'print("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())\''
        )
        text = value.get_secret_value().strip()
        if not text.startswith("whsec_"):
            raise ValueError(hint + " (the whsec_ prefix is missing)")
        encoded = text.removeprefix("whsec_")
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(hint + " (what follows whsec_ is not base64)") from None
        if len(key) < MIN_WEBHOOK_SECRET_BYTES:
            raise ValueError(hint + f" (it decodes to {len(key)} bytes)")
        return SecretStr(text)

    @field_validator("asset_url_secret")
    @classmethod
    def _check_asset_url_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_ASSET_URL_SECRET_CHARS:
            raise ValueError(
                f"SAMSEG_ASSET_URL_SECRET must be at least {MIN_ASSET_URL_SECRET_CHARS} characters "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        ok = value in {"auto", "cpu", "cuda"} or (value.startswith("cuda:") and value[5:].isdigit())
        if not ok:
            raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value

    @field_validator(
        "app_server_url",
        "aws_endpoint_url_sqs",
        "aws_endpoint_url_s3",
        "aws_endpoint_url_dynamodb",
        "weights_base_url",
        "kubernetes_api_url",
        "ecs_agent_uri",
    )
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
        """samseg's private area inside assets_dir: work files (local storage), the job database, scratch."""
        return self.assets_dir / ".samseg"

    @property
    def scratch_dir(self) -> Path:
        """Host-local temporary files (an image being downloaded, masks on their way to the blob store)."""
        return self.state_dir / "scratch"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.jobs_queue}-dlq"

    @property
    def io_soft_time_limit_seconds(self) -> float:
        return max(0.8 * self.io_time_limit_seconds, self.io_time_limit_seconds - 60)

    @property
    def task_dead_letter_queues(self) -> dict[str, str]:
        """Celery's own queues → their dead-letter queues (redrive after SAMSEG_TASK_MAX_RECEIVE_COUNT)."""
        return {self.io_queue: f"{self.io_queue}-dlq", self.gpu_queue: f"{self.gpu_queue}-dlq"}

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
    def asset_url_ttl(self) -> int:
        """Validity of a signed mask URL: SAMSEG_ASSET_URL_TTL_SECONDS, else as long as the asset is kept."""
        return self.asset_url_ttl_seconds or self.asset_ttl_seconds

    def api_tokens(self) -> list[str]:
        """Every accepted API token (several while one is being rotated out); empty = none configured."""
        return _split_tokens(self.api_token.get_secret_value()) if self.api_token else []

    def secret_values(self) -> list[str]:
        """The secret strings configured, for the log redactor: none of them may ever appear in a log line."""
        values = [*self.api_tokens()]
        for secret in (self.webhook_secret, self.app_server_token, self.asset_url_secret):
            if secret is not None:
                values.append(secret.get_secret_value())
        if self.webhook_secret is not None:
            values.append(self.webhook_secret.get_secret_value().removeprefix("whsec_"))
        if self.aws_secret_access_key:
            values.append(self.aws_secret_access_key)
        return [v for v in dict.fromkeys(values) if v]

    @property
    def sqs_is_secure(self) -> bool:
        return not self.aws_endpoint_url_sqs or self.aws_endpoint_url_sqs.startswith("https:")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_points_per_batch(self, device: str | None = None) -> int:
        """SAMSEG_AMG_POINTS_PER_BATCH, or the measured default of the device (CPU 4, CUDA 64)."""
        if self.amg_points_per_batch is not None:
            return self.amg_points_per_batch
        return CPU_POINTS_PER_BATCH if (device or self.resolved_device()) == "cpu" else GPU_POINTS_PER_BATCH


def _split_tokens(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"must be an http(s) URL, got {value!r}")
    return value.rstrip("/")


# Default prompts per decoder batch when SAMSEG_AMG_POINTS_PER_BATCH is unset (docs/performance-cpu.md).
CPU_POINTS_PER_BATCH = 8
GPU_POINTS_PER_BATCH = 64


@functools.cache
def get_settings() -> Settings:
    return Settings()
