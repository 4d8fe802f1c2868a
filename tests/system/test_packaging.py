"""`pip install .` without extras gives a worker, beat and API that start (and run a job).

Two halves, both without building a venv (that takes minutes; the README records one manual fresh-venv run):
1. The requirement closure of `.` with no extras, computed from pyproject.toml and the installed packages'
   own metadata (Requires-Dist, markers and extras evaluated as pip evaluates them): prometheus_client is in
   it; moto, Flask, the Docker SDK, cfn-lint and Flower are not.
2. Real processes that cannot import anything outside that closure: every top-level module of an installed
   distribution outside it is made unimportable in the subprocess (tests/noextras/sitecustomize.py), then a
   worker, beat and the API start against the session's moto server (moto runs in the test process, like
   an SQS endpoint would) and one job goes through end to end.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
import tomllib
from functools import cache

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.faults_support import is_callback
from tests.support import AUTH, REPO, VENV_BIN, free_port

NOEXTRAS_DIR = REPO / "tests" / "noextras"
# Only in extras: the emulator (moto and what its `server` extra pulls) and Flower.
EXTRAS_ONLY = {"moto", "flask", "werkzeug", "docker", "cfn-lint", "flower"}
# Present in any venv (pip ships with it) or ours (the project itself, installed editable here).
ALWAYS_IMPORTABLE = {"samseg", "celeryconfig", "tests", "pip", "_distutils_hack", "pkg_resources", "setuptools"}


def _project() -> dict[str, object]:
    with (REPO / "pyproject.toml").open("rb") as handle:
        project: dict[str, object] = tomllib.load(handle)["project"]
    return project


def closure(requirements: list[str]) -> dict[str, set[str]]:
    """Every distribution (canonical name → extras asked of it) that installing `requirements` brings."""
    seen: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        wanted = {canonicalize_name(e) for e in req.extras}
        if name in seen and wanted <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | wanted
        try:
            requires = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            pytest.fail(f"{name} is required but not installed in this venv, so its requirements are unknown")
        for line in requires:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in {"", *seen[name]}):
                todo.append(Requirement(str(sub).split(";")[0]))
    return seen


@cache
def core_closure() -> frozenset[str]:
    deps = _project()["dependencies"]
    assert isinstance(deps, list)
    return frozenset(closure(deps))


def blocked_modules() -> list[str]:
    """Top-level modules of installed distributions that `pip install .` (no extras) would not install."""
    core = core_closure()
    owners = md.packages_distributions()
    return sorted(
        module
        for module, dists in owners.items()
        if module.isidentifier()
        and module not in ALWAYS_IMPORTABLE
        and not any(canonicalize_name(d) in core for d in dists)
    )


def test_core_requirements_have_prometheus_and_no_emulator_or_flower():
    core = core_closure()
    assert "prometheus-client" in core
    assert not EXTRAS_ONLY & core, sorted(EXTRAS_ONLY & core)
    extras = _project()["optional-dependencies"]
    assert isinstance(extras, dict)
    emulator = set(closure(extras["emulator"]))
    assert {"moto", "flask", "werkzeug"} <= emulator  # `samseg up` can start moto.server with this extra
    assert "flower" in closure(extras["ops"])
    # scripts/install.sh (the path `scripts/up.sh` and `samseg up` rely on) installs the emulator extra.
    assert '".[ops,dev,emulator]"' in (REPO / "scripts" / "install.sh").read_text()


def _noextras_env(env: dict[str, str]) -> dict[str, str]:
    return {
        **env,
        "PYTHONPATH": f"{NOEXTRAS_DIR}:{REPO}",
        "SAMSEG_TEST_BLOCKED_MODULES": ",".join(blocked_modules()),
    }


def test_the_blocking_is_real():
    """The subprocess set-up itself: extras' modules fail to import, core ones import."""
    env = _noextras_env({"PATH": str(VENV_BIN)})
    probe = "import importlib.util as u; print(json.dumps({m: u.find_spec(m) is not None for m in sys.argv[1:]}))"
    modules = ["moto", "flask", "flower", "docker", "prometheus_client", "celery", "fastapi", "torch"]
    for module in modules[:4]:
        result = subprocess.run(
            [sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, (module, result.stderr)
    found = subprocess.run(
        [sys.executable, "-c", f"import json, sys; {probe}", *modules[4:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(found.stdout) == dict.fromkeys(modules[4:], True)


def test_worker_beat_and_api_start_and_run_a_job_without_extras(make_stack, images, app_server):
    stack = make_stack(SAMSEG_APP_SERVER_URL=app_server.url, SAMSEG_CLEANUP_INTERVAL_SECONDS="2")
    stack.env.update(_noextras_env(stack.env))
    api = stack.start_api()
    worker = stack.start_worker()
    beat = stack.start("beat", str(VENV_BIN / "celery"), "-A", "samseg", "beat", "--loglevel", "INFO")
    beat.wait_for_output("purge-old-assets", 60)  # beat sent its first due task

    stack.send_raw(json.dumps({"uuid": "noextras-1", "image_url": f"{images.url}/ok.png"}))
    (patch,) = app_server.wait_for(is_callback("noextras-1"), timeout=180)
    assert patch.json()["status"] == "completed", patch.json()
    assert httpx.get(f"{api}/readyz", timeout=30).status_code == 200
    assert "samseg_assets_free_bytes" in httpx.get(f"{api}/metrics", headers=AUTH, timeout=30).text
    if "flower" in blocked_modules():
        # Proof the block was active inside the real worker: celery's CLI tried Flower's plugin and failed.
        assert "samseg_test_blocked_import flower" in worker.output()
    for proc in stack.procs:
        assert proc.popen.poll() is None, f"{proc.name} exited:\n{proc.output()[-3000:]}"
        assert "Traceback" not in proc.output(), f"{proc.name}:\n{proc.output()[-3000:]}"


def test_up_without_the_emulator_says_how_to_fix_it(tmp_path):
    env = _noextras_env({"PATH": f"{VENV_BIN}", "HOME": str(tmp_path), "SAMSEG_ASSETS_DIR": str(tmp_path / "a")})
    result = subprocess.run(
        [sys.executable, "-m", "samseg.cli", "up", "--port", str(free_port())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "install samseg[emulator]" in result.stderr and "AWS_ENDPOINT_URL_SQS" in result.stderr, result.stderr
    assert "started" not in result.stdout  # it stopped before starting any child
