"""samseg.core.settings: defaults, environment and `.env` parsing, validation and the derived values."""

from __future__ import annotations

import os
from pathlib import Path

import kombu
import pytest
from kombu.utils.url import url_to_parts
from pydantic import ValidationError

from samseg.core.settings import Settings


@pytest.fixture(autouse=True)
def hermetic(monkeypatch, tmp_path):
    """No SAMSEG_/AWS_ variable from the outer environment and no `.env` from the repo leaks in."""
    for key in list(os.environ):
        if key.upper().startswith(("SAMSEG_", "AWS_")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- defaults -----------------------------------------------------------------------------------------


def test_defaults():
    s = Settings()
    assert s.jobs_queue == "samseg-jobs"
    assert s.queue_prefix == "samseg-"
    assert s.public_base_url == "http://localhost:8000"
    assert s.assets_dir == Path("./assets")
    assert s.asset_ttl_seconds == 3600
    assert s.cleanup_interval_seconds == 3600
    assert s.sam2_model == "sam2.1_hiera_tiny"
    assert s.sam2_checkpoint is None
    assert s.checkpoint_path == Path("weights") / "sam2.1_hiera_tiny.pt"
    assert s.device == "auto"
    assert s.amg_impl == "fast"
    # SAM2AutomaticMaskGenerator's own defaults.
    assert (
        s.amg_points_per_side,
        s.amg_points_per_batch,
        s.amg_pred_iou_thresh,
        s.amg_stability_score_thresh,
        s.amg_box_nms_thresh,
        s.amg_min_mask_region_area,
    ) == (32, None, 0.8, 0.95, 0.7, 0)
    assert (s.resolved_points_per_batch("cpu"), s.resolved_points_per_batch("cuda")) == (8, 64)
    assert s.aws_region == "us-east-1"
    assert s.aws_endpoint_url_sqs is None
    assert s.app_server_url is None
    assert s.app_server_token is None
    assert s.allow_private_networks is False
    assert s.allowed_image_hosts == []
    assert s.sqs_is_secure is True


def test_checkpoint_follows_model_unless_given():
    assert Settings(sam2_model="sam2.1_hiera_large").checkpoint_path == Path("weights/sam2.1_hiera_large.pt")
    assert Settings(sam2_checkpoint="/models/x.pt").checkpoint_path == Path("/models/x.pt")


def test_derived_queue_names(monkeypatch):
    s = Settings()
    assert (s.io_queue, s.gpu_queue, s.dead_letter_queue) == ("samseg-io", "samseg-gpu", "samseg-jobs-dlq")
    monkeypatch.setenv("SAMSEG_QUEUE_PREFIX", "t42-")
    monkeypatch.setenv("SAMSEG_JOBS_QUEUE", "app_jobs")
    s = Settings()
    assert (s.io_queue, s.gpu_queue, s.dead_letter_queue) == ("t42-io", "t42-gpu", "app_jobs-dlq")


def test_default_job_store_is_sqlite_inside_the_state_dir_with_an_absolute_path(monkeypatch, tmp_path):
    monkeypatch.setenv("SAMSEG_ASSETS_DIR", "relative-assets")
    s = Settings()
    assert s.state_dir == Path("relative-assets") / ".samseg"
    assert s.job_store_url.startswith("sqlite:////")  # absolute, wherever the process's cwd moves later
    assert Path(s.job_store_url.removeprefix("sqlite:///")) == tmp_path / "relative-assets" / ".samseg" / "jobs.sqlite"
    assert s.storage_url is None


def test_shared_stores_are_taken_verbatim_with_their_own_endpoints(monkeypatch):
    monkeypatch.setenv("SAMSEG_STORAGE_URL", "s3://my-bucket/samseg/prod")
    monkeypatch.setenv("SAMSEG_JOB_STORE_URL", "dynamodb://samseg-jobs")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", "http://127.0.0.1:8001")
    s = Settings()
    assert (s.storage_url, s.job_store_url) == ("s3://my-bucket/samseg/prod", "dynamodb://samseg-jobs")
    # The service-specific variable wins; the generic one is the fallback.
    assert (s.aws_endpoint_url_s3, s.aws_endpoint_url_dynamodb) == ("http://127.0.0.1:5000", "http://127.0.0.1:8001")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SAMSEG_STORAGE_URL", "/mnt/efs/assets"),
        ("SAMSEG_STORAGE_URL", "s3://Bad_Bucket/x"),
        ("SAMSEG_STORAGE_URL", "s3://bucket/../escape"),
        ("SAMSEG_JOB_STORE_URL", "postgres://db/samseg"),
        ("SAMSEG_JOB_STORE_URL", "dynamodb://"),
        ("SAMSEG_S3_ASSETS", "copy"),
    ],
)
def test_bad_store_urls_are_refused_with_a_clear_message(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert name.removeprefix("SAMSEG_").lower() in str(info.value)


# --- environment parsing ------------------------------------------------------------------------------


def test_env_values_are_parsed_and_typed(monkeypatch):
    env = {
        "SAMSEG_JOBS_QUEUE": "my-jobs",
        "SAMSEG_PUBLIC_BASE_URL": "https://assets.example.com/",
        "SAMSEG_ASSETS_DIR": "/srv/assets",
        "SAMSEG_ASSET_TTL_SECONDS": "60",
        "SAMSEG_CLEANUP_INTERVAL_SECONDS": "12.5",
        "SAMSEG_SAM2_MODEL": "sam2.1_hiera_small",
        "SAMSEG_DEVICE": "cuda:1",
        "SAMSEG_AMG_POINTS_PER_SIDE": "16",
        "SAMSEG_AMG_PRED_IOU_THRESH": "0.5",
        "SAMSEG_ALLOW_PRIVATE_NETWORKS": "true",
        "SAMSEG_APP_SERVER_URL": "http://app:3000/",
        "SAMSEG_APP_SERVER_TOKEN": "s3cret",
        "SAMSEG_MAX_IMAGE_BYTES": "1024",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = Settings()
    assert s.jobs_queue == "my-jobs"
    assert s.public_base_url == "https://assets.example.com"  # trailing slash dropped
    assert s.assets_dir == Path("/srv/assets")
    assert s.asset_ttl_seconds == 60
    assert s.cleanup_interval_seconds == 12.5
    assert s.sam2_model == "sam2.1_hiera_small"
    assert s.checkpoint_path == Path("weights/sam2.1_hiera_small.pt")
    assert s.device == "cuda:1"
    assert s.resolved_device() == "cuda:1"
    assert s.amg_points_per_side == 16
    assert s.amg_pred_iou_thresh == 0.5
    assert s.allow_private_networks is True
    assert s.app_server_url == "http://app:3000"
    assert s.app_server_token is not None and s.app_server_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s) and "s3cret" not in str(s)
    assert s.max_image_bytes == 1024


def test_env_names_are_case_insensitive(monkeypatch):
    monkeypatch.setenv("samseg_jobs_queue", "lower-case-jobs")
    assert Settings().jobs_queue == "lower-case-jobs"


@pytest.mark.parametrize(
    ("region", "default_region", "expected"),
    [
        (None, None, "us-east-1"),
        (None, "eu-west-1", "eu-west-1"),
        ("ap-south-1", None, "ap-south-1"),
        ("ap-south-1", "eu-west-1", "ap-south-1"),  # the SDK's precedence: AWS_REGION first
    ],
)
def test_aws_region_falls_back_to_default_region(monkeypatch, region, default_region, expected):
    if region:
        monkeypatch.setenv("AWS_REGION", region)
    if default_region:
        monkeypatch.setenv("AWS_DEFAULT_REGION", default_region)
    assert Settings().aws_region == expected


@pytest.mark.parametrize(
    ("sqs_endpoint", "generic_endpoint", "expected"),
    [
        (None, None, None),
        (None, "http://localstack:4566", "http://localstack:4566"),
        ("http://moto:5000/", None, "http://moto:5000"),
        ("http://moto:5000", "http://localstack:4566", "http://moto:5000"),  # the service-specific one wins
    ],
)
def test_sqs_endpoint_falls_back_to_generic_endpoint(monkeypatch, sqs_endpoint, generic_endpoint, expected):
    if sqs_endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", sqs_endpoint)
    if generic_endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", generic_endpoint)
    s = Settings()
    assert s.aws_endpoint_url_sqs == expected
    assert s.sqs_is_secure is (expected is None)


def test_allowed_image_hosts_are_split_trimmed_and_lowercased(monkeypatch):
    monkeypatch.setenv("SAMSEG_ALLOWED_IMAGE_HOSTS", " Images.Example.COM, ,cdn.test,localhost ,")
    assert Settings().allowed_image_hosts == ["images.example.com", "cdn.test", "localhost"]


def test_empty_allowed_image_hosts(monkeypatch):
    monkeypatch.setenv("SAMSEG_ALLOWED_IMAGE_HOSTS", "")
    assert Settings().allowed_image_hosts == []


# --- broker URL ---------------------------------------------------------------------------------------


def test_broker_url_without_endpoint_or_credentials():
    s = Settings()
    assert s.broker_url == "sqs://"
    assert kombu.Connection(s.broker_url).transport_cls == "sqs"


def test_broker_url_with_awkward_credentials_round_trips_through_kombu(monkeypatch):
    key, secret = "AKIA/ID+1@x", "se/cr+et@:%word=="
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", "http://sqs.local:9324")
    s = Settings()
    url = s.broker_url
    assert url.startswith("sqs://")
    # The raw credentials must not appear unescaped: '/', '+', '@' would change how the URL parses.
    assert secret not in url and key not in url
    parts = url_to_parts(url)
    assert (parts.scheme, parts.username, parts.password) == ("sqs", key, secret)
    assert (parts.hostname, parts.port) == ("sqs.local", 9324)
    conn = kombu.Connection(url)
    assert (conn.userid, conn.password, conn.hostname, conn.port) == (key, secret, "sqs.local", 9324)
    assert s.sqs_is_secure is False


def test_broker_url_with_credentials_and_no_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a/b")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "c+d@e")
    conn = kombu.Connection(Settings().broker_url)
    assert (conn.userid, conn.password) == ("a/b", "c+d@e")
    assert not conn.hostname  # real AWS: kombu picks the regional endpoint


def test_broker_url_needs_both_key_and_secret(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "only-the-key")
    assert Settings().broker_url == "sqs://"


def test_broker_url_for_https_endpoint_without_port(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", "https://sqs.internal.example")
    s = Settings()
    parts = url_to_parts(s.broker_url)
    assert (parts.hostname, parts.port) == ("sqs.internal.example", None)
    assert s.sqs_is_secure is True


def test_broker_url_with_ipv6_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", "http://[::1]:4566")
    parts = url_to_parts(Settings().broker_url)
    assert (parts.hostname, parts.port) == ("::1", 4566)


# --- .env file ----------------------------------------------------------------------------------------


def test_dotenv_in_cwd_is_read_and_environment_overrides_it(monkeypatch, hermetic):
    (hermetic / ".env").write_text(
        "SAMSEG_JOBS_QUEUE=dotenv-jobs\n"
        "SAMSEG_ASSET_TTL_SECONDS=120\n"
        "AWS_DEFAULT_REGION=eu-central-1\n"
        "SAMSEG_ALLOWED_IMAGE_HOSTS=a.example,B.example\n"
        "SOMETHING_ELSE=ignored\n",
        encoding="utf-8",
    )
    s = Settings()
    assert s.jobs_queue == "dotenv-jobs"
    assert s.asset_ttl_seconds == 120
    assert s.aws_region == "eu-central-1"
    assert s.allowed_image_hosts == ["a.example", "b.example"]

    monkeypatch.setenv("SAMSEG_JOBS_QUEUE", "env-jobs")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    s = Settings()
    assert s.jobs_queue == "env-jobs"
    assert s.aws_region == "us-west-2"
    assert s.asset_ttl_seconds == 120  # still from .env


def test_dotenv_elsewhere_is_not_read(tmp_path, monkeypatch):
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / ".env").write_text("SAMSEG_JOBS_QUEUE=not-me\n")
    assert Settings().jobs_queue == "samseg-jobs"


# --- validation ---------------------------------------------------------------------------------------


def _error_text(monkeypatch, key: str, value: str) -> str:
    monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    return str(info.value)


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cuda0", "CPU", "mps", "cuda:-1"])
def test_invalid_device(monkeypatch, device):
    text = _error_text(monkeypatch, "SAMSEG_DEVICE", device)
    assert "device" in text
    assert "'auto', 'cpu', 'cuda' or 'cuda:N'" in text


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_valid_devices(monkeypatch, device):
    monkeypatch.setenv("SAMSEG_DEVICE", device)
    assert Settings().device == device


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("SAMSEG_PUBLIC_BASE_URL", "ftp://files.example.com"),
        ("SAMSEG_PUBLIC_BASE_URL", "localhost:8000"),
        ("SAMSEG_PUBLIC_BASE_URL", "http://"),
        ("SAMSEG_APP_SERVER_URL", "app:3000"),
        ("SAMSEG_APP_SERVER_URL", "file:///etc/passwd"),
        ("AWS_ENDPOINT_URL_SQS", "sqs://moto:5000"),
        ("SAMSEG_WEIGHTS_BASE_URL", "s3://bucket/weights"),
    ],
)
def test_non_http_urls_are_rejected(monkeypatch, key, value):
    text = _error_text(monkeypatch, key, value)
    assert "must be an http(s) URL" in text
    assert repr(value) in text


