"""The shared-memory object store across real nodes: one transfer per node, values intact at every size, frees
relayed to the segment's node, and nothing left behind when the sender or a reader dies mid-transfer.

Each node's store is read through its status ("object_store": capacity, used, segments, pulling,
transfers_started, bytes_sent, bytes_received, transfers_active) and through the files of /dev/shm.
"""

from __future__ import annotations

import faulthandler
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torture_tasks as tt
import torture_workloads as tw
from conftest import ROOT
from hypothesis import HealthCheck, Phase, assume, example, given, note, seed, settings
from hypothesis import strategies as st
from torture_workloads import Collect

import zmesh
from zmesh.exceptions import ActorDiedError, ObjectLostError, ObjectStoreFullError
from zmesh.testing import LocalCluster, wait_for
from zmesh.transport import shm
from zmesh.util.scheduling_strategies import NodeAffinitySchedulingStrategy

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
THRESHOLD = MiB  # NodeConfig.store_threshold's default: values whose frames reach it go to the store
GATE_S = 30.0

# ------------------------------------------------------------------ values and the actors that read them


def make(kind: str, nbytes: int) -> Any:
    """``nbytes`` of a pattern with no long runs (a chunk at the wrong offset cannot look right): bytes or a numpy array."""
    import numpy as np

    if kind == "bytes":
        return (bytes(range(1, 252)) * (nbytes // 251 + 1))[:nbytes]
    dtype = np.dtype(kind)
    return (np.arange(nbytes // dtype.itemsize) * 7 + 3).astype(dtype)


def digest(value: Any) -> str:
    """The value's type, dtype, shape and content in one string: what a reader sends back instead of the value."""
    if isinstance(value, bytes):
        return "bytes:" + hashlib.sha256(value).hexdigest()
    return f"{value.dtype}{value.shape}:" + hashlib.sha256(memoryview(value).cast("B")).hexdigest()


def same(got: Any, want: Any) -> bool:
    import numpy as np

    if isinstance(want, bytes):
        return type(got) is bytes and got == want
    return type(got) is np.ndarray and got.dtype == want.dtype and got.shape == want.shape and bool(np.array_equal(got, want))


def _gate(path: str | None) -> None:
    if path is None:
        return
    deadline = time.monotonic() + GATE_S
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.002)


@zmesh.remote
class Reader:
    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        return zmesh.get_runtime_context().get_node_id()

    def read_nested(self, refs: list[Any], gate: str | None = None) -> str:
        """Say it is here, wait for the gate (all readers at once), then fetch the ref itself: a borrower's get."""
        if gate is not None:
            Path(f"{gate}-{os.getpid()}").touch()
        _gate(gate)
        return digest(zmesh.get(refs[0], timeout=60))

    def keep(self, refs: list[Any]) -> str:
        """Read a ref and keep it: this worker's node keeps its copy while the ref is held."""
        self._refs = refs
        return digest(zmesh.get(refs[0], timeout=60))

    def drop(self) -> None:
        self._refs = []

    def read(self, value: Any) -> str:
        """A value passed as an argument (or a top-level ref, resolved before the call runs)."""
        return digest(value)

    def make(self, kind: str, nbytes: int) -> Any:
        return make(kind, nbytes)

    def make_many(self, kind: str, nbytes: int, count: int) -> Any:
        for i in range(count):
            yield make(kind, nbytes + i)

    def put(self, kind: str, nbytes: int) -> None:
        """A value in this actor's node's store, owned and kept by the actor."""
        self._kept = zmesh.put(make(kind, nbytes))

    def kept(self) -> list[Any]:
        return [self._kept]


@zmesh.remote
def make_task(kind: str, nbytes: int) -> Any:
    return make(kind, nbytes)


# ------------------------------------------------------------------ looking at the stores


def _on(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def store(cluster: LocalCluster, i: int) -> dict[str, Any]:
    return dict(cluster.status(i)["object_store"])


def files_of(node_id: str) -> list[str]:
    """The segment files of node ``node_id``'s store (its lock file aside)."""
    return sorted(p.name for p in shm.directory().glob(f"zmesh.{node_id}.*") if not p.name.endswith(".lock"))


def wait_empty(cluster: LocalCluster, ids: list[str], indexes: list[int], what: str, timeout: float = 10.0) -> None:
    """Every one of these nodes' stores holds nothing, in its ledger and in /dev/shm."""
    seen: dict[int, Any] = {}

    def empty() -> bool:
        for i in indexes:
            s = store(cluster, i)
            seen[i] = (s, files_of(ids[i]))
            if s["segments"] or s["used"] or s["pulling"] or s["transfers_active"] or seen[i][1]:
                return False
        return True

    try:
        wait_for(empty, timeout, interval=0.05, what=what)
    except TimeoutError:
        raise AssertionError(f"{what}: the stores still hold {seen}") from None


def wait_pulling(cluster: LocalCluster, i: int, what: str) -> dict[str, Any]:
    """Node ``i`` is pulling a copy and some of its bytes have arrived."""
    last: list[dict[str, Any]] = []

    def pulling() -> bool:
        last.append(store(cluster, i))
        return last[-1]["pulling"] == 1 and last[-1]["transfers_active"] == 1 and last[-1]["bytes_received"] > 0

    try:
        wait_for(pulling, 30, interval=0.01, what=what)
    except TimeoutError:
        raise AssertionError(f"{what}: node {i}'s store is {last[-1:]}") from None
    return last[-1]


# ------------------------------------------------------------------ one transfer per node


def test_six_readers_on_one_node_pull_one_copy(tmp_path: Path) -> None:
    """Six actors on node B read a 48 MB array owned by a driver on node A at the same moment: B pulls it once.

    One of them keeps the ref: B keeps its copy for it, and a later reader there maps that copy.
    """
    with LocalCluster(nodes=2, num_cpus=8) as cluster:
        cluster.connect(0)
        ids = [cluster.node_id(i) for i in range(2)]
        readers = [Reader.options(scheduling_strategy=_on(ids[1])).remote() for _ in range(6)]
        assert zmesh.get([r.node.remote() for r in readers], timeout=60) == [ids[1]] * 6
        value = make("float64", 48 * 10**6)
        ref = zmesh.put(value)
        a = store(cluster, 0)
        assert a["segments"] == 1 and a["used"] >= value.nbytes
        size = a["used"]  # the one segment, frames aligned
        gate = tmp_path / "go"
        calls = [r.keep.remote([ref]) for r in readers[:1]] + [r.read_nested.remote([ref], str(gate)) for r in readers[1:]]
        wait_for(lambda: len(list(tmp_path.glob("go-*"))) == 5, 30, what="five readers at the gate")
        gate.touch()
        assert zmesh.get(calls, timeout=60) == [digest(value)] * 6
        a, b = store(cluster, 0), store(cluster, 1)
        assert (b["transfers_started"], b["bytes_received"]) == (1, size), b
        assert (a["transfers_started"], a["bytes_sent"], a["bytes_received"]) == (0, size, 0), a
        # One reader keeps the ref, so B keeps its copy: a later reader there maps it, no second transfer.
        assert b["segments"] == 1 and len(files_of(ids[1])) == 1
        assert zmesh.get(readers[1].read_nested.remote([ref]), timeout=60) == digest(value)
        assert (store(cluster, 1)["transfers_started"], store(cluster, 0)["bytes_sent"]) == (1, size)
        # Once the last reader there lets go, B's copy goes; the driver's put is the only segment left.
        zmesh.get(readers[0].drop.remote(), timeout=30)
        wait_empty(cluster, ids, [1], "B's copy to go once no reader there holds the ref")
        assert store(cluster, 0)["segments"] == 1 and files_of(ids[0])
        del ref
        wait_empty(cluster, ids, [0, 1], "the put freed once its ref is gone")
        for r in readers:
            zmesh.kill(r)


def test_a_copy_that_does_not_fit_in_the_reading_nodes_store_fails_with_the_sizes() -> None:
    """Node 1's store (5 MiB) already holds a 3 MiB result: a 3 MiB put from node 0 cannot be pulled there until it goes."""
    with LocalCluster(nodes=2, num_cpus=4, config={"object_store_memory": 5 * MiB}) as cluster:
        cluster.connect(0)
        ids = [cluster.node_id(i) for i in range(2)]
        far = Reader.options(scheduling_strategy=_on(ids[1])).remote()
        held = far.make.remote("bytes", 3 * MiB)  # in node 1's store, held for this driver
        assert zmesh.wait([held], timeout=60)[0] == [held]
        value = make("bytes", 3 * MiB)
        ref = zmesh.put(value)
        with pytest.raises(ObjectStoreFullError, match=r"is full: a value of 3\.0 MiB"):
            zmesh.get(far.read_nested.remote([ref]), timeout=60)
        assert store(cluster, 1)["segments"] == 1
        del held
        wait_for(lambda: store(cluster, 1)["segments"] == 0, 10, what="node 1's store to have room")
        assert zmesh.get(far.read_nested.remote([ref]), timeout=60) == digest(value)
        del ref
        zmesh.kill(far)
        wait_empty(cluster, ids, [0, 1], "both stores empty")


def test_two_drivers_on_two_nodes_read_one_object_at_once_one_transfer_each(tmp_path: Path) -> None:
    """Drivers on nodes 0 and 1 read a value in node 2's store at the same moment, twice (read, drop, read again).

    Each reading node pulls it once per read (one transfer, its bytes once), node 2 sends it once per reading
    node and read, and a ref handed on to an actor on a third node is pulled by that node from where the value lives.
    """
    with LocalCluster(nodes=3, num_cpus=4) as cluster:
        ids = [cluster.node_id(i) for i in range(3)]
        cluster.connect(0)
        owner = Reader.options(name="maker", scheduling_strategy=_on(ids[2])).remote()
        zmesh.get(owner.put.remote("int32", 24 * MiB), timeout=60)  # owned by the actor, in node 2's store
        want = digest(make("int32", 24 * MiB))
        size = store(cluster, 2)["used"]
        code = OTHER_DRIVER.format(address=cluster.addresses[1], folder=str(tmp_path))
        other = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for((tmp_path / "ready").exists, 30, what="the other driver to connect to node 1")
            for n in (1, 2):
                [ref] = zmesh.get(owner.kept.remote(), timeout=30)
                (tmp_path / f"go-{n}").touch()
                value = zmesh.get(ref, timeout=60)
                assert digest(value) == want
                wait_for((tmp_path / f"read-{n}").exists, 60, what="the other driver's read")
                for i in (0, 1):
                    s = store(cluster, i)
                    assert (s["transfers_started"], s["bytes_received"], s["segments"]) == (n, n * size, 1), (i, s)
                assert store(cluster, 2)["bytes_sent"] == 2 * n * size
                # Dropped everywhere: each reading node's copy goes (held while a reader there holds the ref).
                del value, ref
                wait_empty(cluster, ids, [0], "node 0's copy to go once its driver dropped the ref")
                (tmp_path / f"dropped-{n}").touch()
                wait_for((tmp_path / f"freed-{n}").exists, 30, what="the other driver to drop the ref")
                wait_empty(cluster, ids, [1], "node 1's copy to go once its driver dropped the ref")
            out, err = other.communicate(timeout=60)
            assert other.returncode == 0, err
            assert out.split() == [want, want]
            # A result made on node 2 and read here (node 0 pulls it), then handed to an actor on node 1: node 1
            # pulls it from node 2, where it lives, not from this driver's node.
            made = owner.make.remote("uint8", 3 * MiB)
            assert digest(zmesh.get(made, timeout=60)) == digest(make("uint8", 3 * MiB))
            before = store(cluster, 1)
            far = Reader.options(scheduling_strategy=_on(ids[1])).remote()
            assert zmesh.get(far.read_nested.remote([made]), timeout=60) == digest(make("uint8", 3 * MiB))
            assert store(cluster, 1)["transfers_started"] == before["transfers_started"] + 1
            assert store(cluster, 0)["bytes_sent"] == 0
            del made
            zmesh.kill(owner)
            zmesh.kill(far)
            wait_empty(cluster, ids, [0, 1, 2], "every store empty once every ref is gone")
        finally:
            if other.poll() is None:
                other.kill()
                other.communicate()


OTHER_DRIVER = """
import hashlib, os, time
from pathlib import Path
import zmesh

def wait(name):
    path = os.path.join({folder!r}, name)
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert os.path.exists(path), path

zmesh.init(address={address!r})
owner = zmesh.get_actor("maker")
Path({folder!r}, "ready").touch()
for n in (1, 2):
    [ref] = zmesh.get(owner.kept.remote(), timeout=30)
    wait(f"go-{{n}}")
    value = zmesh.get(ref, timeout=60)
    print(f"{{value.dtype}}{{value.shape}}:" + hashlib.sha256(memoryview(value).cast("B")).hexdigest(), flush=True)
    Path({folder!r}, f"read-{{n}}").touch()
    wait(f"dropped-{{n}}")
    del value, ref
    Path({folder!r}, f"freed-{{n}}").touch()
zmesh.shutdown()
"""


# ------------------------------------------------------------------ sizes across the threshold and the chunks

CHUNK = 64 * 1024  # a small transfer_chunk: a few megabytes cross many chunk boundaries
KINDS = ("bytes", "uint8", "float64")
HOWS = ("put", "nested", "value", "result", "task", "stream")


def _sizes() -> st.SearchStrategy[int]:
    # A bytes value's segment is a 64-byte frame then the value (each frame aligned to 64): a value of
    # k * CHUNK - 64 bytes fills exactly k chunks. Arrays add their pickle's head, a little over 100 bytes.
    around_threshold = st.integers(-300, 300).map(lambda d: THRESHOLD + d)
    around_chunks = st.tuples(st.integers(16, 48), st.integers(-200, 200)).map(lambda kd: kd[0] * CHUNK - 64 + kd[1])
    return st.one_of(around_threshold, around_chunks, st.sampled_from([THRESHOLD - 1, THRESHOLD, 16 * CHUNK - 64, 17 * CHUNK - 64]))


def test_values_cross_nodes_intact_across_the_threshold_and_chunk_boundaries() -> None:
    """By put ref (top-level and nested), by value, and as an actor's or a task's result from the other node."""
    with LocalCluster(nodes=2, num_cpus=4, config={"transfer_chunk": CHUNK, "transfer_window": 3}) as cluster:
        cluster.connect(0)
        ids = [cluster.node_id(i) for i in range(2)]
        far = Reader.options(scheduling_strategy=_on(ids[1])).remote()
        task = make_task.options(scheduling_strategy=_on(ids[1]))

        @settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(st.tuples(st.sampled_from(KINDS), _sizes(), st.sampled_from(HOWS)), min_size=1, max_size=3))
        @example([("bytes", THRESHOLD - 1, "value"), ("bytes", THRESHOLD, "value"), ("bytes", THRESHOLD, "result")])
        @example([("bytes", 16 * CHUNK - 64, "put"), ("bytes", 16 * CHUNK - 63, "nested"), ("bytes", 16 * CHUNK - 65, "task")])
        @example([("uint8", 20 * CHUNK, "result"), ("float64", 20 * CHUNK, "value"), ("float64", THRESHOLD, "nested")])
        @example([("bytes", THRESHOLD - 1, "stream"), ("uint8", 32 * CHUNK - 64, "stream")])
        def check(cases: list[tuple[str, int, str]]) -> None:
            calls: list[tuple[Any, Any, tuple[str, int, str]]] = []  # (ref, the digest or the value it must give, case)
            for kind, nbytes, how in cases:
                value, case = make(kind, nbytes), (kind, nbytes, how)
                if how == "put":
                    calls.append((far.read.remote(zmesh.put(value)), digest(value), case))
                elif how == "nested":
                    calls.append((far.read_nested.remote([zmesh.put(value)]), digest(value), case))
                elif how == "value":
                    calls.append((far.read.remote(value), digest(value), case))
                elif how == "result":
                    calls.append((far.make.remote(kind, nbytes), value, case))
                elif how == "task":
                    calls.append((task.remote(kind, nbytes), value, case))
                else:  # two items of a stream, one byte apart
                    items = far.make_many.remote(kind, nbytes, 2)
                    calls += [(item, make(kind, nbytes + i), (kind, nbytes + i, how)) for i, item in enumerate(items)]
            for ref, want, case in calls:
                got = zmesh.get(ref, timeout=60)
                assert got == want if isinstance(want, str) else same(got, want), case
            del calls, got, ref
            wait_empty(cluster, ids, [0, 1], f"every store empty once {cases} is read and dropped")

        check()
        zmesh.kill(far)


# ------------------------------------------------------------------ frees relayed to the segment's node


def test_large_results_from_another_node_are_freed_there_when_the_driver_lets_go() -> None:
    """A result written on node B for a driver on node A lives in B's store until the driver drops its ref, read or
    not (the free goes to A's node, which relays it to B); the copy A pulled to read it goes with it."""
    with LocalCluster(nodes=2, num_cpus=4) as cluster:
        cluster.connect(0)
        ids = [cluster.node_id(i) for i in range(2)]
        far = Reader.options(scheduling_strategy=_on(ids[1])).remote()
        task = make_task.options(scheduling_strategy=_on(ids[1]))
        for name, produce in (("actor", far.make), ("task", task)):
            for read in (False, True):
                ref = produce.remote("float64", 8 * MiB)
                assert zmesh.wait([ref], timeout=60)[0] == [ref]
                assert store(cluster, 1)["segments"] == 1 and len(files_of(ids[1])) == 1, name
                assert store(cluster, 0)["segments"] == 0, name
                if read:
                    value = zmesh.get(ref, timeout=60)
                    assert same(value, make("float64", 8 * MiB)), name
                    pulled = files_of(ids[0])
                    assert store(cluster, 0)["segments"] == 1 and len(pulled) == 1 and pulled[0].startswith(f"zmesh.{ids[0]}.p"), pulled
                    del value
                del ref
                wait_empty(cluster, ids, [0, 1], f"the {name}'s result freed on both nodes once dropped ({read=})")
        # A stream's items: each written on B for this driver, each freed there once its ref is gone.
        items = list(far.make_many.remote("uint8", 2 * MiB, 3))
        assert store(cluster, 1)["segments"] == 3
        assert [same(zmesh.get(r, timeout=60), make("uint8", 2 * MiB + i)) for i, r in enumerate(items)] == [True] * 3
        del items
        wait_empty(cluster, ids, [0, 1], "a stream's items freed on both nodes once dropped")
        zmesh.kill(far)


GONE_DRIVER = """
import os, sys
import zmesh
from zmesh.util.scheduling_strategies import NodeAffinitySchedulingStrategy

@zmesh.remote
def make(n):
    return b"x" * n

zmesh.init(address={address!r})
ref = make.options(scheduling_strategy=NodeAffinitySchedulingStrategy({far!r}, soft=False)).remote({size})
zmesh.wait([ref], timeout=60)
value = zmesh.get(ref, timeout=60)
assert value == b"x" * {size}
print("read", flush=True)
sys.stdin.readline()
os._exit(0)  # no goodbye, no free: its nodes must notice it is gone
"""


def test_a_driver_that_exits_holding_results_from_another_node_frees_them_there() -> None:
    with LocalCluster(nodes=2, num_cpus=4) as cluster:
        ids = [cluster.node_id(i) for i in range(2)]
        code = GONE_DRIVER.format(address=cluster.addresses[0], far=ids[1], size=3 * MiB)
        env = {**os.environ, "ZMESH_RUN_DIR": cluster.run_dir}  # the node removes the socket file it left, in its run directory
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline().strip() == "read"
            assert (store(cluster, 0)["segments"], store(cluster, 1)["segments"]) == (1, 1)
            proc.stdin.close()
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        wait_empty(cluster, ids, [0, 1], "the gone driver's result and its copy freed on both nodes", timeout=20)


# ------------------------------------------------------------------ deaths mid-transfer

# Tiny chunks one at a time: a transfer of a few megabytes takes seconds, long enough to kill someone in it.
SLOW = {"transfer_chunk": 512, "transfer_window": 1, "transfer_stall_s": 60}


def test_a_sender_killed_mid_transfer_fails_its_readers_promptly_and_leaves_no_partial_copy(tmp_path: Path) -> None:
    """Node 1 holds a result (made there for the driver); node 0 pulls it for three readers; node 1 is SIGKILLed."""
    with LocalCluster(nodes=2, num_cpus=4, config=SLOW) as cluster:
        cluster.connect(0)
        ids = [cluster.node_id(i) for i in range(2)]
        maker = Reader.options(scheduling_strategy=_on(ids[1])).remote()
        readers = [Reader.options(scheduling_strategy=_on(ids[0])).remote() for _ in range(2)]
        zmesh.get([r.pid.remote() for r in [maker, *readers]], timeout=60)
        ref = maker.make.remote("uint8", 16 * MiB)
        assert zmesh.wait([ref], timeout=60)[0] == [ref]  # the descriptor is here; the bytes are on node 1
        gate = tmp_path / "go"
        calls = [r.read_nested.remote([ref], str(gate)) for r in readers]
        mine: list[Any] = []
        driver = threading.Thread(target=lambda: mine.append(_outcome(ref, gate)), daemon=True)
        driver.start()
        gate.touch()
        wait_pulling(cluster, 0, "node 0 to pull the result")
        wait_for(lambda: store(cluster, 0)["bytes_received"] >= 256 * 1024, 30, what="the transfer to be well under way")
        killed = time.monotonic()
        cluster.kill_node(1)
        driver.join(60)
        assert mine and isinstance(mine[0][0], ObjectLostError), mine
        for call in calls:
            with pytest.raises(ObjectLostError):
                zmesh.get(call, timeout=60)
        # Told by the mesh that the sender died (about a second here), not by the stall timer (60 s).
        assert mine[0][1] - killed < 15, f"the reader waited {mine[0][1] - killed:.1f} s"
        wait_empty(cluster, ids, [0], "node 0's partial copy to go")
        # The dead node's store is left in /dev/shm; the next node to start on this host sweeps it.
        assert files_of(ids[1])
        cluster.add_node()
        assert files_of(ids[1]) == []
        assert not (shm.directory() / f"zmesh.{ids[1]}.lock").exists()
        for r in readers:
            zmesh.kill(r)


def _outcome(ref: Any, gate: Path) -> tuple[Any, float]:
    """What a get of ``ref`` gives (the value or the error), and when it ended."""
    wait_for(gate.exists, GATE_S)
    try:
        got: Any = zmesh.get(ref, timeout=90)
    except Exception as exc:
        got = exc
    return got, time.monotonic()


def test_a_read_of_a_dead_nodes_object_fails_promptly() -> None:
    """Node 1, which holds a result, is already dead when the driver first reads it: no transfer can start."""
    with LocalCluster(nodes=2, num_cpus=4, config={"transfer_stall_s": 8}) as cluster:
        cluster.connect(0)
        ids = [cluster.node_id(i) for i in range(2)]
        maker = Reader.options(scheduling_strategy=_on(ids[1])).remote()
        ref = maker.make.remote("uint8", 4 * MiB)
        assert zmesh.wait([ref], timeout=60)[0] == [ref]
        cluster.kill_node(1)
        wait_for(lambda: {m["node_id"]: m["state"] for m in cluster.members(0)}.get(ids[1]) == "DEAD", 30, what="node 1 declared dead")
        try:
            start = time.monotonic()
            with pytest.raises(ObjectLostError):
                zmesh.get(ref, timeout=60)
            took = time.monotonic() - start
            wait_empty(cluster, ids, [0], "node 0 holds nothing")
        finally:
            cluster.add_node()  # sweeps the dead node's segments, whatever happened above
        assert files_of(ids[1]) == []
        assert took < 4, f"the read took {took:.1f} s to fail (transfer_stall_s is 8)"


def test_a_reader_killed_mid_transfer_lets_go_and_its_partial_copy_is_freed(tmp_path: Path) -> None:
    """Two readers on node 1 pull one put of the driver on node 0; one is SIGKILLed mid-way, the other still gets the
    value. Then the only reader of a transfer is killed mid-way: the partial copy goes; a later reader gets it whole."""
    with LocalCluster(nodes=2, num_cpus=4, config=SLOW) as cluster:
        cluster.connect(0)
        ids = [cluster.node_id(i) for i in range(2)]
        readers = [Reader.options(scheduling_strategy=_on(ids[1])).remote() for _ in range(4)]
        pids = zmesh.get([r.pid.remote() for r in readers], timeout=60)
        value = make("uint8", 4 * MiB)
        ref = zmesh.put(value)
        gate = tmp_path / "go"
        calls = [r.read_nested.remote([ref], str(gate)) for r in readers[:2]]
        gate.touch()
        wait_pulling(cluster, 1, "node 1 to pull the put")
        os.kill(pids[0], signal.SIGKILL)
        with pytest.raises(ActorDiedError):
            zmesh.get(calls[0], timeout=30)
        assert zmesh.get(calls[1], timeout=90) == digest(value)
        wait_empty(cluster, ids, [1], "node 1's copy to go once its last reader is done")
        started = store(cluster, 1)["transfers_started"]
        # The only reader dies mid-way: nobody is left to read the copy.
        call = readers[2].read_nested.remote([ref])
        wait_pulling(cluster, 1, "node 1 to pull the put again")
        os.kill(pids[2], signal.SIGKILL)
        with pytest.raises(ActorDiedError):
            zmesh.get(call, timeout=30)
        wait_empty(cluster, ids, [1], "the partial copy to go with its only reader")
        assert store(cluster, 1)["transfers_started"] == started + 1
        # The put is still whole, and read whole by the next reader.
        assert zmesh.get(readers[3].read_nested.remote([ref]), timeout=90) == digest(value)
        assert store(cluster, 1)["transfers_started"] == started + 2
        del ref
        wait_empty(cluster, ids, [0, 1], "every store empty once the put is dropped")
        for r in readers:
            zmesh.kill(r)


# ------------------------------------------------------------------ torture workloads with large values
# The torture runners (torture_workloads.play, torture_tasks.play) check every value and, at the end, that every
# node's store holds no more than before the workload; here their values cross the store's threshold.

ITEMSIZE = {"uint8": 1, "int32": 4, "float64": 8}
HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture]
MAX_BYTES = 96 * MiB


def _store_sizes() -> st.SearchStrategy[int]:
    """From half the threshold to a few MiB, often right at the threshold (the frames are a little over the value)."""
    edges = st.sampled_from((THRESHOLD - 1, THRESHOLD, THRESHOLD + 1))
    return st.one_of(edges, st.integers(THRESHOLD - 2048, THRESHOLD + 2048), st.integers(THRESHOLD // 2, 3 * MiB))


def large_leaves() -> st.SearchStrategy[Any]:
    sizes = _store_sizes()
    arrays = st.builds(
        lambda dtype, n, layout: tw.Arr(dtype, n // ITEMSIZE[dtype], layout),
        st.sampled_from(tuple(ITEMSIZE)),
        sizes,
        st.sampled_from(("c", "f", "strided")),  # a strided array is pickled in-band: one large frame
    )
    return st.one_of(st.builds(tw.Blob, sizes, st.sampled_from(("bytes", "str", "utf8"))), arrays)


def large_values(n_actors: int, low: int) -> st.SearchStrategy[Any]:
    """A large leaf as it is, in a container with a small one, in a put, or as another call's result."""
    leaf = large_leaves()
    small = st.one_of(st.none(), st.integers(0, 9))
    branches = [
        leaf,
        leaf,
        st.builds(tw.Coll, st.sampled_from(("list", "tuple", "dict")), st.tuples(leaf, small)),
        st.builds(tw.Put, leaf),
    ]
    if low < n_actors:
        branches.append(st.integers(low, n_actors - 1).flatmap(lambda k: st.builds(tw.Result, st.just(k), leaf)))
    return st.one_of(branches)


def large_ops(n_actors: int, faults: bool) -> st.SearchStrategy[Any]:
    actor = st.integers(0, n_actors - 1)
    echo = actor.flatmap(lambda a: st.builds(tw.Echo, st.just(a), large_values(n_actors, a + 1), st.booleans(), st.booleans()))
    stream = actor.flatmap(lambda a: st.builds(tw.Stream, st.just(a), st.integers(2, 3), large_values(n_actors, a + 1)))
    choices = [echo, echo, stream, st.builds(tw.Collect, st.sampled_from(tw.HOWS))]
    if n_actors > 1:
        choices.append(
            st.integers(0, n_actors - 2).flatmap(
                lambda a: st.builds(
                    tw.Relay, st.just(a), st.integers(a + 1, n_actors - 1), large_values(n_actors, a + 1), st.sampled_from(tw.HOWS)
                )
            )
        )
    if faults:
        choices += [st.builds(tw.Crash, actor), st.builds(tw.Kill, actor)]
    return st.one_of(choices)


@st.composite
def large_workloads(draw: st.DrawFn, *, drivers: int = 1, threads: int = 1, faults: bool = False) -> tw.Workload:
    n_actors = draw(st.integers(1, 3))
    restarts = st.sampled_from((0, 1, -1)) if faults else st.just(0)
    retries = st.sampled_from((0, 1, -1)) if faults else st.just(0)
    actors = tuple(draw(st.builds(tw.ActorSpec, st.sampled_from(tw.KINDS), restarts, retries)) for _ in range(n_actors))
    callers = []
    for _ in range(draw(st.integers(1, threads))):
        steps = tuple(draw(st.lists(large_ops(n_actors, faults), min_size=1, max_size=3)))
        callers.append(tw.Caller(steps, draw(st.integers(0, drivers - 1)), draw(st.sampled_from(tw.HOWS))))
    return tw.Workload(actors, tuple(callers))


def large_task_values() -> st.SearchStrategy[Any]:
    leaf = large_leaves()
    pair = st.builds(tw.Coll, st.sampled_from(("list", "tuple")), st.tuples(leaf, st.none()))
    return st.one_of(leaf, leaf, pair, st.builds(tw.Put, leaf))


def large_task_ops(spread: bool) -> st.SearchStrategy[Any]:
    opts = st.builds(tt.Opts, st.sampled_from((0, 1, 3)), st.just(False), st.booleans() if spread else st.just(False))
    link = st.builds(tt.Link, st.sampled_from(("top", "nested")), st.sampled_from(("", "", "raise_once", "exit_once")), opts)
    return st.one_of(
        st.builds(tt.Chain, st.lists(link, min_size=1, max_size=3).map(tuple), large_task_values()),
        st.builds(tt.Fan, st.integers(1, 3), st.sampled_from(("wait", "top", "nested")), large_task_values(), opts),
        st.builds(tt.Stream, st.integers(1, 3), st.integers(0, 3), st.none(), st.sampled_from((None, 1)), large_task_values()),
        st.builds(tt.Nest, st.just(1), st.integers(1, 2), large_task_values(), st.sampled_from(("get", "wait")), opts),
        st.builds(Collect, st.sampled_from(tw.HOWS)),
    )


@st.composite
def large_task_workloads(draw: st.DrawFn, *, drivers: int = 1, threads: int = 1, spread: bool = False) -> tt.TaskWorkload:
    callers = []
    for _ in range(draw(st.integers(1, threads))):
        steps = tuple(draw(st.lists(large_task_ops(spread), min_size=1, max_size=3)))
        callers.append(tw.Caller(steps, draw(st.integers(0, drivers - 1)), draw(st.sampled_from(tw.HOWS))))
    return tt.TaskWorkload(tuple(callers))


def explore(strategy: st.SearchStrategy[Any], play: Any, examples: int, fixed_seed: int) -> None:
    """Play ``examples`` drawn workloads (a fixed seed: the same ones each run); a failure is shrunk and printed."""

    def check(w: Any) -> None:
        note(w.to_python() if isinstance(w, tw.Workload) else repr(w))
        assume(w.nbytes() <= MAX_BYTES)
        play(w)

    faulthandler.cancel_dump_traceback_later()  # see test_torture.explore
    prop = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=HEALTH,
    )(given(strategy)(check))
    seed(fixed_seed)(prop)()


@pytest.mark.timeout(300)
def test_torture_large_values_on_one_host(local: None, isolated_run_dir: Path, tmp_path: Path) -> None:
    """Actor workloads (echoes, relays, puts, results as arguments) and task workloads with values around the
    threshold and up to a few MiB, on an embedded node: every value checked, every segment freed at the end."""

    def play_actors(w: tw.Workload) -> None:
        tw.play(w, run_dir=str(isolated_run_dir), scratch=Path(tempfile.mkdtemp(prefix="w", dir=tmp_path)), seconds=30)

    def play_tasks(w: tt.TaskWorkload) -> None:
        tt.play(w, scratch=Path(tempfile.mkdtemp(prefix="t", dir=tmp_path)), seconds=30)

    explore(large_workloads(threads=2), play_actors, examples=8, fixed_seed=21)
    explore(large_task_workloads(threads=2), play_tasks, examples=5, fixed_seed=22)


@pytest.mark.timeout(300)
def test_torture_large_values_across_a_three_node_mesh(tmp_path: Path) -> None:
    """The same across a 3-node mesh (actors and tasks SPREAD, a second driver on another node, kills and crashes),
    with small chunks so that each value crosses chunk boundaries; every node's store empty at the end."""
    with LocalCluster(nodes=3, num_cpus=4, config={"transfer_chunk": 256 * 1024}) as cluster:
        cluster.connect()
        statuses = [lambda i=i: cluster.status(i) for i in range(3)]
        tw.MESH_ADDRESSES[:] = tt.MESH_ADDRESSES[:] = cluster.addresses
        tw.STORES[:] = tt.STATUS[:] = statuses
        try:

            def play_actors(w: tw.Workload) -> None:
                scratch = Path(tempfile.mkdtemp(prefix="w", dir=tmp_path))
                tw.play(w, run_dir=cluster.run_dir, scratch=scratch, seconds=30)

            def play_tasks(w: tt.TaskWorkload) -> None:
                tt.play(w, scratch=Path(tempfile.mkdtemp(prefix="t", dir=tmp_path)), seconds=30)

            explore(large_workloads(drivers=2, threads=2, faults=True), play_actors, examples=6, fixed_seed=23)
            explore(large_task_workloads(drivers=2, threads=2, spread=True), play_tasks, examples=4, fixed_seed=24)
        finally:
            tw.MESH_ADDRESSES.clear()
            tt.MESH_ADDRESSES.clear()
            tw.STORES.clear()
            tt.STATUS.clear()
