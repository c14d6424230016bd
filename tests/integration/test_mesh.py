"""The mesh through real node processes: discovery, placement, names, calls across nodes, node failures."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import zmesh
from zmesh.exceptions import ActorDiedError, ActorUnavailableError
from zmesh.testing import FAST_MESH, LocalCluster, NodeProcess, wait_for
from zmesh.util.scheduling_strategies import NodeAffinitySchedulingStrategy

pytestmark = pytest.mark.timeout(120)


@zmesh.remote
class Where:
    def __init__(self, value: int = 0) -> None:
        self.value = value

    def node(self) -> str:
        return zmesh.get_runtime_context().get_node_id()

    def add(self, n: int) -> int:
        self.value += n
        return self.value

    def echo(self, x: object) -> object:
        return x

    def fetch(self, refs: list[zmesh.ObjectRef]) -> list[object]:
        return zmesh.get(refs, timeout=30)

    def call(self, handle: zmesh.ActorHandle, n: int) -> int:
        return zmesh.get(handle.add.remote(n), timeout=30)


def _on(cluster: LocalCluster, i: int) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(cluster.node_id(i), soft=False)


def _alive_everywhere(cluster: LocalCluster, indexes: list[int]) -> bool:
    return cluster.converged(indexes)


def test_three_nodes_find_each_other_through_the_run_directory() -> None:
    with LocalCluster(nodes=3, num_cpus=1) as cluster:
        for i in range(3):
            members = cluster.members(i)
            assert sorted(m["state"] for m in members) == ["ALIVE"] * 3
        cluster.connect()
        nodes = zmesh.nodes()
        assert len(nodes) == 3 and all(n["Alive"] for n in nodes)
        assert {n["NodeID"] for n in nodes} == {cluster.node_id(i) for i in range(3)}
        assert all(n["Resources"].get("CPU") == 1 for n in nodes)
        wait_for(lambda: zmesh.cluster_resources().get("CPU") == 3, 10, what="gossip of every node's resources")
        assert zmesh.available_resources()["CPU"] == 3


def test_five_nodes_spread_actors_list_every_name_and_go_on_without_a_killed_member() -> None:
    with LocalCluster(nodes=5, num_cpus=1) as cluster:
        cluster.connect(0)
        ids = [cluster.node_id(i) for i in range(5)]
        actors = [Where.options(name=f"five-{i}", scheduling_strategy="SPREAD").remote(i) for i in range(5)]
        hosts = zmesh.get([a.node.remote() for a in actors], timeout=30)
        assert sorted(hosts) == sorted(ids)  # one on each member

        def every_node_lists_every_name() -> bool:
            for i in range(5):
                names = {a["name"] for a in cluster._ask(i, "list_actors", None)}
                if not {f"five-{k}" for k in range(5)} <= names:
                    return False
            return True

        wait_for(every_node_lists_every_name, 10, interval=0.1, what="every name on every node")
        doomed = hosts.index(ids[4])
        cluster.kill_node(4)
        with pytest.raises(ActorDiedError):
            zmesh.get(actors[doomed].add.remote(1), timeout=30)

        def four_see_it_dead() -> bool:
            return all({m["node_id"]: m["state"] for m in cluster.members(i)}[ids[4]] == "DEAD" for i in range(4))

        wait_for(four_see_it_dead, 15, interval=0.1, what="node 4 dead on the four others")
        assert sorted(zmesh.get([zmesh.get_actor(f"five-{k}").add.remote(10) for k in range(5) if k != doomed], timeout=30)) == sorted(
            k + 10 for k in range(5) if k != doomed
        )


def test_join_seeds_learn_the_whole_mesh(isolated_run_dir: Path, tmp_path: Path) -> None:
    """Three nodes with separate run directories: the second joins the first, the third joins the second."""
    config = [arg for k, v in FAST_MESH.items() for arg in ("--config", f"{k}={v}")]
    first = NodeProcess(str(tmp_path / "a"), *config)
    nodes = [first]
    try:
        nodes.append(NodeProcess(str(tmp_path / "b"), "--join", first.address, *config))
        nodes.append(NodeProcess(str(tmp_path / "c"), "--join", nodes[1].address, *config))
        from zmesh.node.admin import request
        from zmesh.transport.security import Security, resolve_key

        security = Security(resolve_key(None)[0])

        def everyone_sees_three() -> bool:
            for node in nodes:
                members = request(f"tcp://{node.address}", "members", security=security)
                if sorted(m["state"] for m in members) != ["ALIVE"] * 3:
                    return False
            return True

        wait_for(everyone_sees_three, 20, interval=0.1, what="three nodes joined through seeds")
    finally:
        for node in nodes:
            node.stop()


def test_actors_on_other_nodes_are_used_like_local_ones() -> None:
    with LocalCluster(nodes=3, num_cpus=2) as cluster:
        cluster.connect()
        here = cluster.node_id(0)
        actors = [Where.options(scheduling_strategy=_on(cluster, i)).remote(i) for i in range(3)]
        assert zmesh.get([a.node.remote() for a in actors], timeout=30) == [cluster.node_id(i) for i in range(3)]
        assert zmesh.get(actors[2].add.remote(5), timeout=30) == 7
        # Calls from one caller to one remote actor keep their order.
        refs = [actors[1].add.remote(1) for _ in range(200)]
        assert zmesh.get(refs, timeout=30) == list(range(2, 202))
        # A ref owned by this driver (node 0), fetched by an actor on node 2; a big one too.
        small, big = zmesh.put("x" * 10), zmesh.put(b"y" * (3 * 2**20))
        assert zmesh.get(actors[2].fetch.remote([small, big]), timeout=30) == ["x" * 10, b"y" * (3 * 2**20)]
        # A handle passed to an actor on another node, which calls a third node's actor.
        assert zmesh.get(actors[1].call.remote(actors[2], 10), timeout=30) == 17
        assert zmesh.get_runtime_context().get_node_id() == here


def test_named_actor_is_found_from_every_node(tmp_path: Path) -> None:
    with LocalCluster(nodes=3, num_cpus=2) as cluster:
        cluster.connect()
        counter = Where.options(name="shared", lifetime="detached", scheduling_strategy=_on(cluster, 2)).remote(100)
        assert zmesh.get(counter.add.remote(1), timeout=30) == 101
        script = "import sys, zmesh\nzmesh.init(address=sys.argv[1])\na = zmesh.get_actor('shared')\nprint(zmesh.get(a.add.remote(1)))\n"
        for i in (0, 1, 2):
            out = subprocess.run(
                [sys.executable, "-c", script, cluster.addresses[i]], capture_output=True, text=True, timeout=60, env=os.environ
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == str(102 + i)
        zmesh.kill(counter)


def test_placement_follows_resources_and_warns_when_nothing_fits() -> None:
    with LocalCluster(nodes=3, num_cpus=1, resources=[{}, {"special": 1}, {}]) as cluster:
        cluster.connect()
        special = Where.options(resources={"special": 1}).remote()
        assert zmesh.get(special.node.remote(), timeout=30) == cluster.node_id(1)
        # Too large for every node: it waits (in the status of the node that took it) and warns once.
        huge = Where.options(num_cpus=64).remote()
        wait_for(lambda: len(cluster.status(0)["waiting"]) == 1, 10, what="the huge actor waiting")
        wait_for(lambda: "no member has that much" in cluster.nodes[0].output_so_far(), 10, what="the warning")
        with pytest.raises(zmesh.exceptions.GetTimeoutError):
            zmesh.get(huge.node.remote(), timeout=0.5)
        zmesh.kill(huge)


def test_spread_puts_actors_on_every_node() -> None:
    with LocalCluster(nodes=3, num_cpus=4) as cluster:
        cluster.connect()
        actors = [Where.options(scheduling_strategy="SPREAD").remote() for _ in range(6)]
        where = zmesh.get([a.node.remote() for a in actors], timeout=60)
        assert sorted(where.count(cluster.node_id(i)) for i in range(3)) == [2, 2, 2]


def test_default_placement_goes_elsewhere_when_this_node_is_full() -> None:
    with LocalCluster(nodes=2, num_cpus=1) as cluster:
        cluster.connect()
        first = Where.options(num_cpus=1).remote()
        second = Where.options(num_cpus=1).remote()
        assert sorted(zmesh.get([first.node.remote(), second.node.remote()], timeout=30)) == sorted(
            [cluster.node_id(0), cluster.node_id(1)]
        )


RACER = """
import sys, time, zmesh
zmesh.init(address=sys.argv[1])
start, rounds = float(sys.argv[2]), int(sys.argv[3])

