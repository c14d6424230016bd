"""Rules for the tests themselves: a test never hangs.

pytest-timeout ends a hung test, but only after its whole budget and with a stack dump
instead of the value that never came; a ``zmesh.get`` or ``zmesh.wait`` with its own
timeout fails at once, naming what was missing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
TEST_FILES = sorted(TESTS.rglob("*.py"))


def _blocking_calls_without_timeout(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        func = node.func
        blocking = func.attr in ("get", "wait") and isinstance(func.value, ast.Name) and func.value.id == "zmesh"
        if blocking and not any(keyword.arg == "timeout" for keyword in node.keywords):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("path", TEST_FILES, ids=[str(p.relative_to(TESTS)) for p in TEST_FILES])
def test_every_get_and_wait_in_a_test_has_a_timeout(path: Path) -> None:
    missing = _blocking_calls_without_timeout(ast.parse(path.read_text()))
    assert not missing, f"{path.relative_to(TESTS)}: zmesh.get/zmesh.wait without timeout= on lines {missing}"


def test_the_rule_sees_a_call_without_timeout() -> None:
    tree = ast.parse("zmesh.get(ref)\nzmesh.get(ref, timeout=5)\nzmesh.wait(refs, num_returns=2)\nother.get(x)\n")
    assert _blocking_calls_without_timeout(tree) == [1, 3]


UNIT_FILES = sorted((TESTS / "unit").glob("test_*.py"))
# What starts processes or nodes: a unit test (pure decisions, framing, one thread at most) uses none of them.
PROCESS_MARKERS = ("NodeProcess", "LocalCluster", "zmesh.init(", "import subprocess", "run_driver", "local: None", ": NodeProcess")


@pytest.mark.parametrize("path", UNIT_FILES, ids=[p.name for p in UNIT_FILES])
def test_unit_tests_start_no_process_or_node(path: Path) -> None:
    text = path.read_text()
    if path.name == Path(__file__).name:
        return  # this file names the markers
    found = [marker for marker in PROCESS_MARKERS if marker in text]
    assert not found, f"unit/{path.name} uses {found}: a test that starts processes belongs in integration/ (or netns/)"
