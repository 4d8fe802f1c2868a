"""`samseg` without processes: `samseg up`'s CPU grid and what its banner prints."""

from __future__ import annotations

import argparse
import shutil

import pytest

from samseg.cli import stack
from samseg.core.settings import Settings
from tests.support import REPO


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path):
    for key in list(__import__("os").environ):
        if key.startswith(("SAMSEG_", "AWS_")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_copying_env_example_keeps_the_cpu_grid_of_samseg_up(clean_env):
    """`.env.example`'s header says to copy it to `.env`: doing so must not move a CPU stack to 32x32 points."""
    shutil.copy(REPO / ".env.example", clean_env / ".env")
    assert stack.cpu_points_override("cpu", {}) == stack.CPU_DEFAULT_POINTS_PER_SIDE
    assert stack.cpu_points_override("cuda", {}) is None  # a GPU keeps SAM-2's 32


def test_a_grid_the_user_sets_is_theirs_and_named(clean_env):
    (clean_env / ".env").write_text("SAMSEG_AMG_POINTS_PER_SIDE=32\n")
    assert stack.cpu_points_override("cpu", {}) is None
    assert stack.setting_origin("SAMSEG_AMG_POINTS_PER_SIDE", {}) == ".env"
    environ = {"SAMSEG_AMG_POINTS_PER_SIDE": "24"}
    assert stack.cpu_points_override("cpu", environ) is None
    assert stack.setting_origin("SAMSEG_AMG_POINTS_PER_SIDE", environ) == "the environment"


def _banner(capsys, monkeypatch, token_generated: bool, local: stack.LocalSqs | None, **environ: str) -> str:
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None, device="cpu", amg_points_per_side=16)
    args = argparse.Namespace(host="127.0.0.1", port=8000)
    stack._print_banner(settings, "cpu", args, {"worker-io": 1}, local=local, token_generated=token_generated)
    return str(capsys.readouterr().out)


def test_banner_prints_a_generated_token_once(clean_env, capsys, monkeypatch):
    token = "generated-token-0123456789abcdef"
    out = _banner(capsys, monkeypatch, True, stack.LocalSqs(9324, credentials=True), SAMSEG_API_TOKEN=token)
    assert out.count(token) == 1 and f"export SAMSEG_API_TOKEN={token}" in out
    assert 'curl -H "Authorization: Bearer $SAMSEG_API_TOKEN" http://localhost:8000/jobs/demo-1' in out
    # Everything a client in another shell needs to reach the same local queues.
    assert (
        "export AWS_ENDPOINT_URL_SQS=http://127.0.0.1:9324 AWS_REGION=us-east-1 "
        "AWS_ACCESS_KEY_ID=samseg-local AWS_SECRET_ACCESS_KEY=samseg-local"
    ) in out


def test_banner_never_prints_a_supplied_token_or_real_keys(clean_env, capsys, monkeypatch):
    token = "users-own-token-0123456789abcdef"
    secret = "users-real-secret-key"
    out = _banner(
        capsys,
        monkeypatch,
        False,
        stack.LocalSqs(9324, credentials=False),
        SAMSEG_API_TOKEN=token,
        AWS_ACCESS_KEY_ID="AKIAUSERSOWN",
        AWS_SECRET_ACCESS_KEY=secret,
    )
    assert token not in out and secret not in out and "AKIAUSERSOWN" not in out
    assert "using SAMSEG_API_TOKEN from the environment" in out
    assert "export AWS_ENDPOINT_URL_SQS=http://127.0.0.1:9324 AWS_REGION=us-east-1\n" in out


def test_banner_says_when_a_configured_grid_applies_on_a_cpu(clean_env, capsys, monkeypatch):
    (clean_env / ".env").write_text("SAMSEG_AMG_POINTS_PER_SIDE=32\n")
    settings = Settings(device="cpu")
    args = argparse.Namespace(host="127.0.0.1", port=8000)
    stack._print_banner(settings, "cpu", args, {}, local=None, token_generated=False)
    out = capsys.readouterr().out
    assert "32x32 points" in out
    assert "SAMSEG_AMG_POINTS_PER_SIDE=32 is set in .env; without it `samseg up` uses 16 on a CPU" in out
