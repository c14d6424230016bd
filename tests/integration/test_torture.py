"""Torture test: hypothesis draws whole workloads (values, callers, drivers, actor kinds, faults) and checks every call end to end."""

from __future__ import annotations

import faulthandler
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torture_workloads as tw
import zmq
from hypothesis import HealthCheck, Phase, assume, example, given, note, seed, settings
from hypothesis import strategies as st
from torture_workloads import ActorSpec, Arr, Caller, Coll, Crash, Echo, Kill, Put, Relay, Result, Stream, Workload

from zmesh.testing import LocalCluster, NodeProcess

# `make torture MINUTES=N` sets this: fresh seeds for N minutes instead of the fixed CI examples.
TORTURE_MINUTES = float(os.environ.get("ZMESH_TORTURE_MINUTES") or 0)
TESTS = 5  # the torture time is shared evenly among the tests below
WORKLOAD_SECONDS = 60 if TORTURE_MINUTES else 15  # every call of one workload ends within this, or it counts as a hang
MAX_BYTES = 160 * 2**20  # what one workload's values may take at once (a rough bound, see Workload.nbytes)
MAX_CALLS = 5000
# CI: the test fails if no answer comes; a failing run gets time to shrink (hypothesis gives up shrinking after 5 minutes).
TIMEOUT = 0 if TORTURE_MINUTES else 900

# Sizes just below, at and above each limit in the code: small atoms and containers
# (transport/serialization.py), frames sent inside the batch header (protocol._INLINE_LIMIT),
# out-of-band buffers and zero-copy frames (serialization._OOB_THRESHOLD, sockets._COPY_LIMIT).
THRESHOLDS = (1024, 8 * 1024, 64 * 1024)
EDGES = tuple(t + d for t in THRESHOLDS for d in (-1, 0, 1))
# Rare: megabytes up to tens of them (16 MiB is also the header limit, protocol.MAX_HEADER_BYTES).
BIG = (2**20, 16 * 2**20 - 1, 16 * 2**20, 16 * 2**20 + 1, 24 * 2**20)
DTYPES = ("uint8", "int16", "int32", "int64", "float32", "float64", "complex128", "bool")
ITEMSIZE = {"uint8": 1, "bool": 1, "int16": 2, "int32": 4, "float32": 4, "int64": 8, "float64": 8, "complex128": 16}
STREAM_COUNTS = (2, 63, 64, 65, 511, 512, 513, 1024, 2000, MAX_CALLS)  # around the 512-call batch limit


def sizes(limit: str) -> st.SearchStrategy[int]:
    """Byte sizes up to ``limit``: "tiny" (small atoms), "mid" (inline frames), "small" (out-of-band) or "all" (megabytes too)."""
    top = {"tiny": 1, "mid": 2, "small": 3, "all": 3}[limit]
    edges = st.sampled_from([e for e in EDGES if e <= THRESHOLDS[top - 1] + 1])
    # The frame that carries a value is a little larger than the value: land on either side of each limit.
    near = st.tuples(st.sampled_from(THRESHOLDS[:top]), st.integers(-80, 80)).map(sum)
    choices = [st.integers(0, 100)] * 6 + [edges] * 4 + [near] * 3
    if limit == "all":
        choices.append(st.sampled_from(BIG))
    return st.one_of(choices)