def test_empty_optional_url_means_unset(monkeypatch):
    monkeypatch.setenv("SAMSEG_APP_SERVER_URL", "")
    assert Settings().app_server_url is None


@pytest.mark.parametrize("name", ["", "bad name", "a/b", "jobs.fifo", "x" * 77, "jobs!"])
def test_bad_jobs_queue_name(monkeypatch, name):
    text = _error_text(monkeypatch, "SAMSEG_JOBS_QUEUE", name)
    assert "jobs_queue" in text
    assert "SQS queue names are 1-76 characters" in text


def test_delivery_defaults_short_visibility_and_prompt_polling():
    """Issue 11: a killed worker's messages (prefetched ones too) come back within minutes, not an hour —
    the keeper extends the base timeout while a worker holds a message — and kombu's SQS polling is fixed."""
    s = Settings()
    assert s.visibility_timeout_seconds == 120
    assert s.sqs_prompt_polling is True


def test_prompt_polling_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("SAMSEG_SQS_PROMPT_POLLING", "false")
    assert Settings().sqs_prompt_polling is False
    monkeypatch.setenv("SAMSEG_SQS_PROMPT_POLLING", "sometimes")
    with pytest.raises(ValidationError, match="sqs_prompt_polling"):
        Settings()


def test_longest_jobs_queue_name_leaves_room_for_the_dlq_suffix(monkeypatch):
    monkeypatch.setenv("SAMSEG_JOBS_QUEUE", "q" * 76)
    assert len(Settings().dead_letter_queue) == 80  # SQS's own limit


