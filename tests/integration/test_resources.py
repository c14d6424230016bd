"""Resources on a real `zmesh node` daemon: CPUs, GPUs and custom resources; waiting creations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, node_with_driver

import zmesh
from zmesh.testing import NodeProcess, wait_for


@zmesh.remote
class Plain:
    def pid(self) -> int:
        return os.getpid()


@zmesh.remote
class Holder:
    def ping(self) -> str:
        return "pong"

    def gpus(self) -> tuple[str | None, list[int]]:
        return os.environ.get("CUDA_VISIBLE_DEVICES"), zmesh.get_gpu_ids()


@pytest.fixture
def one_cpu_node(isolated_run_dir: Path) -> Iterator[NodeProcess]:
    yield from node_with_driver(isolated_run_dir, "--num-cpus", "1")


@pytest.fixture
def rich_node(isolated_run_dir: Path) -> Iterator[NodeProcess]:
    """A node with 2 CPUs, 2 GPUs and one unit of a custom resource; this process is its driver."""
    yield from node_with_driver(isolated_run_dir, "--num-cpus", "2", "--num-gpus", "2", "--resources", '{"special": 1}')


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zmesh", *args], capture_output=True, text=True, timeout=30, cwd=ROOT)


def _status() -> dict[str, Any]:
    result = _cli("status", "--json")
    assert result.returncode == 0, result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def _not_ready(ref: Any) -> bool:
    ready, not_ready = zmesh.wait([ref], timeout=0.5)
    return not ready and not_ready == [ref]


def _waiting_names(status: dict[str, Any]) -> list[str]:
    return [w["name"] for w in status["waiting"]]


def test_default_actors_need_no_cpu(one_cpu_node: NodeProcess) -> None:
    actors = [Plain.remote() for _ in range(6)]
    pids = zmesh.get([a.pid.remote() for a in actors], timeout=30)
    assert len(set(pids)) == 6
    status = _status()
    assert status["waiting"] == []
    assert status["resources_available"]["CPU"] == status["resources_total"]["CPU"] == 1


def test_actor_that_does_not_fit_waits_for_cpus(rich_node: NodeProcess) -> None:
    first = Holder.options(name="cpu-a", num_cpus=1).remote()
    second = Holder.options(name="cpu-b", num_cpus=1).remote()
    assert zmesh.get([first.ping.remote(), second.ping.remote()], timeout=20) == ["pong", "pong"]
    third = Holder.options(name="cpu-c", num_cpus=1).remote()
    ref = third.ping.remote()
    assert _not_ready(ref)

    status = _status()
    assert _waiting_names(status) == ["cpu-c"]
    assert status["resources_available"]["CPU"] == 0
    assert status["resources_total"]["CPU"] == 2
    by_name = {a["name"]: a for a in status["actors"]}
    assert by_name["cpu-a"]["state"] == "ALIVE"
    assert by_name["cpu-c"]["pid"] is None

    text = _cli("status")
    assert text.returncode == 0, text.stderr
    waiting_section = text.stdout.split("waiting creations (1):", 1)
    assert len(waiting_section) == 2, text.stdout
    assert "Holder" in waiting_section[1]
    assert "CPU" in waiting_section[1]

    zmesh.kill(first)
    assert zmesh.get(ref, timeout=20) == "pong"
    assert _status()["waiting"] == []


def test_custom_resource_limits_actors(rich_node: NodeProcess) -> None:
    first = Holder.options(name="special-a", resources={"special": 1}).remote()
    assert zmesh.get(first.ping.remote(), timeout=20) == "pong"
    second = Holder.options(name="special-b", resources={"special": 1}).remote()
    ref = second.ping.remote()
    assert _not_ready(ref)
    status = _status()
    assert _waiting_names(status) == ["special-b"]
    assert status["resources_total"]["special"] == 1
    assert status["resources_available"]["special"] == 0
    zmesh.kill(first)
    assert zmesh.get(ref, timeout=20) == "pong"


def test_gpu_actors_see_their_own_device(rich_node: NodeProcess) -> None:
    a = Holder.options(name="gpu-a", num_gpus=1).remote()
    b = Holder.options(name="gpu-b", num_gpus=1).remote()
    (visible_a, ids_a), (visible_b, ids_b) = zmesh.get([a.gpus.remote(), b.gpus.remote()], timeout=20)
    assert {visible_a, visible_b} == {"0", "1"}
    assert ids_a == [int(visible_a)]
    assert ids_b == [int(visible_b)]

    c = Holder.options(name="gpu-c", num_gpus=1).remote()
    ref = c.gpus.remote()
    assert _not_ready(ref)
    status = _status()
    assert _waiting_names(status) == ["gpu-c"]
    assert status["resources_total"]["GPU"] == 2
    assert status["resources_available"]["GPU"] == 0

    text = _cli("status")
    assert text.returncode == 0, text.stderr
    gpu_lines = [line.split() for line in text.stdout.splitlines() if line.strip().startswith("GPU")]
    assert gpu_lines == [["GPU", "2", "/", "2"]], text.stdout
    cpu_lines = [line.split() for line in text.stdout.splitlines() if line.strip().startswith("CPU")]
    assert cpu_lines == [["CPU", "0", "/", "2"]], text.stdout

    zmesh.kill(a)
    visible_c, ids_c = zmesh.get(ref, timeout=20)
    assert visible_c == visible_a
    assert ids_c == ids_a
    wait_for(lambda: _status()["resources_available"]["GPU"] == 0, timeout=10, what="GPU use to be 2 of 2 again")
