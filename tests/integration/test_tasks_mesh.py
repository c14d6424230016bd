"""Remote functions (tasks) over a mesh of three real `zmesh node` daemons: spillback, placement, node loss, two drivers.

As in test_tasks.py, parallelism is counted from the (start, end) each task reports on the host's
monotonic clock, never inferred from how long a batch took.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from test_tasks import gated, max_overlap

import zmesh
from zmesh.testing import LocalCluster, wait_for
from zmesh.util.scheduling_strategies import NodeAffinitySchedulingStrategy

pytestmark = pytest.mark.timeout(90)

GATE_S = 30.0


@zmesh.remote
def nap(seconds: float) -> tuple[float, float, str]:
    start = time.monotonic()
    time.sleep(seconds)
    return start, time.monotonic(), zmesh.get_runtime_context().get_node_id()


@zmesh.remote
def where() -> str:
    return zmesh.get_runtime_context().get_node_id()


@zmesh.remote
def where_with_peers(folder: str, peers: int) -> str:
    """Runs until ``peers`` tasks run at once (or a deadline): each needs a lease of its own."""
    mark = Path(folder) / f"{os.getpid()}-{time.monotonic()}"
    mark.touch()
    deadline = time.monotonic() + 10.0
    while len(os.listdir(folder)) < peers and time.monotonic() < deadline:
        time.sleep(0.005)
    return zmesh.get_runtime_context().get_node_id()


@zmesh.remote
def stuck_the_first_time(marker: str) -> str:
    """The first run says where it runs (in ``marker``) and waits to be killed with its node; a retry returns at once."""
    node = zmesh.get_runtime_context().get_node_id()
    if not os.path.exists(marker):
        Path(marker + ".tmp").write_text(node)
        os.rename(marker + ".tmp", marker)
        deadline = time.monotonic() + GATE_S
        while time.monotonic() < deadline:
            time.sleep(0.01)
        raise TimeoutError("the node was never killed")
    return node


def _on(cluster: LocalCluster, i: int, soft: bool = False) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(cluster.node_id(i), soft=soft)


def test_spillback_uses_every_member() -> None:
    with LocalCluster(nodes=3, num_cpus=2) as cluster:
        cluster.connect(0)
        ids = {cluster.node_id(i) for i in range(3)}
        results = zmesh.get([nap.remote(0.5) for _ in range(60)], timeout=60)
        assert {node for _, _, node in results} == ids
        # Six CPUs in the mesh: six tasks at once, never more.
        assert max_overlap([(start, end) for start, end, _ in results]) == 6
        # Every member's CPUs are free again, in this node's view too (members publish what their leases free).
        wait_for(lambda: zmesh.available_resources().get("CPU") == 6, 5, what="the view to show every CPU free")


def test_affinity_and_spread_put_tasks_where_asked(tmp_path: Path) -> None:
    with LocalCluster(nodes=3, num_cpus=2) as cluster:
        cluster.connect(0)
        ids = [cluster.node_id(i) for i in range(3)]
        hard = [where.options(scheduling_strategy=_on(cluster, i)).remote() for i in range(3)]
        soft = [where.options(scheduling_strategy=_on(cluster, i, soft=True)).remote() for i in range(3)]
        assert zmesh.get(hard, timeout=30) == ids
        assert zmesh.get(soft, timeout=30) == ids
        # Soft affinity to a member with no room now runs the task elsewhere instead of waiting; hard affinity waits.
        gate, started = tmp_path / "gate", [tmp_path / f"started-{i}" for i in range(2)]
        busy = [gated.options(scheduling_strategy=_on(cluster, 1)).remote(str(gate), str(s)) for s in started]
        wait_for(lambda: all(s.exists() for s in started), 30, what="two tasks to fill node 1")
        assert zmesh.get(where.options(scheduling_strategy=_on(cluster, 1, soft=True)).remote(), timeout=30) != ids[1]
        waits = where.options(scheduling_strategy=_on(cluster, 1)).remote()
        assert zmesh.wait([waits], timeout=0.5) == ([], [waits])
        gate.touch()
        assert zmesh.get(waits, timeout=30) == ids[1]
        zmesh.get(busy, timeout=30)
        spread_dir = tmp_path / "spread"
        spread_dir.mkdir()
        wait_for(lambda: zmesh.available_resources().get("CPU") == 6, 5, what="the view to show every CPU free")
        # Three SPREAD tasks running at once land on three members (DEFAULT would keep two of them here).
        spread = where_with_peers.options(scheduling_strategy="SPREAD")
        assert sorted(zmesh.get([spread.remote(str(spread_dir), 3) for _ in range(3)], timeout=30)) == sorted(ids)


def test_a_task_whose_node_dies_mid_run_runs_again_elsewhere(tmp_path: Path) -> None:
    # Only nodes 1 and 2 have "spot": the task runs away from this driver's node, and its retry can too.
    with LocalCluster(nodes=3, num_cpus=2, resources=[{}, {"spot": 1}, {"spot": 1}]) as cluster:
        cluster.connect(0)
        ids = [cluster.node_id(i) for i in range(3)]
        marker = tmp_path / "first-run"
        ref = stuck_the_first_time.options(resources={"spot": 1}).remote(str(marker))
        wait_for(marker.exists, 30, what="the task to start")
        doomed = ids.index(marker.read_text())
        assert doomed in (1, 2)
        cluster.kill_node(doomed)
        assert zmesh.get(ref, timeout=40) == ids[3 - doomed]


DRIVER = """
import os, sys, time
from pathlib import Path
import zmesh

@zmesh.remote
def square(x):
    return x * x

zmesh.init(address={address!r})
Path({ready!r}).touch()
deadline = time.monotonic() + 30
while not os.path.exists({gate!r}) and time.monotonic() < deadline:
    time.sleep(0.001)
print(sum(zmesh.get([square.remote(i) for i in range(300)], timeout=40)))
zmesh.shutdown()
"""


def test_drivers_on_two_nodes_submitting_at_once_both_finish(tmp_path: Path) -> None:
    with LocalCluster(nodes=3, num_cpus=2) as cluster:
        gate, ready = tmp_path / "go", tmp_path / "ready"
        code = DRIVER.format(address=cluster.addresses[1], gate=str(gate), ready=str(ready))
        other = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            cluster.connect(0)
            wait_for(ready.exists, 30, what="the other driver to connect to node 1")
            gate.touch()
            mine = zmesh.get([nap.remote(0.0) for _ in range(300)], timeout=40)
            out, err = other.communicate(timeout=60)
        finally:
            if other.poll() is None:
                other.kill()
                other.communicate()
        assert len(mine) == 300
        assert other.returncode == 0, err
        assert int(out.strip()) == sum(i * i for i in range(300))