@zmesh.remote
class Named:
    def ping(self):
        return "pong"

for i in range(rounds):
    while time.time() < start + i * 0.3:
        time.sleep(0.001)
    try:
        a = Named.options(name=f"racer-{i}", lifetime="detached").remote()
        zmesh.get(a.ping.remote())
        print("won", i, flush=True)
    except zmesh.exceptions.ActorAlreadyExistsError:
        print("lost", i, flush=True)
"""


def test_one_name_created_at_once_on_two_nodes_has_exactly_one_winner(tmp_path: Path) -> None:
    rounds = 20
    with LocalCluster(nodes=3, num_cpus=4) as cluster:
        script = tmp_path / "racer.py"
        script.write_text(RACER)
        start = time.time() + 4
        args = [str(start), str(rounds)]
        procs = [
            subprocess.Popen([sys.executable, str(script), cluster.addresses[i], *args], stdout=subprocess.PIPE, text=True) for i in (0, 1)
        ]
        outs = [p.communicate(timeout=100)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        results: dict[int, list[str]] = {}
        for out in outs:
            for line in out.splitlines():
                verdict, i = line.split()
                results.setdefault(int(i), []).append(verdict)
        assert sorted(results) == list(range(rounds))
        for i, verdicts in results.items():
            assert sorted(verdicts) == ["lost", "won"], (i, verdicts)
        listed = cluster._ask(2, "list_actors", None)
        names = [a["name"] for a in listed if a["name"] and a["name"].startswith("racer-")]
        assert sorted(names) == sorted(f"racer-{i}" for i in range(rounds))


def test_a_killed_node_fails_calls_and_restartable_actors_come_back_elsewhere() -> None:
    with LocalCluster(nodes=3, num_cpus=2) as cluster:
        cluster.connect()
        events: list[dict[str, str]] = []
        zmesh.on_membership(events.append)
        doomed = cluster.node_id(2)
        plain = Where.options(scheduling_strategy=_on(cluster, 2)).remote()
        # Soft affinity: as in Ray, a hard one to a dead node could never be satisfied again.
        soft = NodeAffinitySchedulingStrategy(doomed, soft=True)
        keeper = Where.options(name="phoenix", lifetime="detached", max_restarts=1, scheduling_strategy=soft).remote(7)
        assert zmesh.get([plain.node.remote(), keeper.node.remote()], timeout=30) == [doomed, doomed]
        killed_at = time.monotonic()
        cluster.kill_node(2)
        with pytest.raises(ActorDiedError):
            zmesh.get(plain.add.remote(1), timeout=30)
        wait_for(lambda: any(e["node_id"] == doomed and e["state"] == "DEAD" for e in events), 15, what="the DEAD event")
        detected = time.monotonic() - killed_at

        def answers_elsewhere() -> str | None:
            try:
                return str(zmesh.get(zmesh.get_actor("phoenix").node.remote(), timeout=5))
            except (ActorUnavailableError, ActorDiedError, ValueError, zmesh.exceptions.GetTimeoutError):
                return None

        node = wait_for(answers_elsewhere, 30, interval=0.1, what="the restarted actor")
        assert node in (cluster.node_id(0), cluster.node_id(1))
        assert zmesh.get(keeper.add.remote(1), timeout=30) == 8  # __init__ ran again with its arguments
        assert detected < 15
        for i in (0, 1):
            assert {m["node_id"]: m["state"] for m in cluster.members(i)}[doomed] == "DEAD"


def test_a_restartable_actor_killed_while_being_placed_is_restarted_not_buried() -> None:
    """As in Ray, kill(no_restart=False) of an actor not started yet reschedules it (the torture test found a burial)."""
    with LocalCluster(nodes=2, num_cpus=2) as cluster:
        cluster.connect(0)
        for value in range(5):
            # The kill is asynchronous, as Ray's: a call may reach the worker just before it dies, and fails then
            # unless retried (ActorUnavailableError). Retried, it must reach the restarted actor, never a burial.
            actor = Where.options(max_restarts=-1, max_task_retries=-1, scheduling_strategy=_on(cluster, 1)).remote(value)
            zmesh.kill(actor, no_restart=False)  # at once: the creation is usually still on its way to node 1
            assert zmesh.get(actor.add.remote(1), timeout=30) == value + 1
            zmesh.kill(actor)


def test_a_frozen_node_is_declared_dead_and_a_stopped_one_leaves_at_once() -> None:
    with LocalCluster(nodes=3, num_cpus=1) as cluster:
        frozen, stopped = cluster.node_id(1), cluster.node_id(2)
        cluster.freeze_node(1)
        wait_for(lambda: {m["node_id"]: m["state"] for m in cluster.members(0)}[frozen] == "DEAD", 15, what="the frozen node dead")
        cluster.thaw_node(1)
        cluster.stop_node(2)
        state = {m["node_id"]: m["state"] for m in cluster.members(0)}
        wait_for(lambda: {m["node_id"]: m["state"] for m in cluster.members(0)}[stopped] == "LEFT", 2, what="the goodbye")
        del state


def test_drain_moves_restartable_actors_then_the_node_leaves() -> None:
    with LocalCluster(nodes=3, num_cpus=2) as cluster:
        cluster.connect()
        soft = NodeAffinitySchedulingStrategy(cluster.node_id(1), soft=True)
        moving = Where.options(name="mover", lifetime="detached", max_restarts=-1, scheduling_strategy=soft).remote(1)
        assert zmesh.get(moving.node.remote(), timeout=30) == cluster.node_id(1)
        out = subprocess.run(
            [sys.executable, "-m", "zmesh", "drain", cluster.node_id(1), "--address", cluster.addresses[0]],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        wait_for(lambda: cluster.nodes[1].proc.poll() is not None, 30, what="the drained node to exit")

        def answers() -> str | None:
            try:
                return str(zmesh.get(zmesh.get_actor("mover").node.remote(), timeout=5))
            except (ActorUnavailableError, ActorDiedError, ValueError, zmesh.exceptions.GetTimeoutError):
                return None

        assert wait_for(answers, 30, interval=0.1, what="the moved actor") in (cluster.node_id(0), cluster.node_id(2))


def test_cli_status_list_and_kill_see_the_whole_mesh() -> None:
    with LocalCluster(nodes=2, num_cpus=1) as cluster:
        cluster.connect()
        a = Where.options(name="listed", lifetime="detached", scheduling_strategy=_on(cluster, 1)).remote()
        zmesh.get(a.node.remote(), timeout=30)

        def cli(*args: str) -> str:
            command = [sys.executable, "-m", "zmesh", *args, "--address", cluster.addresses[0]]
            out = subprocess.run(command, capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            return out.stdout

        status = cli("status")
        assert cluster.node_id(0) in status and cluster.node_id(1) in status and "members (2)" in status
        wait_for(lambda: "listed" in cli("list", "actors"), 10, what="the actor listed")
        cli("kill", "listed")
        with pytest.raises(ActorDiedError):
            zmesh.get(a.node.remote(), timeout=30)


def test_a_node_declared_dead_while_frozen_rejoins_and_keeps_no_second_copy() -> None:
    with LocalCluster(nodes=3, num_cpus=2) as cluster:
        cluster.connect()
        frozen = cluster.node_id(1)
        soft = NodeAffinitySchedulingStrategy(frozen, soft=True)
        actor = Where.options(name="only-one", lifetime="detached", max_restarts=-1, scheduling_strategy=soft).remote(1)
        assert zmesh.get(actor.node.remote(), timeout=30) == frozen
        cluster.freeze_node(1)
        wait_for(lambda: {m["node_id"]: m["state"] for m in cluster.members(0)}[frozen] == "DEAD", 15, what="the frozen node dead")

        def answers() -> str | None:
            try:
                return str(zmesh.get(actor.node.remote(), timeout=5))
            except (ActorUnavailableError, ActorDiedError, zmesh.exceptions.GetTimeoutError):
                return None

        moved_to = wait_for(answers, 30, interval=0.1, what="the actor re-created elsewhere")
        assert moved_to != frozen
        cluster.thaw_node(1)
        # It learns it was buried, comes back at a higher incarnation, and stops its stale copy.
        cluster.wait_converged(30)

        def one_copy() -> bool:
            listed = [a for i in range(3) for a in cluster._ask(i, "list_actors", None) if a["name"] == "only-one"]
            return {a["node_id"] for a in listed} == {moved_to}

        wait_for(one_copy, 15, interval=0.1, what="a single live copy of the actor")
        assert not [a for a in cluster.status(1)["actors"] if a["name"] == "only-one" and a["node_id"] == frozen]
        assert zmesh.get(actor.add.remote(1), timeout=30) == 2  # the re-created one (its __init__ ran again with 1)


OWNER = """
import sys, time, zmesh
from zmesh.util.scheduling_strategies import NodeAffinitySchedulingStrategy
zmesh.init(address=sys.argv[1])

