"""`zmesh status` and `zmesh list actors` agree on which actors are detached, on every node of a mesh."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

import zmesh
from zmesh.testing import LocalCluster, wait_for
from zmesh.util.scheduling_strategies import NodeAffinitySchedulingStrategy

pytestmark = pytest.mark.timeout(120)


@zmesh.remote
class Held:
    def ping(self) -> str:
        return "pong"


def _cli(cluster: LocalCluster, i: int, *args: str) -> Any:
    command = [sys.executable, "-m", "zmesh", *args, "--json", "--address", cluster.addresses[i]]
    out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_an_actor_owned_by_another_nodes_driver_is_not_detached_in_status_or_list() -> None:
    with LocalCluster(nodes=2, num_cpus=2) as cluster:
        cluster.connect(0)
        on_1 = NodeAffinitySchedulingStrategy(cluster.node_id(1), soft=False)
        owned = Held.options(name="owned", scheduling_strategy=on_1).remote()
        kept = Held.options(name="kept", lifetime="detached", scheduling_strategy=on_1).remote()
        assert zmesh.get([owned.ping.remote(), kept.ping.remote()], timeout=30) == ["pong", "pong"]
        expected = {"owned": False, "kept": True}

        def listed() -> dict[str, bool] | None:
            rows = {a["name"]: a["detached"] for a in _cli(cluster, 0, "list", "actors") if a["state"] == "ALIVE"}
            return rows if rows.keys() == expected.keys() else None

        assert wait_for(listed, 15, interval=0.1, what="both actors listed") == expected
        # The host (node 1) holds records placed from node 0; the driver's node holds the ones it placed.
        for i in (1, 0):
            status = _cli(cluster, i, "status")
            assert {a["name"]: a["detached"] for a in status["actors"]} == expected, (i, status["actors"])
        text = subprocess.run(
            [sys.executable, "-m", "zmesh", "status", "--address", cluster.addresses[1]], capture_output=True, text=True, timeout=30
        ).stdout
        assert "kept (detached)" in text and "owned (detached)" not in text and "owned" in text