@pytest.mark.parametrize("name", ["café-jobs", "jobs-٣"])
def test_non_ascii_jobs_queue_name_is_rejected(monkeypatch, name):
    _error_text(monkeypatch, "SAMSEG_JOBS_QUEUE", name)


def test_bad_queue_prefix_is_rejected(monkeypatch):
    _error_text(monkeypatch, "SAMSEG_QUEUE_PREFIX", "bad prefix/")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("SAMSEG_VISIBILITY_TIMEOUT_SECONDS", "10"),
        ("SAMSEG_ASSET_TTL_SECONDS", "0"),
        ("SAMSEG_CALLBACK_MAX_ATTEMPTS", "0"),
        ("SAMSEG_AMG_PRED_IOU_THRESH", "1.5"),
        ("SAMSEG_SAM2_MODEL", "sam2_hiera_huge"),
        ("SAMSEG_AMG_IMPL", "turbo"),
        ("SAMSEG_MAX_IMAGE_BYTES", "lots"),
    ],
)
def test_out_of_range_and_unknown_values(monkeypatch, key, value):
    text = _error_text(monkeypatch, key, value)
    assert key.removeprefix("SAMSEG_").lower() in text


# --- trust boundary: tokens, secrets, ports -----------------------------------------------------------

TOKEN_A, TOKEN_B = "tok-A-" + "a" * 20, "tok-B-" + "b" * 20
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the Standard Webhooks spec's example (24 bytes)


