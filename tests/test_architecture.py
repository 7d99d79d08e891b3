"""The package's layering, read from its source: no module imports a layer above its own,
and no import circles.

The layers (``docs/architecture.md`` says why) run from the math at the top to the
workflow at the bottom, data flowing one way: data -> transforms -> distributions ->
training -> runs -> cli/report. Every import counts, including the ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import exactflow

ROOT = Path(exactflow.__file__).parent

#: The package's layers, top (imported by everything) to bottom (imports everything).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("exactflow._version", "exactflow.validation", "exactflow.stats")),
    ("contract", ("exactflow.core", "exactflow.nn")),
    ("layers", ("exactflow.transforms",)),
    ("ground truth", ("exactflow.jacobians", "exactflow.checkcalls", "exactflow.groundtruth")),
    ("densities", ("exactflow.bases", "exactflow.shapes", "exactflow.distributions",
                   "exactflow.gaussians", "exactflow.scoring")),
    ("builders", ("exactflow.models",)),
    ("data", ("exactflow.datasets", "exactflow.targets")),
    ("storage and processes", ("exactflow.io", "exactflow.distributed")),
    ("training", ("exactflow.training",)),
    ("runs", ("exactflow.runs", "exactflow.diagnostics")),
    ("figures and estimators", ("exactflow.plotting", "exactflow.sklearn")),
    ("interfaces", ("exactflow.report", "exactflow.cli", "exactflow.__main__")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The exactflow modules ``name`` imports, anywhere in its source."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "exactflow")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "exactflow":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return {m for m in found if m != name}


def layer_of(name: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS and docs/architecture.md")
    return best[0]


def test_every_module_has_a_layer():
    for name in MODULES:
        if name != "exactflow":
            layer_of(name)


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m != "exactflow"))
def test_no_module_imports_a_layer_below_its_own(name):
    mine = layer_of(name)
    for target in sorted(imports(name)):
        assert target != "exactflow", f"{name} imports the top-level package"
        theirs = layer_of(target)
        assert theirs <= mine, (
            f"{name} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]}), a layer "
            "below its own"
        )


def test_no_import_circles():
    graph = {name: imports(name) for name in MODULES if name != "exactflow"}
    # A package's __init__ re-exports its modules; its modules importing the package's
    # other modules through it is not a circle, so __init__ -> child edges are dropped.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt in graph and state.get(nxt) is None:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) is None:
            visit(node)


def test_no_module_is_over_500_lines():
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, f"modules over 500 lines (split them by job): {long}"


def test_the_checker_sees_a_wrong_import(tmp_path, monkeypatch):
    # The test must be able to fail: a data module importing training is caught.
    fake = tmp_path / "fake.py"
    fake.write_text("from ..training import fit\n")
    monkeypatch.setitem(MODULES, "exactflow.datasets.fake", fake)
    with pytest.raises(AssertionError, match="a layer below its own"):
        test_no_module_imports_a_layer_below_its_own("exactflow.datasets.fake")


def test_no_module_is_shadowed_by_a_name_its_package_exports():
    # `exactflow.jacobian` was once both a module and the function ef.jacobian: importing
    # the module then gave the function. Every module stays reachable by its dotted name.
    import importlib

    for name in MODULES:
        package, _, leaf = name.rpartition(".")
        if not package or leaf.startswith("_"):
            continue
        module = importlib.import_module(name)
        assert getattr(importlib.import_module(package), leaf) is module, (
            f"{package} exports a {leaf!r} that is not the module {name}"
        )
