"""Regressions of the mesh's actor layer through real node processes.

Each test reproduces one reported defect on a LocalCluster, with drivers on
several nodes as separate processes where the defect needs them:

- a killed name can be created again at once, whichever member is its home;
- ``get_if_exists`` callers on every node, racing, all get the one actor;
- hard affinity to a member that just joined waits for its resources, and to
  a node that never exists fails within a bound;
- a restartable actor comes back, once, when its host and its creator's node
  die together;
- after a frozen node thaws, its buried actors never answer again: the name
  resolves to the new holder everywhere, and orphaned workers exit.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

import zmesh
from zmesh.exceptions import ActorAlreadyExistsError, ActorDiedError, ActorUnavailableError, GetTimeoutError
from zmesh.node.admin import AdminError
from zmesh.node.core.registry import home_of
from zmesh.testing import LocalCluster, wait_for
from zmesh.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "default"  # a driver's namespace when init() is given none

# What a name lookup or a call may raise while the mesh is still settling; anything else is a failure.
_SETTLING = (ValueError, ActorDiedError, ActorUnavailableError, GetTimeoutError)


@zmesh.remote
class Ident:
    """An actor that can tell which process, node and incarnation answered."""

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.ident = f"{os.getpid()}:{uuid.uuid4().hex}"

    def who(self) -> str:
        return self.ident

    def node(self) -> str:
        return zmesh.get_runtime_context().get_node_id()

    def add(self, n: int) -> int:
        self.value += n
        return self.value


def _hard(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def _names_homed(prefix: str, members: list[str], counts: dict[str, int]) -> list[str]:
    """Names whose home, among ``members``, is each member of ``counts`` that many times (in rendezvous order)."""
    wanted = dict(counts)
    names: list[str] = []
    for k in range(10_000):
        name = f"{prefix}-{k}"
        home = home_of((NAMESPACE, name), members)
        if home is not None and wanted.get(home, 0) > 0:
            wanted[home] -= 1
            names.append(name)
            if not any(wanted.values()):
                return names
    raise AssertionError(f"no names found for homes {counts}")


def _pid_of(ident: str) -> int:
    return int(ident.split(":", 1)[0])


def _process_alive(pid: int, started: float) -> bool:
    """Whether the process that had ``pid`` at ``started`` (its create time) still runs (not a reused pid)."""
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _run_driver(code: str, *args: str, timeout: float = 60) -> str:
    """Run a driver script in a process of its own; its output, or a failure showing what it printed."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, f"driver failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout


def _children() -> list[int]:
    """This process's children, fast: the kernel's list for the main thread (which starts the nodes), else psutil's scan."""
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
            return [int(pid) for pid in f.read().split()]
    except OSError:
        return [p.pid for p in psutil.Process().children()]


def _live_rows(cluster: LocalCluster, i: int) -> list[dict[str, Any]]:
    return [a for a in cluster._ask(i, "list_actors", None) if a["state"] != "DEAD"]


# ---------------------------------------------------------------------------------------------------- 1. names


@pytest.mark.timeout(90)
def test_a_killed_name_is_free_again_at_once_whatever_member_is_its_home() -> None:
    """As in Ray: once ``zmesh.kill(a)`` returns, creating the name again succeeds, also when another member is its home."""
    with LocalCluster(nodes=3, num_cpus=4) as cluster:
        cluster.connect(0)
        ids = [cluster.node_id(i) for i in range(3)]
        # Mostly names homed away from the driver's node (where the defect was), two homed on it.
        names = _names_homed("reuse", ids, {ids[1]: 4, ids[2]: 4, ids[0]: 2})
        for k, name in enumerate(names):
            home = ids.index(str(home_of((NAMESPACE, name), ids)))
            host = k % 3  # the actor lives on the driver's node, the home, or the third member
            for attempt in range(3):
                try:
                    actor = Ident.options(name=name, lifetime="detached", scheduling_strategy=_hard(ids[host])).remote(attempt)
                except ActorAlreadyExistsError as exc:
                    pytest.fail(f"creation {attempt + 1} of {name!r} (home node {home}, host node {host}) after a kill: {exc}")
                assert zmesh.get(actor.add.remote(0), timeout=30) == attempt
                zmesh.kill(actor)  # and create it again at once: no wait for gossip


