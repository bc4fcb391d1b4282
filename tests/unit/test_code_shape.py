"""The shape rules of the three packages: files and functions short enough to read, actor methods called by reference.

Before these tests the driver of rlhf ppo was one 968-line file whose role groups were called with method names in
strings (``group.call("open_weight_transfer", ...)``), which neither a reader nor a type checker can follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rlhf", "serving", "cluster")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
GROUP_CALLS = {"call", "submit", "call_sharded", "submit_sharded"}


def sources() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def test_no_file_is_over_400_lines() -> None:
    long_files = {str(p.relative_to(ROOT)): n for p in sources() if (n := p.read_text().count("\n")) > MAX_FILE_LINES}
    assert not long_files, f"files over {MAX_FILE_LINES} lines: {long_files}"


def test_no_function_is_over_60_lines() -> None:
    long_functions = {}
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long_functions[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


def string_method_calls(source: str) -> list[str]:
    """``group.call("name", ...)``-style calls in ``source``: an actor group's method named by a string."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in GROUP_CALLS
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(f"line {node.lineno}: .{node.func.attr}({node.args[0].value!r}, ...)")
    return found


def test_no_actor_group_method_is_called_by_name() -> None:
    calls = {str(p.relative_to(ROOT)): found for p in sources() if (found := string_method_calls(p.read_text()))}
    assert not calls, f"actor methods called by name (call them by reference, e.g. PolicyWorker.train): {calls}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [('group.call("export", "/tmp")', 1), ("group.call(PolicyWorker.export, '/tmp')", 0), ('pool.submit(f, "x")', 0)],
)
def test_the_check_finds_a_call_by_name(source: str, expected: int) -> None:
    assert len(string_method_calls(source)) == expected