def test_trust_boundary_defaults():
    s = Settings()
    assert s.api_token is None and s.api_tokens() == []
    assert s.webhook_secret is None and s.asset_url_secret is None
    assert s.asset_url_ttl_seconds is None and s.asset_url_ttl == s.asset_ttl_seconds == 3600
    assert s.require_https_callback is False
    assert s.allowed_image_ports == [80, 443]
    assert s.secret_values() == []


def test_one_api_token_or_a_list_for_rotation(monkeypatch):
    monkeypatch.setenv("SAMSEG_API_TOKEN", TOKEN_A)
    assert Settings().api_tokens() == [TOKEN_A]
    monkeypatch.setenv("SAMSEG_API_TOKEN", f" {TOKEN_B} , {TOKEN_A},")
    assert Settings().api_tokens() == [TOKEN_B, TOKEN_A]


@pytest.mark.parametrize("value", ["", "   ", ",", " , "])
def test_blank_api_token_means_none(monkeypatch, value):
    monkeypatch.setenv("SAMSEG_API_TOKEN", value)
    s = Settings()
    assert s.api_token is None and s.api_tokens() == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("short-token", "token 1 of SAMSEG_API_TOKEN is 11 characters"),
        (f"{TOKEN_A},tiny", "token 2 of SAMSEG_API_TOKEN is 4 characters"),
        ("has space inside-the-token", "characters a bearer token cannot carry"),
        ("ünïcødé-" + "x" * 20, "characters a bearer token cannot carry"),
        ("=" + "x" * 20, "characters a bearer token cannot carry"),
    ],
)
def test_bad_api_tokens_are_refused_without_echoing_them(monkeypatch, value, message):
    text = _error_text(monkeypatch, "SAMSEG_API_TOKEN", value)
    assert message in text
    for token in value.split(","):
        assert token.strip() not in text


