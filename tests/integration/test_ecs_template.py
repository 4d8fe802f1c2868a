"""deploy/ecs: cfn-lint over the CloudFormation, and the numbers that must agree with the worker commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import REPO

TEMPLATES = sorted((REPO / "deploy" / "ecs").glob("*.yaml"))


class _CfnLoader(yaml.SafeLoader):
    """Reads CloudFormation's short-form tags (!Ref, !Sub, ...) as plain values."""


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return {suffix: loader.construct_scalar(node)}
    if isinstance(node, yaml.SequenceNode):
        return {suffix: loader.construct_sequence(node)}
    return {suffix: loader.construct_mapping(node)}  # type: ignore[arg-type]


_CfnLoader.add_multi_constructor("!", _tag)


def _template(path: Path) -> dict[str, Any]:
    return dict(yaml.load(path.read_text(), Loader=_CfnLoader))  # a SafeLoader subclass


def test_there_is_a_template():
    assert TEMPLATES


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_cfn_lint_passes(path):
    api = pytest.importorskip("cfnlint.api", reason="cfn-lint is in the dev extra (CI installs it)")
    matches = api.lint_file(path)  # every rule, errors and warnings, with cfn-lint's bundled resource specs
    assert not matches, "\n".join(str(m) for m in matches)


def test_gpu_backlog_target_is_what_one_task_holds():
    resources = _template(REPO / "deploy" / "ecs" / "samseg-workers.yaml")["Resources"]
    [container] = resources["GpuWorkerTask"]["Properties"]["ContainerDefinitions"]
    argv = [a if isinstance(a, str) else "" for a in container["Command"]]
    held = int(argv[argv.index("--concurrency") + 1]) * int(argv[argv.index("--prefetch-multiplier") + 1])
    params = _template(REPO / "deploy" / "ecs" / "samseg-workers.yaml")["Parameters"]
    assert params["GpuBacklogPerTask"]["Default"] == held == 2
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["SAMSEG_SCALE_IN_PROTECTION"] == "ecs"
    assert "REMAP_SIGTERM" not in env  # thread pool: samseg bounds the warm shutdown
    assert float(env["SAMSEG_WORKER_SOFT_SHUTDOWN_TIMEOUT_SECONDS"]) + 15 <= container["StopTimeout"] <= 120
    policy = resources["GpuBacklogTracking"]["Properties"]["TargetTrackingScalingPolicyConfiguration"]
    assert policy["TargetValue"] == {"Ref": "GpuBacklogPerTask"}
    assert resources["GpuScalableTarget"]["Properties"]["MinCapacity"] == 0
    assert resources["GpuScaleFromZero"]["Properties"]["PolicyType"] == "StepScaling"
