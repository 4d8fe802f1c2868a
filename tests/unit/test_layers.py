"""The import contract of `samseg/` (issue 14), checked on the source itself — every import statement, at module
level, inside functions and under TYPE_CHECKING alike:

- imports point down the layers: core → {runtime, transfer, stores, queue, client} → ops → {worker, api} → cli;
  layers on one rank are siblings and never import each other;
- no cycle between modules, function-level imports included.

`samseg/__init__.py` (the lazy `samseg.app`) and `samseg/pool.py` (a public alias) are entry points that may
reach any layer. Written as a test rather than an import-linter config so it needs no extra tool and reads the
same AST CI runs everywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "samseg"
RANKS = {
    "core": 0,
    "runtime": 1,
    "transfer": 1,
    "stores": 1,
    "queue": 1,
    "client": 1,
    "ops": 2,
    "worker": 3,
    "api": 3,
    "cli": 4,
}
ENTRY_POINTS = {"samseg", "samseg.pool"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every samseg module `path` imports (resolving `from pkg import mod` to the module where it is one)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("samseg"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if not base.startswith("samseg"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return {target for target in found if target != name}


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANKS else None


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, set(known)) for name, path in known.items()}


def test_every_module_is_in_a_layer() -> None:
    strays = [name for name in modules() if name not in ENTRY_POINTS and layer(name) is None]
    assert not strays, f"modules outside the layers {sorted(RANKS)}: {strays}"


def test_imports_point_down() -> None:
    upward = []
    for source, targets in graph().items():
        if source in ENTRY_POINTS:
            continue
        here = layer(source)
        assert here is not None
        for target in targets:
            there = layer(target)
            if target == "samseg" or (there is not None and there != here and RANKS[there] >= RANKS[here]):
                upward.append(f"{source} → {target}")
    assert not upward, "imports that do not point down a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycle() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in edges:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    # A package's __init__ re-exporting its own modules is not a cycle of concerns; anything else is.
    real = [c for c in cycles if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]
    assert not real, f"import cycles: {real}"


@pytest.mark.parametrize("bad", ["from samseg.worker.app import create_app", "import samseg.api.jobs"])
def test_the_checker_sees_an_upward_import(tmp_path: Path, bad: str) -> None:
    """The contract can fail: an upward import written into a core module is reported (function level too)."""
    path = tmp_path / "x.py"
    path.write_text(f"def f():\n    {bad}\n")
    targets = imports_of("samseg.core.x", path, set(modules()))
    assert any(RANKS[layer(t) or "core"] > RANKS["core"] for t in targets)
