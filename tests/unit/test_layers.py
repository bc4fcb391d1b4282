"""The packages are layers with one direction: ``rlhf`` (jobs, the RL driver, data, models, CLI) above ``serving``
(Ray Serve and vLLM) above ``cluster`` (Ray plumbing, process groups, the config tree). A lower layer imports
nothing from a higher one, not even inside a function body.

Before: ``cluster/plan.py`` imported ``rlhf.jobs.ppo`` and ``rlhf.models``, ``cluster/groups.py`` imported
``rlhf.engine``, and ``serving/app.py`` and ``serving/server.py`` imported ``rlhf.config``, ``rlhf.configtree`` and
``rlhf.models.loading``; every one of those imports sat in a function body or behind ``rlhf``'s own imports of
``serving``, so nothing failed at import time.
"""

from __future__ import annotations

import ast
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


def test_no_package_imports_from_a_higher_layer() -> None:
    assert upward_imports() == []


def test_the_check_sees_imports_inside_function_bodies(tmp_path: Path) -> None:
    source = tmp_path / "module.py"
    source.write_text("import os\n\ndef f():\n    from rlhf.models.loading import resolve\n    import serving.app\n")
    assert imports(source) == [(1, "os"), (4, "rlhf.models.loading"), (5, "serving.app")]