def leaves(n_actors: int, limit: str) -> st.SearchStrategy[Any]:
    nbytes = sizes(limit)
    arrays = st.builds(
        lambda dtype, size, delta, layout: tw.Arr(dtype, max(0, size // ITEMSIZE[dtype] + delta), layout),
        st.sampled_from(DTYPES),
        nbytes,
        st.sampled_from((0, -1, 1)),
        st.sampled_from(("c", "f", "strided")),
    )
    return st.one_of(
        st.none(),
        st.integers(-(2**70), 2**70),
        st.builds(tw.Blob, nbytes, st.sampled_from(("bytes", "str", "utf8"))),
        arrays,
        st.builds(tw.Handle, st.integers(0, n_actors - 1)),
    )


def values(n_actors: int, low: int, limit: str = "all", depth: int = 2) -> st.SearchStrategy[Any]:
    """Argument values; refs made by other calls go only to actors numbered ``low`` and up.

    An actor waits for the refs in its arguments; sending it refs made by lower-numbered actors only
    keeps every wait pointing up, so no workload can deadlock the way a cycle of blocking gets would.
    """
    base = leaves(n_actors, limit)
    if depth == 0:
        return base
    inner = values(n_actors, low, limit, depth - 1)
    branches = [
        base,
        base,
        st.builds(
            tw.Coll,
            st.sampled_from(("list", "tuple", "dict")),
            st.lists(inner, max_size=3).map(tuple),
            st.sampled_from((0, 0, 62, 63, 64, 65)),
        ),
        # zmesh.put of a ref is refused (as in Ray): a put holds a value or a container.
        st.builds(tw.Put, inner.filter(lambda v: not isinstance(v, tw.Put | tw.Result))),
    ]
    if low < n_actors:
        branches.append(
            st.integers(low, n_actors - 1).flatmap(lambda k: st.builds(tw.Result, st.just(k), values(n_actors, k + 1, limit, depth - 1)))
        )
    return st.one_of(branches)


def ops(n_actors: int, faults: bool) -> st.SearchStrategy[Any]:
    actor = st.integers(0, n_actors - 1)
    echo = actor.flatmap(lambda a: st.builds(tw.Echo, st.just(a), values(n_actors, a + 1), st.booleans(), st.booleans()))
    counts = st.one_of(st.integers(1, 20), st.sampled_from(STREAM_COUNTS))
    # Many calls carry small values, so a stream of thousands stays a few megabytes.
    stream = st.tuples(actor, counts).flatmap(
        lambda ac: st.builds(
            tw.Stream,
            st.just(ac[0]),
            st.just(ac[1]),
            values(n_actors, ac[0] + 1, "small" if ac[1] <= 100 else "mid" if ac[1] <= 1024 else "tiny", 1),
        )
    )
    choices = [echo, echo, echo, stream, st.builds(tw.Collect, st.sampled_from(tw.HOWS)), st.builds(tw.Raise, actor)]
    if n_actors > 1:
        choices.append(
            st.integers(0, n_actors - 2).flatmap(
                lambda a: st.builds(
                    tw.Relay, st.just(a), st.integers(a + 1, n_actors - 1), values(n_actors, a + 1), st.sampled_from(tw.HOWS)
                )
            )
        )
    if faults:
        choices += [st.builds(tw.Crash, actor), st.builds(tw.Kill, actor)]
    return st.one_of(choices)


@st.composite
def workloads(
    draw: st.DrawFn, *, drivers: int = 1, threads: int = 1, faults: bool = False, max_actors: int = 3, max_ops: int = 5
) -> tw.Workload:
    n_actors = draw(st.integers(1, max_actors))
    restarts = st.sampled_from((0, 1, 2, -1)) if faults else st.just(0)
    retries = st.sampled_from((0, 1, -1)) if faults else st.just(0)
    actors = tuple(draw(st.builds(tw.ActorSpec, st.sampled_from(tw.KINDS), restarts, retries)) for _ in range(n_actors))
    budget = MAX_CALLS
    callers = []
    for _ in range(draw(st.integers(1, threads))):
        driver = draw(st.integers(0, drivers - 1))
        steps = []
        for op in draw(st.lists(ops(n_actors, faults), min_size=1, max_size=max_ops)):
            if isinstance(op, tw.Stream):
                if budget < 1:
                    continue
                op = tw.Stream(op.actor, min(op.count, budget), op.value)  # at most MAX_CALLS calls in one workload
                budget -= op.count
            steps.append(op)
        callers.append(tw.Caller(tuple(steps), driver, draw(st.sampled_from(tw.HOWS))))
    return tw.Workload(actors, tuple(callers))


# Workloads that found bugs, replayed first in CI so that none comes back (shrunk as the test printed them).
SEQ, THREADED, ASYNC = ActorSpec("sequential"), ActorSpec("threaded"), ActorSpec("async")
FOUND_LOCAL = (
    # get raised the error stored for a failed call, whose traceback then kept the caller's refs (driver and worker).
    Workload((SEQ,), (Caller((Echo(0), Echo(0), Echo(0), Crash(0))),)),
    Workload((SEQ, SEQ, SEQ), (Caller((Relay(0, 1), Echo(0), Crash(1))),)),
    # A worker replaced while it was still starting left its IPC socket file behind.
    Workload((ActorSpec("sequential", -1),), (Caller((Echo(0), Kill(0), Kill(0), Echo(0))),)),
    # A threaded actor's calls with ref arguments hung (borrows settled by another thread).
    Workload((THREADED,), (Caller(tuple(Echo(0, Put(k)) for k in range(5))),)),
    # An async actor: a call with a nested ref, then one with a top-level ref; the first never ended.
    Workload((ASYNC,), (Caller((Echo(0, Coll("list", (Put(None),))), Echo(0, Put(None)))),)),
    # A threaded actor unpickling its first numpy arguments on two threads at once: _DeadlockError on numpy's import.
    Workload((THREADED,), (Caller((Echo(0, Arr("uint8", 0)), Echo(0, Arr("uint8", 2, "strided")))),)),
)
FOUND_DRIVERS = (
    # A failed result passed by a second driver to a threaded actor: the worker raised the fetched error, whose
    # traceback cycle kept the call's refs until a collection an idle worker never ran; the driver kept the result.
    Workload((SEQ, THREADED), (Caller((Crash(0), Echo(1, Result(0, None)), Echo(1, Result(0, None))), driver=1),)),
)

FOUND_MESH = (
    # zmesh.kill(no_restart=False) of a restartable actor still being placed on another node buried it (Ray restarts it).
    Workload(
        (ActorSpec("async", -1, 1),),
        (Caller((Kill(0), Crash(0), Stream(0, 65, Arr("int16", 10, "f")), Crash(0)), finish="wait"),),
    ),
)


@pytest.fixture(scope="module", autouse=True)
def pyzmq_garbage_collector() -> None:
    """Make pyzmq set up its garbage collector before the per-test leak check takes its snapshot.

    The first zero-copy send of a large frame in a process starts pyzmq's collector thread, with a
    ZeroMQ context and a socket of its own, kept for the life of the process; the leak check would
    blame whichever test sends first. One such send here, on a private inproc pair, does it up front.
    """
    ctx = zmq.Context()
    sender, receiver = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    receiver.bind("inproc://warm-up")
    sender.connect("inproc://warm-up")
    sender.send(bytes(128 * 1024), copy=False)
    receiver.recv()
    sender.close(linger=0)
    receiver.close(linger=0)
    ctx.term()


HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture]


def explore(
    strategy: st.SearchStrategy[tw.Workload],
    run_dir: Path,
    scratch: Path,
    *,
    examples: int,
    fixed_seed: int,
    found: tuple[tw.Workload, ...] = (),
) -> None:
    """Play drawn workloads: ``examples`` fixed ones in CI, or fresh ones until this test's share of the torture time is spent."""

    def check(w: tw.Workload) -> None:
        # The script is printed with the shrunk failing example: a reproducer that needs nothing but zmesh.
        note(w.to_python())
        assume(w.nbytes() <= MAX_BYTES)
        tw.play(w, run_dir=str(run_dir), scratch=Path(tempfile.mkdtemp(prefix="w", dir=scratch)), seconds=WORKLOAD_SECONDS)

    phases = (Phase.explicit, Phase.generate, Phase.shrink)  # no explain phase: it replays costly examples many times
    # pytest's faulthandler_timeout would dump the stacks of a healthy long run, and a dump of threads that run
    # meanwhile can crash the interpreter (faulthandler reads their frames without the GIL): a CI run died of it.
    # pytest-timeout still bounds the test.
    faulthandler.cancel_dump_traceback_later()
    if not TORTURE_MINUTES:
        prop = given(strategy)(check)
        for w in found:
            prop = example(w)(prop)
        prop = settings(max_examples=examples, deadline=None, database=None, phases=phases, suppress_health_check=HEALTH)(prop)
        seed(fixed_seed)(prop)()
        return
    stop = time.monotonic() + TORTURE_MINUTES * 60 / TESTS
    while time.monotonic() < stop:
        # Each round is a full hypothesis run with a fresh seed; a failure is shrunk and printed with its script.
        chunk = settings(max_examples=20, deadline=None, database=None, phases=phases, suppress_health_check=HEALTH, print_blob=True)
        chunk(given(strategy)(check))()


@pytest.mark.timeout(TIMEOUT)
def test_values_round_trip(local: None, isolated_run_dir: Path, tmp_path: Path) -> None:
    """One caller, no faults: every value shape and size comes back equal, refs and handles included."""
    explore(workloads(max_actors=3, max_ops=6), isolated_run_dir, tmp_path, examples=50, fixed_seed=1)


@pytest.mark.timeout(TIMEOUT)
def test_threads_streams_and_relays(local: None, isolated_run_dir: Path, tmp_path: Path) -> None:
    """Up to 8 caller threads, thousands of calls in flight, actors calling actors; order kept per caller."""
    explore(workloads(threads=8, max_actors=4, max_ops=4), isolated_run_dir, tmp_path, examples=30, fixed_seed=2)


@pytest.mark.timeout(TIMEOUT)
def test_faults(local: None, isolated_run_dir: Path, tmp_path: Path) -> None:
    """Kills, crashing and raising methods, with and without restarts and retries: every call ends with its value or the right error."""
    explore(
        workloads(threads=3, faults=True, max_actors=3, max_ops=5), isolated_run_dir, tmp_path, examples=40, fixed_seed=3, found=FOUND_LOCAL
    )


@pytest.mark.timeout(TIMEOUT)
def test_several_drivers(driver: NodeProcess, isolated_run_dir: Path, tmp_path: Path) -> None:
    """Everything at once on a `zmesh node` daemon, from up to three driver processes."""
    explore(
        workloads(drivers=3, threads=8, faults=True, max_actors=3, max_ops=4),
        isolated_run_dir,
        tmp_path,
        examples=16,
        fixed_seed=4,
        found=FOUND_DRIVERS,
    )


@pytest.mark.timeout(TIMEOUT)
def test_across_a_three_node_mesh(isolated_run_dir: Path, tmp_path: Path) -> None:
    """The same workloads with actors spread over a 3-node LocalCluster and drivers on different nodes."""
    with LocalCluster(nodes=3, num_cpus=4) as cluster:
        cluster.connect()
        tw.MESH_ADDRESSES[:] = cluster.addresses
        try:
            explore(
                workloads(drivers=2, threads=4, faults=True, max_actors=3, max_ops=4),
                Path(cluster.run_dir),
                tmp_path,
                examples=24,
                fixed_seed=5,
                found=FOUND_MESH,
            )
        finally:
            tw.MESH_ADDRESSES.clear()