# ---------------------------------------------------------------------------------------------------- 2. get_if_exists

# argv: node address, directory of the ready/go files, driver index, rounds, seconds between rounds.
GET_IF_EXISTS = r"""
import json, os, sys, time, uuid, zmesh

address, sync_dir, me, rounds, period = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
zmesh.init(address=address)

@zmesh.remote
class Shared:
    def __init__(self):
        self.ident = f"{os.getpid()}:{uuid.uuid4().hex}"

    def who(self):
        return self.ident

open(os.path.join(sync_dir, f"ready-{me}"), "w").close()
go = os.path.join(sync_dir, "go")
deadline = time.monotonic() + 90
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("the go file never came")
    time.sleep(0.005)
with open(go) as f:
    start = float(f.read())
for i in range(rounds):
    while time.time() < start + i * period:
        time.sleep(0.0005)
    try:
        actor = Shared.options(name=f"together-{i}", lifetime="detached", get_if_exists=True).remote()
        result = zmesh.get(actor.who.remote(), timeout=30)
    except Exception as exc:
        result = f"error {type(exc).__name__}: {exc}"
    print(json.dumps([i, result]), flush=True)
zmesh.shutdown()
"""


@pytest.mark.timeout(120)
def test_get_if_exists_from_two_drivers_on_each_of_three_nodes_gives_all_six_the_one_actor(tmp_path: Path) -> None:
    rounds, drivers = 4, 6
    with LocalCluster(nodes=3, num_cpus=4) as cluster:
        sync_dir = tmp_path / "sync"
        sync_dir.mkdir()
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", GET_IF_EXISTS, cluster.addresses[d % 3], str(sync_dir), str(d), str(rounds), "0.5"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            for d in range(drivers)
        ]
        try:
            wait_for(
                lambda: all((sync_dir / f"ready-{d}").exists() for d in range(drivers)) or any(p.poll() is not None for p in procs),
                60,
                interval=0.05,
                what="six drivers connected",
            )
            (sync_dir / "go.tmp").write_text(str(time.time() + 0.5))
            (sync_dir / "go.tmp").rename(sync_dir / "go")  # all at once: the drivers poll for it
            outs = [p.communicate(timeout=90) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        assert all(p.returncode == 0 for p in procs), outs
        answers: dict[int, list[str]] = {}
        for out, _ in outs:
            for line in out.splitlines():
                i, result = json.loads(line)
                answers.setdefault(i, []).append(result)
        assert sorted(answers) == list(range(rounds)), outs
        for i, results in answers.items():
            errors = Counter(r for r in results if r.startswith("error"))
            assert not errors, f"round {i}: {sum(errors.values())} of {drivers} get_if_exists callers failed: {dict(errors)}"
            assert len(set(results)) == 1, f"round {i}: the callers reached different actors: {sorted(results)}"

        def one_each() -> bool:
            rows = [a for a in _live_rows(cluster, 0) if a["class_name"] == "Shared"]
            return sorted(a["name"] for a in rows) == [f"together-{i}" for i in range(rounds)]

        wait_for(one_each, 10, interval=0.1, what="exactly one live actor per name")


# ---------------------------------------------------------------------------------------------------- 3. hard affinity


@pytest.mark.timeout(120)
def test_hard_affinity_to_a_node_the_moment_it_joins_places_the_actor_there() -> None:
    """The member is ALIVE (``on_membership`` says so) before its resources have arrived by gossip.

    To hold that window open, each joining node is frozen the moment the driver hears it is ALIVE,
    and thawed once its node has taken the creation; gossip is slowed down, and suspicion too, so
    the short freeze does not get it buried. Joins are repeated until the window was caught twice.
    """
    config = {"gossip_round_s": 5, "sync_interval_s": 10, "suspicion_min_s": 4, "suspicion_max_s": 8}
    with LocalCluster(nodes=2, num_cpus=2, config=config) as cluster:
        cluster.connect(0)
        heard: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        frozen: set[int] = set()
        nodes_before: set[int] = set()

        def freeze_on_join(event: dict[str, str]) -> None:
            if event["state"] != "ALIVE" or event["node_id"] in known:
                return
            # The node that joins is the only child of this process not started before (its workers are grandchildren).
            new = [pid for pid in _children() if pid not in nodes_before]
            if len(new) == 1:
                os.kill(new[0], signal.SIGSTOP)
                frozen.add(new[0])
            heard.put((event["node_id"], new[0] if len(new) == 1 else 0))

        known = {cluster.node_id(i) for i in range(2)}
        zmesh.on_membership(freeze_on_join)
        caught = 0
        try:
            for _ in range(5):
                nodes_before.update(n.pid for n in cluster.nodes)
                index = cluster.add_node(wait=False)
                try:
                    node_id, pid = heard.get(timeout=30)
                except queue.Empty:
                    pytest.fail(f"node 0 never said node {index} was ALIVE")
                known.add(node_id)
                actor = Ident.options(scheduling_strategy=_hard(node_id)).remote()

                def taken(actor_id: str = actor._zmesh_actor_id) -> bool:
                    status = cluster.status(0)
                    return any(a["actor_id"] == actor_id for a in status["actors"] + status["dead_actors"])

                wait_for(taken, 10, what="node 0 to take the creation")
                view = {m["node_id"]: m for m in cluster.members(0)}
                caught += view[node_id]["state"] == "ALIVE" and not view[node_id]["resources_total"]
                if pid in frozen:
                    os.kill(pid, signal.SIGCONT)
                    frozen.discard(pid)
                try:
                    where = zmesh.get(actor.node.remote(), timeout=30)
                except (ActorDiedError, GetTimeoutError) as exc:
                    pytest.fail(f"hard affinity to node {node_id}, ALIVE in on_membership: {type(exc).__name__}: {exc}")
                assert where == node_id == cluster.node_id(index)
                if caught >= 2:
                    break
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)