@zmesh.remote
class Owned:
    def ping(self):
        return "pong"

a = Owned.options(scheduling_strategy=NodeAffinitySchedulingStrategy(sys.argv[2], soft=False)).remote()
assert zmesh.get(a.ping.remote()) == "pong"
print(a._zmesh_actor_id, flush=True)
sys.stdin.readline()
"""


def test_actors_of_a_driver_whose_node_died_are_cleaned_up(tmp_path: Path) -> None:
    with LocalCluster(nodes=3, num_cpus=2) as cluster:
        host = cluster.node_id(2)
        driver = subprocess.Popen(
            [sys.executable, "-c", OWNER, cluster.addresses[1], host], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert driver.stdout is not None
            actor_id = driver.stdout.readline().strip()
            assert any(a["actor_id"] == actor_id for a in cluster.status(2)["actors"])
            cluster.kill_node(1)

            def buried() -> bool:
                dead = {a["actor_id"]: a["error"] for a in cluster.status(2)["dead_actors"]}
                return actor_id in dead and "owner's node" in str(dead[actor_id])

            wait_for(buried, 15, interval=0.1, what="the orphaned actor to be killed")
        finally:
            driver.communicate(timeout=20)  # end of input: it exits on its own and removes its socket files


def test_a_creation_waits_for_room_and_starts_where_room_appears() -> None:
    with LocalCluster(nodes=2, num_cpus=1) as cluster:
        cluster.connect()
        first, second = (Where.options(num_cpus=1).remote() for _ in range(2))
        zmesh.get([first.node.remote(), second.node.remote()], timeout=30)
        third = Where.options(num_cpus=1).remote()
        wait_for(lambda: len(cluster.status(0)["waiting"]) == 1, 10, what="the third creation waiting")
        assert [m["pending"] for m in cluster.members(1) if m["node_id"] == cluster.node_id(0)] in ([1], [0])
        where_second = zmesh.get(second.node.remote(), timeout=30)
        zmesh.kill(second)
        assert zmesh.get(third.node.remote(), timeout=30) == where_second


def test_handles_and_names_work_before_gossip_has_spread_them() -> None:
    """With gossip slowed to a crawl, a fresh handle passed to another node and a fresh name are still found."""
    with LocalCluster(nodes=3, num_cpus=2, config={"gossip_round_s": 30, "sync_interval_s": 30}) as cluster:
        cluster.connect()
        target = Where.options(scheduling_strategy=_on(cluster, 2)).remote(5)
        relay = Where.options(scheduling_strategy=_on(cluster, 1)).remote()
        assert zmesh.get(relay.call.remote(target, 1), timeout=30) == 6  # node 1 never heard of the target from gossip
        Where.options(name="fresh", scheduling_strategy=_on(cluster, 2)).remote(10)
        script = "import sys, zmesh\nzmesh.init(address=sys.argv[1])\nprint(zmesh.get(zmesh.get_actor('fresh').add.remote(1)))\n"
        out = subprocess.run([sys.executable, "-c", script, cluster.addresses[1]], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "11"