def test_secrets_never_appear_in_repr_or_dump_json(monkeypatch):
    values = {
        "SAMSEG_API_TOKEN": f"{TOKEN_A},{TOKEN_B}",
        "SAMSEG_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "SAMSEG_APP_SERVER_TOKEN": "app-server-bearer-token",
        "SAMSEG_ASSET_URL_SECRET": "asset-url-secret-" + "z" * 20,
        "AWS_SECRET_ACCESS_KEY": "aws-secret-access-key-value",
        "SAMSEG_RESULT_BACKEND": "db+postgresql://u:db-password-value@db/samseg",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    s = Settings()
    shown = repr(s) + str(s) + s.model_dump_json()
    for secret in (TOKEN_A, TOKEN_B, WEBHOOK_SECRET, "app-server-bearer-token", "z" * 20):
        assert secret not in shown
    # Plain strings for boto3/kombu/SQLAlchemy, but left out of the repr (what a log line or traceback shows).
    assert "aws-secret-access-key-value" not in repr(s) and "db-password-value" not in repr(s)
    assert set(s.secret_values()) >= {TOKEN_A, TOKEN_B, WEBHOOK_SECRET, "app-server-bearer-token"}
    assert "aws-secret-access-key-value" in s.secret_values()


def test_webhook_secret_accepts_the_standard_form(monkeypatch):
    monkeypatch.setenv("SAMSEG_WEBHOOK_SECRET", f"  {WEBHOOK_SECRET} ")
    s = Settings()
    assert s.webhook_secret is not None and s.webhook_secret.get_secret_value() == WEBHOOK_SECRET
    monkeypatch.setenv("SAMSEG_WEBHOOK_SECRET", WEBHOOK_SECRET.rstrip("="))  # unpadded base64 is fine too
    assert Settings().webhook_secret is not None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "the whsec_ prefix is missing"),
        ("whsec_not base64!!", "is not base64"),
        ("whsec_c2hvcnQ=", "it decodes to 5 bytes"),
    ],
)
def test_bad_webhook_secrets_are_refused_clearly(monkeypatch, value, reason):
    text = _error_text(monkeypatch, "SAMSEG_WEBHOOK_SECRET", value)
    assert "SAMSEG_WEBHOOK_SECRET must be 'whsec_' followed by the base64" in text
    assert reason in text
    assert value.removeprefix("whsec_") not in text


def test_asset_url_secret_and_ttl(monkeypatch):
    assert "at least 32 characters" in _error_text(monkeypatch, "SAMSEG_ASSET_URL_SECRET", "too-short")
    monkeypatch.setenv("SAMSEG_ASSET_URL_SECRET", "k" * 32)
    monkeypatch.setenv("SAMSEG_ASSET_TTL_SECONDS", "7200")
    assert Settings().asset_url_ttl == 7200  # follows the asset TTL unless set
    monkeypatch.setenv("SAMSEG_ASSET_URL_TTL_SECONDS", "600")
    assert Settings().asset_url_ttl == 600
    assert "asset_url_ttl_seconds" in _error_text(monkeypatch, "SAMSEG_ASSET_URL_TTL_SECONDS", "0")


def test_allowed_image_ports_parse(monkeypatch):
    monkeypatch.setenv("SAMSEG_ALLOWED_IMAGE_PORTS", " 443, 8443 ,443,")
    assert Settings().allowed_image_ports == [443, 8443]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("80,http", "comma-separated numbers, got 'http'"),
        ("0", "ports are 1-65535"),
        ("70000", "1-65535"),
        ("", "at least one port"),
        ("-1", "comma-separated numbers"),
    ],
)
def test_bad_allowed_image_ports(monkeypatch, value, message):
    assert message in _error_text(monkeypatch, "SAMSEG_ALLOWED_IMAGE_PORTS", value)


def test_require_https_callback_parses(monkeypatch):
    monkeypatch.setenv("SAMSEG_REQUIRE_HTTPS_CALLBACK", "true")
    assert Settings().require_https_callback is True
