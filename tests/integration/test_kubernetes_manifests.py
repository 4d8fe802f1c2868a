"""deploy/kubernetes: render the kustomizations, validate every object, and check what the manifests promise.

- Rendering: `kubectl kustomize` where kubectl exists; always also a small renderer below (the kustomize
  features these manifests use: resources, namespace, labels, images, JSON 6902 patches), checked against
  kubectl's output when both are there, so CI without kubectl renders the same objects.
- Kubernetes kinds: `kubernetes-validate --strict` (its bundled JSON schemas; no cluster) for 1.32 and the
  newest version the package knows. KEDA kinds: their CRDs' OpenAPI schemas, vendored from kedacore/keda
  (tests/data/keda, commit 8b4f083), with jsonschema.
- Semantics: KEDA's queueLength for the GPU worker = prefetch x concurrency parsed from its command; every probe
  hits a route samseg's FastAPI app (or Flower) really serves, or runs a command samseg's CLI really has; beat
  is one replica with Recreate; queue names agree across ConfigMap, commands and triggers; every SAMSEG_ variable
  is a real setting and parses.
"""

from __future__ import annotations

import copy
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import REPO

K8S = REPO / "deploy" / "kubernetes"
APP = [K8S / "base", K8S / "overlays" / "aws"]  # the namespaced application
OVERLAYS = [*APP, K8S / "cluster"]  # + the cluster-scoped admission policy
KEDA_CRDS = REPO / "tests" / "data" / "keda"
CLUSTER_SCOPED = {"Namespace", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "ClusterRole"}


# --- a small kustomize -----------------------------------------------------------------------------------
def render(directory: Path) -> list[dict[str, Any]]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}
    assert not unknown, f"the test's renderer does not implement {unknown}: extend it or use kubectl"
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects += render(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in spec.get("patches", []):
        operations = yaml.safe_load((directory / patch["path"]).read_text())
        target = patch["target"]
        matched = [o for o in objects if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
        assert matched, f"patch {patch['path']} matches nothing"
        for obj in matched:
            for operation in operations:
                _json_patch(obj, operation)
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
            for subject in obj.get("subjects", []) if obj["kind"] in {"RoleBinding", "ClusterRoleBinding"} else []:
                if subject["kind"] == "ServiceAccount":
                    subject["namespace"] = spec["namespace"]
    for label in spec.get("labels", []):
        assert not label.get("includeSelectors") and not label.get("includeTemplates")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in spec.get("images", []):
        for container in (c for obj in objects for c in _containers(obj)):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}".rstrip(":")
    return objects


def _json_patch(obj: dict[str, Any], operation: dict[str, Any]) -> None:
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].lstrip("/").split("/")]
    node: Any = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) and last != "-" else last
    if operation["op"] == "add" and isinstance(node, list):
        node.append(operation["value"]) if key == "-" else node.insert(key, operation["value"])
    elif operation["op"] in {"add", "replace"}:
        if operation["op"] == "replace":
            assert key in node if isinstance(node, dict) else key < len(node), operation
        node[key] = copy.deepcopy(operation["value"])
    elif operation["op"] == "remove":
        del node[key]
    else:
        raise AssertionError(f"JSON patch op {operation['op']} not implemented here")


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {}) if obj["kind"] in {"Deployment", "Job"} else {}
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _by_key(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


@pytest.fixture(scope="module", params=APP, ids=lambda p: p.name)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def test_the_renderer_agrees_with_kubectl_kustomize():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the manifests are rendered by the test's own renderer only")
    for directory in OVERLAYS:
        out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        theirs = _by_key([d for d in yaml.safe_load_all(out.stdout) if d])
        assert theirs == _by_key(render(directory)), directory


# --- schemas ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("directory", OVERLAYS, ids=lambda p: p.name)
def test_every_kubernetes_object_passes_strict_schema_validation(directory):
    rendered = render(directory)
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]'")
    from kubernetes_validate.utils import latest_version

    versions = ["1.32.0", f"{latest_version()}.0"]
    core = [o for o in rendered if not o["apiVersion"].startswith("keda.sh/")]
    app_kinds = {"Deployment", "PodDisruptionBudget", "Role"}
    expected = {"ValidatingAdmissionPolicy"} if directory.name == "cluster" else app_kinds
    assert {o["kind"] for o in core} >= expected
    for version in versions:
        for obj in core:
            kubernetes_validate.validate(obj, version, strict=True)  # raises ValidationError


