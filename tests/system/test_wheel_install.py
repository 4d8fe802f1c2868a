"""A wheel built from the tree, installed without the source tree, runs: worker, beat and API start, the worker
takes a job to its callback, and the weights manifest is found inside the installed package.

`pip wheel .` builds the wheel; a fresh virtual environment gets it (no editable install, no PYTHONPATH, run
from a folder outside the checkout). Its dependencies are the suite's own venv's, reached through a `.pth` line
rather than reinstalled (torch alone is 2.7 GB here) — a `.pth` line adds a path without running that path's
own `.pth` hooks, so the checkout's editable install stays out of the fresh venv. A check in the test proves
`samseg` is imported from the wheel.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import httpx
import pytest

from tests.support import API_TOKEN, REPO, free_port, wait_http

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the fresh venv's bin/, a folder outside the checkout to run in)."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(root / "dist"),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = (root / "dist").glob("samseg-*.whl")
    fresh = root / "venv"
    venv.EnvBuilder(with_pip=False).create(fresh)
    python = fresh / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The dependencies: the suite's venv's site-packages, appended after the fresh venv's own.
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", purelib, str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    workdir = root / "run"
    workdir.mkdir()
    return fresh / "bin", workdir


def _env(stack_env: dict[str, str], bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in stack_env.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def test_the_wheel_imports_samseg_from_itself_and_ships_the_manifest(wheel_env: tuple[Path, Path]) -> None:
    bin_dir, workdir = wheel_env
    code = (
        "import json, samseg, samseg.runtime.weights as w; "
        "print(json.dumps({'file': samseg.__file__, 'models': sorted(w.load_manifest())}))"
    )
    out = subprocess.run(
        [str(bin_dir / "python"), "-c", code],
        cwd=workdir,
        env=_env(dict(os.environ), bin_dir),
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert str(bin_dir.parent) in found["file"] and str(REPO) not in found["file"], found
    assert "sam2.1_hiera_tiny" in found["models"], found


def test_worker_beat_and_api_from_the_wheel_run_a_job(make_stack, images, app_server, wheel_env) -> None:  # type: ignore[no-untyped-def]
    bin_dir, workdir = wheel_env
    stack = make_stack(SAMSEG_APP_SERVER_URL=app_server.url, SAMSEG_CLEANUP_INTERVAL_SECONDS="2")
    env = _env(stack.env, bin_dir)
    python = str(bin_dir / "python")
    port = free_port()
    stack.start(
        "api",
        python,
        "-m",
        "uvicorn",
        "samseg.api:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        env=env,
        cwd=workdir,
    )
    worker = stack.start(
        "worker",
        python,
        "-m",
        "celery",
        "-A",
        "samseg",
        "worker",
        "--loglevel",
        "INFO",
        "--pool",
        "solo",
        env=env,
        cwd=workdir,
    )
    beat = stack.start(
        "beat", python, "-m", "celery", "-A", "samseg", "beat", "--loglevel", "INFO", env=env, cwd=workdir
    )
    worker.wait_for_output("worker_ready", 120)
    beat.wait_for_output("purge-old-assets", 60)
    wait_http(f"http://127.0.0.1:{port}/healthz", 60)

    stack.send_raw(json.dumps({"uuid": "wheel-1", "image_url": f"{images.url}/ok.png"}))
    (patch,) = app_server.wait_for(lambda r: r.path.endswith("/wheel-1"), timeout=240)
    assert patch.json()["status"] == "completed", patch.json()
    status = httpx.get(
        f"http://127.0.0.1:{port}/jobs/wheel-1", headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=30
    )
    assert status.status_code == 200 and status.json()["status"] == "completed"
    for proc in stack.procs:
        assert proc.popen.poll() is None, f"{proc.name} exited:\n{proc.output()[-3000:]}"
        assert str(REPO / "samseg") not in proc.output(), f"{proc.name} ran the checkout's code"
