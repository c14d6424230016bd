"""The mesh across hosts: nodes in network namespaces find each other over mDNS, call across, and outlive a partition.

Each namespace of a NetnsNetwork is one host with its own run directory, one
`zmesh node` listening on the host's address with the cluster key (so mDNS is
on, and no node is told any other's address), and one asker: a small process
in that namespace that puts admin requests to the node, since the test process
itself cannot reach the namespaces' addresses. Drivers run in the namespaces too.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from zmesh.testing import FAST_MESH, NodeProcess, wait_for
from zmesh.testing_netns import NetnsNetwork, netns_available
from zmesh.transport.security import ClusterKey

ROOT = Path(__file__).resolve().parents[2]
_why_not = netns_available()
# Network namespaces, their addresses and bridges are the host's: tests that make them run one at a time.
pytestmark = [
    pytest.mark.skipif(_why_not is not None, reason=f"network namespaces unavailable: {_why_not}"),
    pytest.mark.xdist_group("netns"),
]

# Reads "OP JSON-ARGS" lines, puts each to the node at argv[1], writes one JSON line per request.
ASKER = r"""
import json, sys
from zmesh.node.admin import request
from zmesh.transport.security import Security, resolve_key

address, security = sys.argv[1], Security(resolve_key(sys.argv[2])[0])
for line in sys.stdin:
    op, args = line.split(" ", 1)
    try:
        answer = {"value": request(address, op, tuple(json.loads(args)), security=security, timeout=2.0)}
    except Exception as exc:
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(answer), flush=True)
"""

# Drivers: argv is node address, key file, then their own arguments; each prints one JSON line.
PLACED = r"""
import json, os, sys, zmesh
from zmesh.util.scheduling_strategies import NodeAffinitySchedulingStrategy

zmesh.init(address=sys.argv[1], cluster_key=sys.argv[2])

@zmesh.remote
class Where:
    def where(self, note):
        return [note + " answered", os.readlink("/proc/self/ns/net")]

actor = Where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(sys.argv[3], soft=False)).remote()
print(json.dumps(zmesh.get(actor.where.remote("driver on host 0"), timeout=30)))
zmesh.shutdown()
"""

CREATE_NAMED = r"""
import json, sys, zmesh

zmesh.init(address=sys.argv[1], cluster_key=sys.argv[2])

@zmesh.remote
class Named:
    def __init__(self, tag):
        self.tag = tag

    def tag_and_host(self):
        import os
        return [self.tag, os.readlink("/proc/self/ns/net")]

actor = Named.options(name=sys.argv[3], lifetime="detached").remote(sys.argv[4])
print(json.dumps(zmesh.get(actor.tag_and_host.remote(), timeout=30)))
zmesh.shutdown()
"""

CALL_NAMED = r"""
import json, sys, zmesh

