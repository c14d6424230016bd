"""Fixtures: an isolated run directory per test, an embedded or daemon node, and a leak check."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import zmesh
from zmesh.testing import NodeProcess, wait_for, zmesh_processes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_run_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test gets its own run directory, so it never finds another test's node (or a user's)."""
    path = tmp_path_factory.mktemp("run")
    monkeypatch.setenv("ZMESH_RUN_DIR", str(path))
    # The per-user cluster key is made here, not in the real home directory.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
    for name in ("ZMESH_ADDRESS", "ZMESH_CLUSTER_KEY_FILE", "ZMESH_INSECURE"):
        monkeypatch.delenv(name, raising=False)
    yield path


@pytest.fixture(autouse=True)
def no_leaks(isolated_run_dir: Path) -> Iterator[None]:
    """Every test ends with zmesh shut down and no zmesh process it started still running."""
    yield
    if zmesh.is_initialized():
        zmesh.shutdown()
    run_dir = str(isolated_run_dir)
    try:
        wait_for(lambda: not zmesh_processes(run_dir), timeout=10, what="zmesh processes of this test to exit")
    except TimeoutError:
        leaked = zmesh_processes(run_dir)
        for proc in leaked:
            proc.kill()
        pytest.fail(f"leaked zmesh processes: {[(p.pid, p.cmdline()) for p in leaked]}")


@pytest.fixture
def local() -> Iterator[None]:
    """zmesh on an embedded local node."""
    zmesh.init(num_cpus=4)
    yield
    zmesh.shutdown()


@pytest.fixture
def node(isolated_run_dir: Path) -> Iterator[NodeProcess]:
    """A real `zmesh node` daemon, stopped (and checked to stop cleanly) after the test."""
    proc = NodeProcess(str(isolated_run_dir), "--num-cpus", "4")
    yield proc
    if zmesh.is_initialized():
        zmesh.shutdown()
    assert proc.stop() == 0, getattr(proc, "output", "")


@pytest.fixture
def driver(node: NodeProcess) -> Iterator[NodeProcess]:
    """This test process connected to the `node` daemon."""
    zmesh.init(address="auto")
    yield node
    zmesh.shutdown()


def run_driver(code: str, *, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a separate driver process and return its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