@pytest.mark.timeout(90)
def test_hard_affinity_to_a_node_that_never_exists_fails_within_a_bound() -> None:
    with LocalCluster(nodes=2, num_cpus=2, config={"affinity_wait_s": "2"}) as cluster:
        cluster.connect(0)
        ghost = os.urandom(6).hex()  # the shape of a node id; no member has it
        started = time.monotonic()
        actor = Ident.options(scheduling_strategy=_hard(ghost)).remote()
        try:
            zmesh.get(actor.node.remote(), timeout=30)
        except ActorDiedError as exc:
            assert ghost in str(exc), str(exc)
        except GetTimeoutError:
            pytest.fail(f"hard affinity to node {ghost}, which never exists, neither failed nor ran within 30 s")
        else:
            pytest.fail(f"hard affinity to node {ghost}, which never exists, placed the actor somewhere")
        assert time.monotonic() - started < 30


# ---------------------------------------------------------------------------------------------------- 5. keepers

# argv: node 0's address, node 1's id, comma-separated names.
CREATE_KEPT = r"""
import json, sys, zmesh
from zmesh.util.scheduling_strategies import NodeAffinitySchedulingStrategy

zmesh.init(address=sys.argv[1])

@zmesh.remote
class Kept:
    def __init__(self, value):
        self.value = value

    def node(self):
        return zmesh.get_runtime_context().get_node_id()

    def add(self, n):
        self.value += n
        return self.value

# Soft affinity: a hard one to a node that died could never be met again.
where = NodeAffinitySchedulingStrategy(sys.argv[2], soft=True)
actors = [Kept.options(name=n, lifetime="detached", max_restarts=5, scheduling_strategy=where).remote(7) for n in sys.argv[3].split(",")]
print(json.dumps([zmesh.get([a.node.remote() for a in actors], timeout=30), zmesh.get([a.add.remote(100) for a in actors], timeout=30)]))
zmesh.shutdown()
"""


