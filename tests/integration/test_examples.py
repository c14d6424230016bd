"""Every example in examples/ runs as its own process, on an embedded node of its own, and exits 0.

An example can declare what it needs near its top with a comment such as ``# needs: gpu``; it is skipped,
with the reason, where that is missing.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
NEEDS = re.compile(r"^\s*#\s*needs:\s*([\w, -]+?)\s*(?:\(|$)", re.MULTILINE)
HEAD_LINES = 15

# What the examples print last, where it is part of what they show.
LAST_LINE = {"quickstart.py": "15", "tasks.py": "800,000 words"}


def needs_of(path: Path) -> set[str]:
    head = "\n".join(path.read_text().splitlines()[:HEAD_LINES])
    return {need.strip().lower() for match in NEEDS.finditer(head) for need in match.group(1).split(",") if need.strip()}


@functools.cache
def gpu_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60).returncode == 0


def missing_needs(needs: set[str]) -> list[str]:
    missing = []
    for need in sorted(needs):
        if need == "gpu":
            if not gpu_available():
                missing.append("gpu (a CUDA GPU with PyTorch)")
        else:
            missing.append(need)  # a need this harness does not know how to satisfy
    return missing


def test_examples_are_found() -> None:
    assert "quickstart.py" in {p.name for p in EXAMPLES}


def test_needs_comment_is_parsed(tmp_path: Path) -> None:
    example = tmp_path / "x.py"
    example.write_text('"""Doc.\n\n# needs: gpu   (and PyTorch)\n"""\n')
    assert needs_of(example) == {"gpu"}
    example.write_text("# needs: gpu, bigmem\nimport zmesh\n")
    assert needs_of(example) == {"gpu", "bigmem"}
    example.write_text("import zmesh\n")
    assert needs_of(example) == set()
    assert needs_of(ROOT / "examples" / "quickstart.py") == set()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path: Path, isolated_run_dir: Path) -> None:
    missing = missing_needs(needs_of(path))
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(missing)}")
    # The isolated run directory has no node in it, so the example starts an embedded one of its own.
    env = {**os.environ, "ZMESH_RUN_DIR": str(isolated_run_dir)}
    env.pop("ZMESH_ADDRESS", None)
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=50, env=env, cwd=ROOT)
    assert result.returncode == 0, f"{path.name} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    expected = LAST_LINE.get(path.name)
    if expected is not None:
        assert result.stdout.strip().splitlines()[-1] == expected, result.stdout