def _crd_schema(name: str) -> dict[str, Any]:
    crd = yaml.safe_load((KEDA_CRDS / name).read_text())
    [version] = [v for v in crd["spec"]["versions"] if v.get("served")]
    return dict(version["schema"]["openAPIV3Schema"])


def test_keda_objects_match_their_crd_schemas(rendered):
    jsonschema = pytest.importorskip("jsonschema")
    schemas = {
        "ScaledObject": _crd_schema("keda.sh_scaledobjects.yaml"),
        "TriggerAuthentication": _crd_schema("keda.sh_triggerauthentications.yaml"),
    }
    keda = [o for o in rendered if o["apiVersion"].startswith("keda.sh/")]
    assert sorted(o["kind"] for o in keda) == ["ScaledObject", "ScaledObject", "TriggerAuthentication"]
    for obj in keda:
        schema = _strict(schemas[obj["kind"]])
        jsonschema.validate(obj, schema, cls=jsonschema.Draft7Validator)


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected (the API server prunes them: a typo would vanish silently)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def test_keda_strict_schema_does_reject_a_typo():
    jsonschema = pytest.importorskip("jsonschema")
    obj = _by_key(render(K8S / "base"))[("ScaledObject", "samseg-worker-gpu")]
    bad = copy.deepcopy(obj)
    bad["spec"]["minReplicaCout"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _strict(_crd_schema("keda.sh_scaledobjects.yaml")))