@pytest.mark.timeout(120)
def test_restartable_actors_survive_their_host_and_their_creators_node_dying_together() -> None:
    names = [f"kept-{k}" for k in range(6)]  # six actor ids: every order of keepers among the members occurs
    with LocalCluster(nodes=4, num_cpus=4) as cluster:
        ids = [cluster.node_id(i) for i in range(4)]
        hosts, values = json.loads(_run_driver(CREATE_KEPT, cluster.addresses[0], ids[1], ",".join(names)).splitlines()[-1])
        assert hosts == [ids[1]] * len(names) and values == [107] * len(names)

        def listed_everywhere() -> bool:
            for i in range(4):
                rows = {a["name"]: a for a in _live_rows(cluster, i)}
                if not all(n in rows and rows[n]["state"] == "ALIVE" and rows[n]["node_id"] == ids[1] for n in names):
                    return False
            return True

        wait_for(listed_everywhere, 15, interval=0.1, what="every node to list the six actors on node 1")
        cluster.kill_node(0)
        cluster.kill_node(1)
        cluster.connect(3)
        back: dict[str, tuple[int, str]] = {}
        last: dict[str, str] = {}  # why each actor not back yet was not reached, last time

        def all_back() -> bool:
            for name in names:
                if name in back:
                    continue
                try:
                    actor = zmesh.get_actor(name, timeout=5)
                    value, node = zmesh.get([actor.add.remote(0), actor.node.remote()], timeout=2)
                    back[name] = (value, node)
                except _SETTLING as exc:
                    last[name] = repr(exc)[:300]
            return len(back) == len(names)

        try:
            wait_for(all_back, 30, interval=0.2, what="the six actors to come back")
        except TimeoutError:
            pytest.fail(f"after nodes 0 and 1 died, only {sorted(back)} of {names} came back within 30 s; last errors: {last}")
        assert {name: value for name, (value, _) in back.items()} == dict.fromkeys(names, 7)  # __init__ ran again
        assert {node for _, node in back.values()} <= {ids[2], ids[3]}

        cli = [sys.executable, "-m", "zmesh", "list", "actors", "--json", "--address", cluster.addresses[2]]

        def each_listed_once_alive() -> bool:
            out = subprocess.run(cli, capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            rows = [a for a in json.loads(out.stdout) if a["name"] in names]
            return sorted(a["name"] for a in rows) == names and all(a["state"] == "ALIVE" for a in rows)

        wait_for(each_listed_once_alive, 10, interval=0.2, what="zmesh list actors to show each actor ALIVE once")
        # No two live copies: exactly one of the survivors hosts each actor.
        hosting: dict[str, list[int]] = {}
        for i in (2, 3):
            for a in cluster.status(i)["actors"]:
                if a["name"] in names and a["node_id"] == ids[i] and a["pid"]:
                    hosting.setdefault(a["name"], []).append(i)
        assert hosting == {name: [ids.index(node)] for name, (_, node) in back.items()}


# ---------------------------------------------------------------------------------------------------- 6. a thawed node

# argv: node address, actor name; prints what the actor under that name answers.
RESOLVE = r"""
import sys, zmesh
zmesh.init(address=sys.argv[1])
print(zmesh.get(zmesh.get_actor(sys.argv[2], timeout=10).who.remote(), timeout=10))
zmesh.shutdown()
"""


def _freeze_until_buried(cluster: LocalCluster, i: int) -> None:
    frozen = cluster.node_id(i)
    cluster.freeze_node(i)
    others = [j for j in range(len(cluster.nodes)) if j != i]

    def buried() -> bool:
        return all({m["node_id"]: m["state"] for m in cluster.members(j)}[frozen] == "DEAD" for j in others)

    wait_for(buried, 15, interval=0.1, what=f"node {i} declared dead while frozen")


@pytest.mark.timeout(120)
def test_after_a_buried_node_thaws_every_node_resolves_the_name_to_its_new_holder() -> None:
    with LocalCluster(nodes=3, num_cpus=2) as cluster:
        cluster.connect(0)
        ids = [cluster.node_id(i) for i in range(3)]
        # Homed on the node that freezes: the name's claim moves with the membership, not with a kill.
        (name,) = _names_homed("thawed", ids, {ids[1]: 1})
        old = Ident.options(name=name, lifetime="detached", scheduling_strategy=_hard(ids[1])).remote()
        old_ident = zmesh.get(old.who.remote(), timeout=30)
        old_started = psutil.Process(_pid_of(old_ident)).create_time()
        _freeze_until_buried(cluster, 1)
        with pytest.raises(ActorDiedError):
            zmesh.get(old.who.remote(), timeout=30)

        def created_again() -> zmesh.ActorHandle | None:
            try:
                return Ident.options(name=name, lifetime="detached", scheduling_strategy=_hard(ids[2])).remote()
            except ActorAlreadyExistsError:
                return None

        new = wait_for(created_again, 15, interval=0.2, what="the buried actor's name free again")
        assert new is not None
        new_ident = zmesh.get(new.who.remote(), timeout=30)
        cluster.thaw_node(1)
        cluster.wait_converged(30)

        def resolved_to_new(i: int) -> bool:
            try:
                return bool(cluster._ask(i, "lookup", NAMESPACE, name)[0] == new._zmesh_actor_id)
            except (*_SETTLING, AdminError):  # a node that just rejoined may not know the holder for a moment
                return False

        try:
            wait_for(lambda: all(resolved_to_new(i) for i in range(3)), 15, interval=0.2, what="the name resolved to the new actor")
        except TimeoutError:
            seen = {}
            for i in range(3):
                try:
                    seen[i] = cluster._ask(i, "lookup", NAMESPACE, name)[0]
                except (*_SETTLING, AdminError) as exc:
                    seen[i] = f"{exc}"
            rows = {i: [(a["actor_id"], a["name"], a["state"], a["node_id"]) for a in cluster.status(i)["actors"]] for i in range(3)}
            pytest.fail(
                f"15 s after the thaw, nodes resolve {name!r} to {seen}; the new actor is {new._zmesh_actor_id}, the old {old}; "
                f"records: {rows}"
            )
        for i in range(3):  # and drivers on every node reach the new one
            assert _run_driver(RESOLVE, cluster.addresses[i], name).strip() == new_ident, f"a driver on node {i}"
        try:
            wait_for(lambda: not _process_alive(_pid_of(old_ident), old_started), 15, interval=0.1, what="the old worker to exit")
        except TimeoutError:
            pytest.fail(f"the buried actor's worker (pid {_pid_of(old_ident)}) still runs 15 s after its node thawed")


@pytest.mark.timeout(120)
def test_after_a_buried_node_thaws_the_actors_whose_driver_saw_them_die_stop() -> None:
    with LocalCluster(nodes=3, num_cpus=2) as cluster:
        cluster.connect(0)  # the owner: a driver of node 0
        ids = [cluster.node_id(i) for i in range(3)]
        owned = [Ident.options(scheduling_strategy=_hard(ids[1])).remote(k) for k in range(2)]
        idents = zmesh.get([a.who.remote() for a in owned], timeout=30)
        started = {_pid_of(x): psutil.Process(_pid_of(x)).create_time() for x in idents}
        _freeze_until_buried(cluster, 1)
        for actor in owned:
            with pytest.raises(ActorDiedError):
                zmesh.get(actor.who.remote(), timeout=30)
        cluster.thaw_node(1)
        cluster.wait_converged(30)
        dead_ids = {a._zmesh_actor_id for a in owned}

        def gone_everywhere() -> bool:
            listed = any(a["actor_id"] in dead_ids for i in range(3) for a in _live_rows(cluster, i))
            return not listed and not any(_process_alive(pid, t) for pid, t in started.items())

        try:
            wait_for(gone_everywhere, 15, interval=0.2, what="the buried actors gone")
        except TimeoutError:
            listed = {i: [a["actor_id"] for a in _live_rows(cluster, i) if a["actor_id"] in dead_ids] for i in range(3)}
            running = [pid for pid, t in started.items() if _process_alive(pid, t)]
            pytest.fail(f"15 s after node 1 thawed, its buried actors are listed live {listed} and their workers {running} still run")