zmesh.init(address=sys.argv[1], cluster_key=sys.argv[2])
print(json.dumps(zmesh.get(zmesh.get_actor(sys.argv[3]).tag_and_host.remote(), timeout=30)))
zmesh.shutdown()
"""


class AskError(Exception):
    """The asker could not get an answer from its node."""


class Asker:
    """A process in host i's namespace that asks that host's node admin questions for the test."""

    def __init__(self, net: NetnsNetwork, i: int, address: str, key: Path) -> None:
        self.proc = net.popen(
            i,
            [sys.executable, "-c", ASKER, f"tcp://{address}", str(key)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )

    def ask(self, op: str, *args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{op} {json.dumps(list(args))}\n")
        self.proc.stdin.flush()
        # One request at a time, one line per answer, each within the request's own 2 s timeout.
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        if not ready:
            raise AssertionError(f"the asker did not answer {op!r} within 15 s")
        line = self.proc.stdout.readline()
        try:
            answer = json.loads(line)
        except ValueError:
            raise AssertionError(f"the asker failed: {line}{self.proc.stdout.read() if self.proc.poll() is not None else ''}") from None
        if "error" in answer:
            raise AskError(answer["error"])
        return answer["value"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Hosts:
    """``n`` namespaces, each with a zmesh node (found by mDNS only) and an asker; torn down by the ExitStack."""

    def __init__(self, stack: contextlib.ExitStack, tmp_path: Path, n: int = 3) -> None:
        self.net = stack.enter_context(NetnsNetwork(n))
        self.key = tmp_path / "cluster.key"
        ClusterKey.generate().save(self.key)
        self.run_dirs: list[Path] = []
        self.nodes: list[NodeProcess] = []
        self.askers: list[Asker] = []
        config = [arg for key, value in FAST_MESH.items() for arg in ("--config", f"{key}={value}")]
        for i in range(n):
            run_dir = tmp_path / f"run-h{i}"
            run_dir.mkdir()
            self.run_dirs.append(run_dir)
            node = NodeProcess(
                str(run_dir),
                *("--listen", self.net.addresses[i], "--cluster-key", str(self.key), "--num-cpus", "2", *config),
                prefix=self.net.exec_prefix(i),
            )
            stack.callback(node.stop)  # callbacks run last-in first-out: askers, then nodes, then the network
            self.nodes.append(node)
            assert node.address.startswith(f"{self.net.addresses[i]}:"), node.address
        for i, node in enumerate(self.nodes):
            asker = Asker(self.net, i, node.address, self.key)
            stack.callback(asker.close)
            self.askers.append(asker)

    def members(self, i: int) -> dict[str, str]:
        """Node i's view: address -> state (itself included); empty if it did not answer."""
        try:
            return {m["address"]: m["state"] for m in self.askers[i].ask("members")}
        except AskError:
            return {}

    def node_id(self, i: int) -> str:
        return str(self.askers[i].ask("members")[0]["node_id"])  # a node lists itself first

    def live_actors(self, i: int) -> list[dict[str, Any]]:
        return [a for a in self.askers[i].ask("list_actors", None) if a["state"] != "DEAD"]

    def sees(self, i: int, alive: list[int], dead: tuple[int, ...] = ()) -> bool:
        """Whether node i sees hosts ``alive`` ALIVE and hosts ``dead`` DEAD."""
        view = self.members(i)
        return all(view.get(self.tcp(j)) == "ALIVE" for j in alive) and all(view.get(self.tcp(j)) == "DEAD" for j in dead)

    def tcp(self, i: int) -> str:
        return f"tcp://{self.nodes[i].address}"

    def wait(self, predicate: Callable[[], object], timeout: float, what: str) -> None:
        """wait_for, and on a timeout show every node's log and view (the only trace of what happened in there)."""
        try:
            wait_for(predicate, timeout=timeout, interval=0.1, what=what)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.report()}") from None

    def report(self) -> str:
        parts = []
        for i, node in enumerate(self.nodes):
            try:
                view = str(self.members(i)) if node.proc.poll() is None else "exited"
            except AssertionError as exc:
                view = str(exc)
            parts.append(f"--- host {i} {node.address} members {view}\n{node.output_so_far()[-6000:]}")
        return "\n".join(parts)

    def driver(self, i: int, code: str, *args: str) -> Any:
        """Run a driver script on host i, connected to its node; returns the JSON it printed."""
        env = {**os.environ, "ZMESH_RUN_DIR": str(self.run_dirs[i])}
        argv = [sys.executable, "-c", code, self.nodes[i].address, str(self.key), *args]
        out = self.net.run(i, argv, timeout=60, env=env, cwd=ROOT)
        assert out.returncode == 0, f"driver on host {i} failed:\n{out.stdout}\n{out.stderr}\n{self.report()}"
        return json.loads(out.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        """Stop everything in the namespaces and prove nothing is left there (workers included)."""
        for asker in self.askers:
            asker.close()
        for i, node in enumerate(self.nodes):
            assert node.stop() == 0, f"node {i} did not exit cleanly:\n{node.output}"

        def nothing_left() -> bool:
            return not any(_pids(name) for name in self.net.names)

        wait_for(nothing_left, timeout=10, interval=0.1, what="every process in the namespaces to exit")


def _pids(namespace: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30)
    return out.stdout.split()


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.mark.timeout(120)
def test_nodes_find_each_other_by_mdns_and_call_across_hosts(stack: contextlib.ExitStack, tmp_path: Path) -> None:
    hosts = Hosts(stack, tmp_path)
    everyone = [0, 1, 2]
    hosts.wait(lambda: all(hosts.sees(i, everyone) for i in everyone), 20, "three nodes to find each other by mDNS")
    target = hosts.node_id(2)
    note, actor_netns = hosts.driver(0, PLACED, target)
    assert note == "driver on host 0 answered"
    # The actor ran in host 2's namespace: the call crossed from host 0 over TCP with CURVE.
    assert actor_netns == netns_of(hosts.nodes[2].pid) != netns_of(hosts.nodes[0].pid)
    hosts.stop()


@pytest.mark.timeout(150)
def test_a_partition_heals_and_the_short_side_stops_what_the_mesh_buried(stack: contextlib.ExitStack, tmp_path: Path) -> None:
    """Host 0 is cut from hosts 1 and 2, which declare it dead; its actors die for them (issue 14, 6).

    Both sides bury the other, but host 0's declarations weigh 1 and the other side's 2: when the
    partition heals, host 0 learns the mesh buried it and stops what it hosted then (as Ray makes a
    node it declared dead exit). An actor the mesh declared dead never answers again, and each name
    ends with the one holder the larger side knows.
    """
    hosts = Hosts(stack, tmp_path)
    net = hosts.net
    hosts.wait(lambda: all(hosts.sees(i, [0, 1, 2]) for i in range(3)), 20, "three nodes to find each other by mDNS")
    ns = [netns_of(node.pid) for node in hosts.nodes]
    assert hosts.driver(0, CREATE_NAMED, "before", "before") == ["before", ns[0]]

    net.cut_between([0], [1, 2])
    hosts.wait(
        lambda: hosts.sees(0, [0], dead=(1, 2)) and all(hosts.sees(i, [1, 2], dead=(0,)) for i in (1, 2)),
        20,
        "both sides of the partition to declare the other dead",
    )
    # Each side has a home for the name, so both creations succeed.
    assert hosts.driver(0, CREATE_NAMED, "during", "side 0") == ["side 0", ns[0]]
    assert hosts.driver(1, CREATE_NAMED, "during", "side 1") == ["side 1", ns[1]]

    net.heal_all()
    hosts.wait(lambda: all(hosts.sees(i, [0, 1, 2]) for i in range(3)), 30, "the three nodes alive to each other again")

    def named(i: int) -> dict[str | None, list[dict[str, Any]]]:
        by_name: dict[str | None, list[dict[str, Any]]] = {}
        for actor in hosts.live_actors(i):
            by_name.setdefault(actor["name"], []).append(actor)
        return by_name

    def reconciled() -> bool:
        for i in range(3):
            try:
                by_name = named(i)
            except AskError:
                return False
            if [a["node_id"] for a in by_name.get("during", ())] != [hosts.node_id(1)] or "before" in by_name:
                return False
            if [a for a in by_name.get(None, ()) if a["class_name"].endswith("Named")]:
                return False
        return True

    try:
        wait_for(reconciled, 20, interval=0.2, what="every node to list only the larger side's 'during', and no 'before'")
    except TimeoutError:
        listed = {i: [(a["name"], a["node_id"], a["state"]) for a in hosts.live_actors(i)] for i in range(3)}
        pytest.fail(f"after the heal, the nodes list {listed} (node ids {[hosts.node_id(i) for i in range(3)]})\n{hosts.report()}")
    for i in range(3):
        assert hosts.driver(i, CALL_NAMED, "during") == ["side 1", ns[1]]

    # The buried "before" is dead everywhere: its name is free again within a bound (its release reaches the
    # name's home when the members meet again, or the home frees the claim gossip stopped showing).
    def created_again() -> Any:
        try:
            return hosts.driver(2, CREATE_NAMED, "before", "again")
        except AssertionError as exc:
            if "already exists" in str(exc):
                return None
            raise

    assert wait_for(created_again, 20, interval=0.5, what="the buried actor's name free again") == ["again", ns[2]]
    hosts.stop()
