"""The node's task workers: reused, idle ones beyond the limit sent away, the leases of a gone caller reclaimed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import zmesh
from zmesh.testing import NodeProcess, wait_for


@zmesh.remote
def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


@pytest.fixture
def small_pool(isolated_run_dir: Path) -> Iterator[NodeProcess]:
    """A daemon with 4 CPUs that keeps one idle task worker and sends the others away after 0.5 s idle."""
    proc = NodeProcess(str(isolated_run_dir), "--num-cpus", "4", "--config", "task_workers_idle=1", "--config", "task_idle_s=0.5")
    zmesh.init(address="auto")
    yield proc
    zmesh.shutdown()
    assert proc.stop() == 0, getattr(proc, "output", "")


def tasks_status() -> dict[str, Any]:
    status: dict[str, Any] = zmesh.api._status()
    return status["tasks"]


@pytest.mark.timeout(60)
def test_workers_are_reused_and_idle_ones_beyond_the_limit_leave(small_pool: NodeProcess) -> None:
    first = set(zmesh.get([pid_after.remote(0.3) for _ in range(4)], timeout=30))
    assert len(first) == 4  # four CPUs: four workers at once
    # A later task runs in a worker already there: no process start per task.
    assert zmesh.get(pid_after.remote(0), timeout=30) in first
    wait_for(lambda: tasks_status()["granted"] == 0, 10, what="the leases to go back")
    wait_for(lambda: tasks_status()["workers"] == 1, 10, what="the idle workers beyond the one kept to exit")
    assert tasks_status()["idle_workers"] == 1
    alive = [pid for pid in first if os.path.exists(f"/proc/{pid}")]
    assert len(alive) <= 1


DRIVER = """
import os, time, zmesh
zmesh.init(address="auto")

@zmesh.remote
def forever():
    print(os.getpid(), flush=True)  # reaches this driver's console: the test reads it there
    time.sleep(600)

ref = forever.remote()
time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_the_leases_of_a_caller_that_dies_are_reclaimed_and_its_running_task_stopped(small_pool: NodeProcess, tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "(forever pid=N) N"
        worker = int(line.split()[-1])
        assert line.startswith(f"(forever pid={worker}) ")
        wait_for(lambda: tasks_status()["granted"] == 1, 10, what="the other driver's lease")
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    # Its worker was mid-task for a caller that is gone: killed, and its CPU free for others.
    wait_for(lambda: not os.path.exists(f"/proc/{worker}"), 10, what="the orphaned task's worker to be killed")
    wait_for(lambda: tasks_status()["granted"] == 0, 10, what="the dead caller's lease to end")
    assert zmesh.get(pid_after.remote(0), timeout=30) != worker