# --- what the manifests promise -----------------------------------------------------------------------------
def _container(objects: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    [container] = _by_key(objects)[("Deployment", deployment)]["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _option(argv: list[str], *names: str, default: str | None = None) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name:
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return default


def _held_per_pod(container: dict[str, Any]) -> int:
    """How many messages one worker pod holds: Celery reserves prefetch_multiplier x concurrency."""
    from samseg.core.settings import Settings
    from samseg.worker.config import celery_config

    default_prefetch = celery_config(Settings())["worker_prefetch_multiplier"]
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[:4] == ["celery", "-A", "samseg", "worker"], argv
    concurrency = _option(argv, "--concurrency", "-c")
    assert concurrency is not None, "a worker command without --concurrency depends on the node's CPU count"
    prefetch = _option(argv, "--prefetch-multiplier", default=str(default_prefetch))
    return int(concurrency) * int(prefetch or 1)


def _trigger(objects: list[dict[str, Any]], scaled: str, queue: str) -> dict[str, str]:
    triggers = _by_key(objects)[("ScaledObject", scaled)]["spec"]["triggers"]
    [trigger] = [t for t in triggers if t["metadata"]["queueURL"].rsplit("/", 1)[-1] == queue]
    assert trigger["type"] == "aws-sqs-queue"
    return dict(trigger["metadata"])


def _config(objects: list[dict[str, Any]]) -> dict[str, str]:
    return dict(_by_key(objects)[("ConfigMap", "samseg-config")]["data"])


def test_gpu_queue_length_is_prefetch_times_concurrency_of_one_pod(rendered):
    gpu = _container(rendered, "samseg-worker-gpu")
    env = {e["name"]: e.get("value") for e in gpu["env"]}
    assert env["CELERY_CUSTOM_WORKER_POOL"] == "samseg.pool:ModelThreadPool"
    argv = gpu["command"]
    assert _option(argv, "--pool") == "custom"
    config = _config(rendered)
    gpu_queue = config["SAMSEG_QUEUE_PREFIX"] + "gpu"
    assert _option(argv, "-Q") == gpu_queue
    trigger = _trigger(rendered, "samseg-worker-gpu", gpu_queue)
    assert int(trigger["queueLength"]) == _held_per_pod(gpu) == 2
    assert trigger["scaleOnInFlight"] == "true"  # held messages are in flight: count them, or pods flap
    assert "activationQueueLength" in trigger
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_io_queue_lengths_follow_the_io_worker_command(rendered):
    io = _container(rendered, "samseg-worker-io")
    config = _config(rendered)
    queues = _option(io["command"], "-Q")
    assert queues is not None
    assert queues.split(",") == [config["SAMSEG_JOBS_QUEUE"], config["SAMSEG_QUEUE_PREFIX"] + "io"]
    for queue in queues.split(","):
        assert int(_trigger(rendered, "samseg-worker-io", queue)["queueLength"]) == _held_per_pod(io)


def test_gpu_scaled_object_scales_to_zero_with_fallback_and_slow_scale_down(rendered):
    spec = _by_key(rendered)[("ScaledObject", "samseg-worker-gpu")]["spec"]
    assert spec["scaleTargetRef"]["name"] == "samseg-worker-gpu"
    assert spec["minReplicaCount"] == 0
    assert spec["fallback"]["replicas"] >= 1
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 60
    auth = _by_key(rendered)[("TriggerAuthentication", "samseg-aws")]["spec"]
    assert auth["podIdentity"]["provider"] == "aws"


def _probes(objects: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    found = []
    for obj in objects:
        for container in _containers(obj):
            for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
                if kind in container:
                    found.append((obj["metadata"]["name"], kind, container[kind]))
    return found


def _fastapi_paths() -> set[str]:
    """The GET routes samseg's app serves (its OpenAPI document: FastAPI 0.165 nests included routers)."""
    from samseg.api import create_app

    return {path for path, methods in create_app().openapi()["paths"].items() if "get" in methods}


def _flower_paths() -> set[str]:
    flower_urls = pytest.importorskip("flower.urls", reason="Flower is the ops extra")
    patterns = [h.regex.pattern if hasattr(h, "regex") else h[0] for h in flower_urls.handlers]
    return {str(p).rstrip("$") for p in patterns if "(" not in str(p) and str(p) != ".*"}


def test_every_probe_hits_a_real_route_or_command(rendered):
    api_paths, flower_paths = _fastapi_paths(), _flower_paths()
    probes = _probes(rendered)
    assert {(name, kind) for name, kind, _ in probes} >= {
        ("samseg-api", "livenessProbe"),
        ("samseg-api", "readinessProbe"),
        ("samseg-worker-gpu", "livenessProbe"),
        ("samseg-worker-gpu", "startupProbe"),
        ("samseg-worker-io", "livenessProbe"),
    }
    for name, kind, probe in probes:
        if "httpGet" in probe:
            paths = flower_paths if name == "samseg-flower" else api_paths
            assert probe["httpGet"]["path"] in paths, (name, kind)
            ports = {
                p["name"]
                for o in rendered
                for c in _containers(o)
                if o["metadata"]["name"] == name
                for p in c.get("ports", [])
            }
            assert probe["httpGet"]["port"] in ports, (name, kind)
        else:
            _assert_real_command(probe["exec"]["command"])
    api = {kind: probe["httpGet"]["path"] for name, kind, probe in probes if name == "samseg-api"}
    assert api["livenessProbe"] == "/healthz" and api["readinessProbe"] == "/readyz"
    assert "--live" not in str(_container(rendered, "samseg-worker-gpu")["startupProbe"])  # waits for warm-up


def _assert_real_command(argv: list[str]) -> None:
    """The probe command exists in samseg's CLI: argparse accepts it (parsing stops before running anything)."""
    from samseg.cli import build_parser
    from samseg.cli.health import cmd_healthcheck_worker

    assert argv[:3] == ["samseg", "healthcheck", "worker"], argv
    parsed = build_parser().parse_args(argv[1:])  # argparse accepts it; nothing runs
    assert parsed.func is cmd_healthcheck_worker


def test_gpu_startup_probe_allows_weights_download_and_warm_up(rendered):
    probe = _container(rendered, "samseg-worker-gpu")["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 600


def test_beat_is_exactly_one_and_recreated(rendered):
    beats = [o for o in rendered if o["kind"] == "Deployment" and "beat" in _container_argv(o)]
    assert len(beats) == 1
    spec = beats[0]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert not [
        o
        for o in rendered
        if o["kind"] == "ScaledObject" and o["spec"]["scaleTargetRef"]["name"] == beats[0]["metadata"]["name"]
    ]


def _container_argv(obj: dict[str, Any]) -> list[str]:
    return [a for c in _containers(obj) for a in c.get("command", [])]


def test_api_has_two_replicas_and_a_disruption_budget(rendered):
    objects = _by_key(rendered)
    assert objects[("Deployment", "samseg-api")]["spec"]["replicas"] == 2
    pdb = objects[("PodDisruptionBudget", "samseg-api")]["spec"]
    assert pdb["selector"]["matchLabels"] == objects[("Deployment", "samseg-api")]["spec"]["selector"]["matchLabels"]


def test_grace_periods_bound_the_soft_shutdown(rendered):
    for name, remap in (("samseg-worker-gpu", False), ("samseg-worker-io", True)):
        deployment = _by_key(rendered)[("Deployment", name)]
        env = {e["name"]: e.get("value") for e in _container(rendered, name)["env"]}
        soft = float(env["SAMSEG_WORKER_SOFT_SHUTDOWN_TIMEOUT_SECONDS"])
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert soft >= 11 and soft + 15 <= grace, name  # >= the long poll (11 s), margin to exit before SIGKILL
        # Thread pools cannot be cancelled by Celery's cold shutdown: only prefork remaps SIGTERM.
        assert (env.get("REMAP_SIGTERM") == "SIGQUIT") is remap, name
    assert (
        _by_key(rendered)[("Deployment", "samseg-worker-gpu")]["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]
        <= 120
    )  # EC2 Spot's 2-minute notice


def test_scale_in_rbac_is_the_gpu_workers_alone(rendered):
    objects = _by_key(rendered)
    role = objects[("Role", "samseg-scale-in")]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}]
    binding = objects[("RoleBinding", "samseg-scale-in")]
    assert [s["name"] for s in binding["subjects"]] == ["samseg-gpu-worker"]
    users = {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]["serviceAccountName"]
        for o in rendered
        if o["kind"] == "Deployment"
    }
    assert [d for d, sa in users.items() if sa == "samseg-gpu-worker"] == ["samseg-worker-gpu"]
    env = {e["name"]: e for e in _container(rendered, "samseg-worker-gpu")["env"]}
    assert env["SAMSEG_SCALE_IN_PROTECTION"]["value"] == "kubernetes"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_every_samseg_variable_is_a_setting_and_parses(rendered, monkeypatch):
    from samseg.core.settings import Settings

    known = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        known |= {f"SAMSEG_{name.upper()}"} if alias is None else {str(c) for c in getattr(alias, "choices", [alias])}
    for deployment in ("samseg-api", "samseg-worker-gpu", "samseg-worker-io"):
        env = dict(_config(rendered))
        env.update({e["name"]: e["value"] for e in _container(rendered, deployment).get("env", []) if "value" in e})
        unknown = [k for k in env if k.startswith("SAMSEG_") and k not in known]
        assert not unknown, (deployment, unknown)
        with monkeypatch.context() as m:
            for key in [k for k in __import__("os").environ if k.startswith(("SAMSEG_", "AWS_"))]:
                m.delenv(key)
            for key, value in env.items():
                m.setenv(key, value)
            Settings(_env_file=None)  # raises on a bad value


def test_commands_are_exec_form(rendered):
    """No shell: the container's main process is celery/uvicorn itself and receives the SIGTERM."""
    for obj in rendered:
        for container in _containers(obj):
            assert container["command"][0] in {"celery", "uvicorn"}, shlex.join(container["command"])
