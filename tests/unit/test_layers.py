"""The packages are layers with one direction: ``rlhf`` (jobs, the RL driver, data, models, CLI) above ``serving``
(Ray Serve and vLLM) above ``cluster`` (Ray plumbing, process groups, the config tree). A lower layer imports
nothing from a higher one, not even inside a function body, and no module imports itself back through others.

Before: ``cluster/plan.py`` imported ``rlhf.jobs.ppo`` and ``rlhf.models``, ``cluster/groups.py`` imported
``rlhf.engine``, and ``serving/app.py`` and ``serving/server.py`` imported ``rlhf.config``, ``rlhf.configtree`` and
``rlhf.models.loading``; every one of those imports sat in a function body or behind ``rlhf``'s own imports of
``serving``, so nothing failed at import time. Two circles remained inside the layers: ``serving.app`` ->
``serving.weight_transfer`` -> ``serving.rollout`` -> ``serving.app``, and ``rlhf.cli`` <-> ``rlhf.demo``.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("cluster", "serving", "rlhf")  # lowest first


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, wherever it sits (module level, functions, ``TYPE_CHECKING``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def upward_imports() -> list[str]:
    violations = []
    for rank, package in enumerate(LAYERS):
        higher = LAYERS[rank + 1 :]
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, module in imports(path):
                if module.split(".")[0] in higher:
                    violations.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return violations


def modules() -> dict[str, Path]:
    """Every module of the three packages by dotted name (a package by its own name)."""
    found = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports (``from a import b`` counts as importing ``a.b`` if that is one)."""
    known = modules()

    def module_of(dotted: str) -> str | None:
        parts = dotted.split(".")
        return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in known), None)

    graph = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {module_of(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets |= {module_of(f"{node.module}.{alias.name}") for alias in node.names}
        graph[name] = targets - {None, name}
    return graph


def test_no_package_imports_from_a_higher_layer() -> None:
    assert upward_imports() == []


def test_no_import_circle() -> None:
    try:
        tuple(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"import circle: {' -> '.join(exc.args[1])}") from None


def test_the_circle_check_finds_a_circle() -> None:
    graph = import_graph()
    graph["cluster.connect"].add("cluster.groups")  # cluster.groups imports cluster.connect
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError:
        return
    raise AssertionError("the circle went unseen")


def test_the_check_sees_imports_inside_function_bodies(tmp_path: Path) -> None:
    source = tmp_path / "module.py"
    source.write_text("import os\n\ndef f():\n    from rlhf.models.loading import resolve\n    import serving.app\n")
    assert imports(source) == [(1, "os"), (4, "rlhf.models.loading"), (5, "serving.app")]
