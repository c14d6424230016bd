"""Benchmark zmesh against Ray on the same actor and task workloads.

Usage::

    python benchmarks/bench.py [--backends zmesh,ray] [--quick] [--only big_argument,payload_sweep]

Each backend runs in fresh subprocesses of this script (``--worker BACKEND``
for the workloads, then ``--rss BACKEND`` for the daemon-memory figure), which
print one JSON report on their last stdout line. The parent collects the
reports and prints one table: a row per metric, a column per backend and a
ratio oriented so that a value above 1 means zmesh is better.

Both backends are driven through the same Ray-style API (``remote``, ``get``,
``put``, ``kill``, ``init``, ``shutdown``); only ``init`` and the daemon-memory
probe differ. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import importlib.util
import itertools
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("zmesh", "ray")
BIG_ARG_BYTES = 100 * 10**6
SMALL_VALUE = b"x" * 100
STOP_GRACE_S = 10.0
DAEMON_START_TIMEOUT_S = 30.0
RSS_ACTORS = 10
# Keeps Ray on the loopback interface (its single-machine mode) and stops it
# from reporting usage statistics over the network.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
NOT_INSTALLED = "not installed"
RSS_NOTES = {
    "zmesh": "standalone `python -m zmesh node` process only",
    "ray": "raylet + gcs_server of a local session",
}

Report = dict[str, Any]


class BenchError(Exception):
    """A benchmark subprocess failed; the message says how."""


class Skipped(Exception):
    """A workload gave up on some of its metrics (too slow on this backend); it keeps the ones it has."""

    def __init__(self, metrics: dict[str, float], skipped: dict[str, str]) -> None:
        super().__init__("; ".join(skipped.values()))
        self.metrics = metrics
        self.skipped = skipped


@dataclass(frozen=True)
class Sizes:
    """Operation counts and time limits for one run."""

    actors: int
    sync_calls: int
    warmup_calls: int
    pipelined_calls: int
    put_gets: int
    big_arg_reps: int
    # Calls passing one put 100 MB ref: each costs a round trip or two, not a copy, so many more of them.
    big_ref_reps: int
    # The payload sweep's calls per size are PAYLOAD_SWEEP's counts divided by this.
    sweep_divisor: int
    workload_timeout_s: int
    child_timeout_s: int
    task_sync: int
    task_pipelined: int
    # Tasks submitted at once; a backend that has not finished them after ``task_burst_limit_s`` is skipped for the finish.
    task_burst: int
    task_burst_limit_s: int


FULL = Sizes(
    actors=50,
    sync_calls=2000,
    warmup_calls=100,
    pipelined_calls=10_000,
    put_gets=5000,
    big_arg_reps=10,
    big_ref_reps=200,
    sweep_divisor=1,
    workload_timeout_s=60,
    child_timeout_s=480,
    task_sync=2000,
    task_pipelined=10_000,
    task_burst=100_000,
    task_burst_limit_s=150,
)
QUICK = Sizes(
    actors=5,
    sync_calls=200,
    warmup_calls=10,
    pipelined_calls=1000,
    put_gets=500,
    big_arg_reps=1,
    big_ref_reps=20,
    sweep_divisor=10,
    workload_timeout_s=30,
    child_timeout_s=240,
    task_sync=200,
    task_pipelined=1000,
    task_burst=10_000,
    task_burst_limit_s=60,
)


@dataclass(frozen=True)
class PayloadSize:
    """One step of the payload sweep: a bytes argument of ``nbytes``, passed ``calls`` times."""

    label: str
    nbytes: int
    calls: int

    @property
    def calls_metric(self) -> str:
        return f"1:1 pipelined {self.label} arg [calls/s]"

    @property
    def mbps_metric(self) -> str:
        return f"1:1 pipelined {self.label} arg [MB/s]"


# zmesh's default store_threshold (NodeConfig): from this many bytes a value goes into the node's shared memory.
STORE_THRESHOLD = 2**20
# Fewer calls for bigger sizes, so that each size takes about 1 s on zmesh; Ray's three small sizes take 5-10 s
# each on 2 cores, the whole sweep about 40 s (SWEEP_TIMEOUT_FACTOR gives it twice the workload deadline).
# The sizes around 1 MiB straddle the store threshold: one byte below it (sent through the socket) and at it
# (written into shared memory); a cliff there shows as a drop from "1 MiB - 1 B" to "1 MiB".
PAYLOAD_SWEEP = (
    PayloadSize("100 B", 100, 25_000),
    PayloadSize("10 KiB", 10 * 2**10, 15_000),
    PayloadSize("100 KiB", 100 * 2**10, 8000),
    PayloadSize("512 KiB", 512 * 2**10, 2000),
    PayloadSize("1 MiB - 1 B", STORE_THRESHOLD - 1, 1200),
    PayloadSize("1 MiB", STORE_THRESHOLD, 1200),
    PayloadSize("2 MiB", 2 * 2**20, 600),
    PayloadSize("10 MiB", 10 * 2**20, 120),
    PayloadSize("100 MiB", 100 * 2**20, 12),
)
SWEEP_TIMEOUT_FACTOR = 2
# Calls in flight at once are capped at this many argument bytes, so that a big size
# does not queue gigabytes in the caller; 64 MiB still keeps several 10 MiB calls in flight.
SWEEP_WINDOW_BYTES = 64 * 2**20
# ... but never fewer calls than this: with one call in flight, passing the next argument never overlaps running the last.
SWEEP_MIN_WINDOW = 2
# A size's MB/s may fall to this fraction of the next smaller size's before it counts as a cliff (noise).
CLIFF_TOLERANCE = 0.8


@dataclass(frozen=True)
class Metric:
    """A table row; ``higher_is_better`` orients the ratio column."""

    name: str
    higher_is_better: bool


BIG_REF_METRIC = "100 MB put once, passed by ref [GB/s]"
METRICS = (
    Metric("import time [s]", higher_is_better=False),
    Metric("init() time [s]", higher_is_better=False),
    Metric("actor creation [actors/s]", higher_is_better=True),
    Metric("1:1 sync calls [calls/s]", higher_is_better=True),
    Metric("1:1 sync p50 [us]", higher_is_better=False),
    Metric("1:1 sync p99 [us]", higher_is_better=False),
    Metric("1:1 pipelined calls [calls/s]", higher_is_better=True),
    Metric("1:4 pipelined calls [calls/s]", higher_is_better=True),
    Metric("async actor pipelined [calls/s]", higher_is_better=True),
    Metric("put/get small [ops/s]", higher_is_better=True),
    Metric("100 MB argument [GB/s]", higher_is_better=True),
    Metric(BIG_REF_METRIC, higher_is_better=True),
    *(Metric(name, higher_is_better=True) for size in PAYLOAD_SWEEP for name in (size.calls_metric, size.mbps_metric)),
    Metric("tasks sync [tasks/s]", higher_is_better=True),
    Metric("tasks pipelined [tasks/s]", higher_is_better=True),
    Metric("1,000-item stream [items/s]", higher_is_better=True),
    Metric("tasks at once: submit [s]", higher_is_better=False),
    Metric("tasks at once: all done [s]", higher_is_better=False),
    Metric("tasks at once: driver RSS [MB]", higher_is_better=False),
    Metric("node daemon RSS [MB]", higher_is_better=False),
)
# The task burst's driver RSS should stay under this (the target), whatever the count.
TASK_BURST_RSS_MB = 200
RSS_BEFORE_BURST = "tasks at once: driver RSS before [MB]"


# --------------------------------------------------------------------------
# Actor classes (wrapped with the backend's ``remote`` inside the worker)
# --------------------------------------------------------------------------


class Pinger:
    """Trivial actor: answers pings and measures arguments."""

    def ping(self) -> int:
        return 1

    def size(self, payload: Any) -> int:
        return len(payload)

    def peek(self, payload: Any) -> int:
        """Its length and its first elements: proves the data is there without reading all of it."""
        return len(payload) + int(sum(payload[:4]))


class AsyncPinger:
    """Trivial actor whose method is a coroutine (an async actor)."""

    async def ping(self) -> int:
        return 1


def noop() -> int:
    """A task that does nothing: what the task rows measure is the cost of a task itself."""
    return 1


# --------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------


def _stop_process_group(proc: subprocess.Popen[Any], grace_s: float) -> None:
    """SIGTERM ``proc``, wait up to ``grace_s``, then SIGKILL its whole group.

    ``proc`` must have been started with ``start_new_session=True``.
    """
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(log: IO[bytes], lines: int = 20) -> str:
    log.seek(0)
    return "\n".join(log.read().decode(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------
# Workloads (run inside ``--worker`` subprocesses)
# --------------------------------------------------------------------------


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


def _ready_actors(mod: ModuleType, cls: type, count: int) -> list[Any]:
    """Create ``count`` actors of ``cls`` and wait until each has answered."""
    actors = [mod.remote(cls).remote() for _ in range(count)]
    _expect(mod.get([a.ping.remote() for a in actors]) == [1] * count, "bad ping")
    return actors


def _kill_all(mod: ModuleType, actors: list[Any]) -> None:
    for actor in actors:
        mod.kill(actor)


def _pipelined_rate(mod: ModuleType, actors: list[Any], calls: int) -> float:
    """Submit ``calls`` pings round-robin over ``actors``, then get them all."""
    start = time.perf_counter()
    refs = [actors[i % len(actors)].ping.remote() for i in range(calls)]
    results = mod.get(refs)
    elapsed = time.perf_counter() - start
    _expect(sum(results) == calls, "lost pipelined results")
    return calls / elapsed


def bench_actor_creation(mod: ModuleType, sizes: Sizes) -> dict[str, float]:
    start = time.perf_counter()
    actors = _ready_actors(mod, Pinger, sizes.actors)
    elapsed = time.perf_counter() - start
    _kill_all(mod, actors)
    return {"actor creation [actors/s]": sizes.actors / elapsed}


def bench_sync_calls(mod: ModuleType, sizes: Sizes) -> dict[str, float]:
    (actor,) = _ready_actors(mod, Pinger, 1)
    for _ in range(sizes.warmup_calls):
        mod.get(actor.ping.remote())
    latencies_ns = []
    start = time.perf_counter()
    for _ in range(sizes.sync_calls):
        call_start = time.perf_counter_ns()
        mod.get(actor.ping.remote())
        latencies_ns.append(time.perf_counter_ns() - call_start)
    elapsed = time.perf_counter() - start
    _kill_all(mod, [actor])
    percentiles = statistics.quantiles(latencies_ns, n=100)
    return {
        "1:1 sync calls [calls/s]": sizes.sync_calls / elapsed,
        "1:1 sync p50 [us]": percentiles[49] / 1000,
        "1:1 sync p99 [us]": percentiles[98] / 1000,
    }


def bench_pipelined_1_1(mod: ModuleType, sizes: Sizes) -> dict[str, float]:
    actors = _ready_actors(mod, Pinger, 1)
    rate = _pipelined_rate(mod, actors, sizes.pipelined_calls)
    _kill_all(mod, actors)
    return {"1:1 pipelined calls [calls/s]": rate}


def bench_pipelined_1_4(mod: ModuleType, sizes: Sizes) -> dict[str, float]:
    actors = _ready_actors(mod, Pinger, 4)
    rate = _pipelined_rate(mod, actors, sizes.pipelined_calls)
    _kill_all(mod, actors)
    return {"1:4 pipelined calls [calls/s]": rate}


def bench_async_actor(mod: ModuleType, sizes: Sizes) -> dict[str, float]:
    actors = _ready_actors(mod, AsyncPinger, 1)
    rate = _pipelined_rate(mod, actors, sizes.pipelined_calls)
    _kill_all(mod, actors)
    return {"async actor pipelined [calls/s]": rate}


def bench_put_get(mod: ModuleType, sizes: Sizes) -> dict[str, float]:
    start = time.perf_counter()
    for _ in range(sizes.put_gets):
        mod.get(mod.put(SMALL_VALUE))
    elapsed = time.perf_counter() - start
    return {"put/get small [ops/s]": sizes.put_gets / elapsed}


def _payload_kind() -> str:
    return "numpy" if importlib.util.find_spec("numpy") else "bytes"


def _big_payload() -> Any:
    if _payload_kind() == "numpy":
        import numpy as np

        return np.ones(BIG_ARG_BYTES, dtype=np.uint8)
    return b"\x01" * BIG_ARG_BYTES


# What Pinger.peek answers for the big payload (100 MB of ones).
BIG_PEEK = BIG_ARG_BYTES + 4


def _big_calls_rate(mod: ModuleType, actor: Any, arg: Any, reps: int) -> float:
    """``get(actor.peek.remote(arg))`` ``reps`` times, one after another, after one warm-up; GB/s of the 100 MB.

    From the median call: a burst of another process's work on this shared machine slows a few calls, not the figure.
    """
    _expect(mod.get(actor.peek.remote(arg)) == BIG_PEEK, "bad peek")
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        _expect(mod.get(actor.peek.remote(arg)) == BIG_PEEK, "bad peek")
        times.append(time.perf_counter() - start)
    return BIG_ARG_BYTES / statistics.median(times) / 1e9


def bench_big_argument(mod: ModuleType, sizes: Sizes) -> dict[str, float]:
    """A 100 MB array passed by value (each call copies it once, into the store), then put once and passed by ref."""
    (actor,) = _ready_actors(mod, Pinger, 1)
    payload = _big_payload()
    by_value = _big_calls_rate(mod, actor, payload, sizes.big_arg_reps)
    ref = mod.put(payload)
    by_ref = _big_calls_rate(mod, actor, ref, sizes.big_ref_reps)
    del ref
    _kill_all(mod, [actor])
    return {"100 MB argument [GB/s]": by_value, BIG_REF_METRIC: by_ref}


def _sweep_rate(mod: ModuleType, actor: Any, payload: bytes, calls: int) -> float:
    """Pass ``payload`` ``calls`` times, at most SWEEP_WINDOW_BYTES in flight; calls per second."""
    window = max(SWEEP_MIN_WINDOW, SWEEP_WINDOW_BYTES // len(payload))
    start = time.perf_counter()
    done = 0
    while done < calls:
        batch = min(window, calls - done)
        sizes = mod.get([actor.size.remote(payload) for _ in range(batch)])
        _expect(sizes == [len(payload)] * batch, "bad size")
        done += batch
    return calls / (time.perf_counter() - start)


def bench_payload_sweep(mod: ModuleType, sizes: Sizes) -> dict[str, float]:
    """1:1 pipelined calls with a bytes argument of each PAYLOAD_SWEEP size; the method returns only ``len``."""
    (actor,) = _ready_actors(mod, Pinger, 1)
    metrics = {}
    for size in PAYLOAD_SWEEP:
        payload = b"\x01" * size.nbytes
        calls = max(1, size.calls // sizes.sweep_divisor)
        # Warm-up: the first calls of a size pay for buffers (and Ray's object store) growing.
        _sweep_rate(mod, actor, payload, max(1, calls // 20))
        rate = _sweep_rate(mod, actor, payload, calls)
        metrics[size.calls_metric] = rate
        metrics[size.mbps_metric] = rate * size.nbytes / 1e6
    _kill_all(mod, [actor])
    return metrics


def _remote_noop(mod: ModuleType) -> Any:
    """``noop`` as a remote function of ``mod``, its workers started: the first tasks pay for them."""
    fn = mod.remote(noop)
    _expect(sum(mod.get([fn.remote() for _ in range(20)])) == 20, "bad warm-up task")
    return fn


def bench_task_sync(mod: ModuleType, sizes: Sizes) -> dict[str, float]:
    fn = _remote_noop(mod)
    for _ in range(sizes.warmup_calls):
        mod.get(fn.remote())
    start = time.perf_counter()
    for _ in range(sizes.task_sync):
        mod.get(fn.remote())
    return {"tasks sync [tasks/s]": sizes.task_sync / (time.perf_counter() - start)}


def bench_task_pipelined(mod: ModuleType, sizes: Sizes) -> dict[str, float]:
    fn = _remote_noop(mod)
    start = time.perf_counter()
    results = mod.get([fn.remote() for _ in range(sizes.task_pipelined)])
    elapsed = time.perf_counter() - start
    _expect(sum(results) == sizes.task_pipelined, "lost task results")
    return {"tasks pipelined [tasks/s]": sizes.task_pipelined / elapsed}


def numbers(n: int) -> Iterator[int]:
    for i in range(n):  # noqa: UP028 - not ``yield from``: Ray 2.60's generator tasks cannot take it
        yield i


STREAM_ITEMS = 1000


def bench_stream(mod: ModuleType, sizes: Sizes) -> dict[str, float]:
    """A generator task of 1,000 small items, each taken as it comes (Ray 2.60 streams generator tasks too)."""
    gen = mod.remote(numbers)
    _expect([mod.get(r) for r in gen.remote(3)] == [0, 1, 2], "bad warm-up stream")
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        total = sum(mod.get(ref) for ref in gen.remote(STREAM_ITEMS))
        rates.append(STREAM_ITEMS / (time.perf_counter() - start))
        _expect(total == STREAM_ITEMS * (STREAM_ITEMS - 1) // 2, "lost stream items")
    return {"1,000-item stream [items/s]": sorted(rates)[1]}


def _rss_mb() -> float:
    import psutil

    rss: int = psutil.Process().memory_info().rss
    return rss / 1e6


def bench_task_burst(mod: ModuleType, sizes: Sizes) -> dict[str, float]:
    """``task_burst`` no-op tasks submitted at once: the time to submit, the time until all are done, driver RSS.

    The driver's RSS is its highest of right after submitting and right after the last result. A backend
    that has not finished after ``task_burst_limit_s`` keeps its submit time and RSS; its finish is skipped.
    """
    fn = _remote_noop(mod)
    before = _rss_mb()
    start = time.perf_counter()
    refs = [fn.remote() for _ in range(sizes.task_burst)]
    submitted = time.perf_counter() - start
    rss = _rss_mb()
    ready, pending = mod.wait(refs, num_returns=len(refs), timeout=sizes.task_burst_limit_s)
    done = time.perf_counter() - start
    rss = max(rss, _rss_mb())
    # The RSS before is not a table row: the footnote gives it, since earlier workloads may have grown the driver.
    metrics = {"tasks at once: submit [s]": submitted, "tasks at once: driver RSS [MB]": rss, RSS_BEFORE_BURST: before}
    if pending:
        reason = f"{len(ready):,} of {len(refs):,} tasks done after {sizes.task_burst_limit_s} s: not waited for"
        raise Skipped(metrics, {"tasks at once: all done [s]": reason})
    _expect(sum(mod.get(refs)) == sizes.task_burst, "lost task results")
    return {**metrics, "tasks at once: all done [s]": done}


Workload = Callable[[ModuleType, Sizes], dict[str, float]]
# Actor creation runs last: the teardown of its many actors would otherwise
# compete for CPU with the workloads after it.
WORKLOADS: tuple[Workload, ...] = (
    bench_sync_calls,
    bench_pipelined_1_1,
    bench_pipelined_1_4,
    bench_async_actor,
    bench_put_get,
    bench_big_argument,
    bench_payload_sweep,
    bench_task_sync,
    bench_task_pipelined,
    bench_stream,
    bench_actor_creation,
    # Last: a backend that does not finish its burst leaves the rest of it running.
    bench_task_burst,
)


def _workload_limit_s(workload: Workload, sizes: Sizes) -> int:
    if workload is bench_task_burst:
        return sizes.task_burst_limit_s + sizes.workload_timeout_s
    if workload is bench_payload_sweep:
        return sizes.workload_timeout_s * SWEEP_TIMEOUT_FACTOR
    return sizes.workload_timeout_s


# --------------------------------------------------------------------------
# Daemon memory (run inside ``--rss`` subprocesses)
# --------------------------------------------------------------------------


def _connect_to_daemon(zmesh: ModuleType, daemon: subprocess.Popen[Any], log: IO[bytes]) -> None:
    """Retry ``zmesh.init(address="auto")`` until the daemon accepts drivers."""
    deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
    while True:
        if daemon.poll() is not None:
            raise RuntimeError(f"zmesh node exited with {daemon.returncode}:\n{_tail(log)}")
        try:
            zmesh.init(address="auto")
        except Exception:
            zmesh.shutdown()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        else:
            return


def _zmesh_daemon_rss(actors: int) -> float:
    """RSS of a standalone ``zmesh node`` serving ``actors`` live actors, in MB."""
    import psutil

    with (
        tempfile.TemporaryDirectory(prefix="zmesh-bench-") as run_dir,
        tempfile.TemporaryFile() as log,
    ):
        os.environ["ZMESH_RUN_DIR"] = run_dir
        zmesh = importlib.import_module("zmesh")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "zmesh", "node", "--port", "0"],
            cwd=REPO_ROOT,
            env=os.environ.copy(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _connect_to_daemon(zmesh, daemon, log)
            try:
                _ready_actors(zmesh, Pinger, actors)
                rss: int = psutil.Process(daemon.pid).memory_info().rss
            finally:
                zmesh.shutdown()
        finally:
            _stop_process_group(daemon, STOP_GRACE_S)
    return rss / 1e6


def _ray_daemon_rss(actors: int) -> float:
    """Summed RSS of this session's raylet and gcs_server with live actors, in MB."""
    import psutil
    import ray

    ray.init(address="local")
    try:
        _ready_actors(ray, Pinger, actors)
        daemons = [p for p in psutil.Process().children(recursive=True) if p.name() in ("raylet", "gcs_server")]
        _expect(len(daemons) == 2, f"expected raylet and gcs_server, found {daemons}")
        rss: int = sum(p.memory_info().rss for p in daemons)
    finally:
        ray.shutdown()
    return rss / 1e6


# --------------------------------------------------------------------------
# Worker entry points
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Raise ``TimeoutError`` in the main thread if the block runs too long."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"exceeded {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _init_backend(backend: str, mod: ModuleType) -> None:
    if backend == "ray":
        # "local" always starts a fresh local instance, never joins one.
        mod.init(address="local")
    else:
        mod.init()


def _workload_name(workload: Workload) -> str:
    return workload.__name__.removeprefix("bench_")


# ``--only`` names workloads by these, and the daemon-memory probe by this one.
RSS_PROBE = "daemon_rss"


def _run_workloads(backend: str, sizes: Sizes, only: tuple[str, ...] = ()) -> Report:
    """Time import and ``init()``, then run every workload (those named in ``only``, if any); one report."""
    start = time.perf_counter()
    try:
        mod = importlib.import_module(backend)
    except ModuleNotFoundError as exc:
        if exc.name == backend:
            return {"status": NOT_INSTALLED}
        raise
    metrics = {"import time [s]": time.perf_counter() - start}
    start = time.perf_counter()
    _init_backend(backend, mod)
    metrics["init() time [s]"] = time.perf_counter() - start
    errors = {}
    skipped: dict[str, str] = {}
    try:
        for workload in WORKLOADS:
            if only and _workload_name(workload) not in only:
                continue
            try:
                with _deadline(_workload_limit_s(workload, sizes)):
                    metrics.update(workload(mod, sizes))
            except Skipped as exc:
                metrics.update(exc.metrics)
                skipped.update(exc.skipped)
            # One failing workload must not hide the others' figures.
            except Exception as exc:
                errors[workload.__name__] = f"{type(exc).__name__}: {exc}"
    finally:
        mod.shutdown()
    return {
        "status": "ok",
        "version": getattr(mod, "__version__", "unknown"),
        "payload": _payload_kind(),
        "metrics": metrics,
        "errors": errors,
        "skipped": skipped,
    }


def _run_rss(backend: str, sizes: Sizes) -> Report:
    """Measure the daemon-memory metric; one report."""
    probe = _zmesh_daemon_rss if backend == "zmesh" else _ray_daemon_rss
    with _deadline(sizes.workload_timeout_s):
        rss = probe(RSS_ACTORS)
    return {"status": "ok", "metrics": {"node daemon RSS [MB]": rss}}


# --------------------------------------------------------------------------
# Parent: subprocess management and the table
# --------------------------------------------------------------------------


@dataclass
class BackendResult:
    """Everything the table needs about one backend."""

    backend: str
    metrics: dict[str, float] = field(default_factory=dict)
    version: str = "unknown"
    payload: str = "?"
    unavailable: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it was not measured


def _become_subreaper() -> None:
    """Adopt orphaned descendants (Linux only) so ``_end_orphans`` can end them.

    Ray's workers start sessions of their own, so killing a child's process
    group does not reach them, and they may outlive the child.
    """
    if sys.platform == "linux":
        pr_set_child_subreaper = 36
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)


def _end_orphans(grace_s: float) -> None:
    """Terminate, then kill, every process still descending from this one."""
    import psutil

    leftovers = psutil.Process().children(recursive=True)
    for proc in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(leftovers, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def _child_env(backend: str, run_dir: str) -> dict[str, str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["ZMESH_RUN_DIR"] = run_dir
    # Nothing may be running for the child: never join an existing cluster.
    env.pop("ZMESH_ADDRESS", None)
    env.pop("RAY_ADDRESS", None)
    if backend == "ray":
        env.update(RAY_ENV)
    return env


def _run_child(mode: str, backend: str, quick: bool, only: tuple[str, ...] = ()) -> Report:
    """Run ``bench.py --MODE BACKEND`` in a fresh process; return its report."""
    sizes = QUICK if quick else FULL
    args = [sys.executable, str(Path(__file__).resolve()), f"--{mode}", backend]
    if quick:
        args.append("--quick")
    if only:
        args += ["--only", ",".join(only)]
    with (
        tempfile.TemporaryDirectory(prefix="zmesh-bench-") as run_dir,
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
    ):
        proc = subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            env=_child_env(backend, run_dir),
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        try:
            proc.wait(sizes.child_timeout_s)
        except subprocess.TimeoutExpired:
            raise BenchError(f"timed out after {sizes.child_timeout_s} s:\n{_tail(err)}") from None
        finally:
            _stop_process_group(proc, STOP_GRACE_S)
            _end_orphans(STOP_GRACE_S)
        lines = _tail(out, lines=1)
        if proc.returncode != 0 or not lines.startswith("{"):
            raise BenchError(f"exit status {proc.returncode}:\n{_tail(err)}")
        report: Report = json.loads(lines)
        return report


def _print_errors(backend: str, errors: dict[str, str]) -> None:
    for workload, message in errors.items():
        print(f"[{backend}] {workload} failed: {message}", flush=True)


def _bench_backend(backend: str, quick: bool, only: tuple[str, ...] = ()) -> BackendResult:
    """Run the workloads, then the daemon-memory probe, each in a fresh process (those in ``only``, if any)."""
    result = BackendResult(backend)
    print(f"[{backend}] running workloads ...", flush=True)
    try:
        report = _run_child("worker", backend, quick, only)
    except BenchError as exc:
        print(f"[{backend}] crashed: {exc}", flush=True)
        result.unavailable = "error"
        return result
    if report["status"] == NOT_INSTALLED:
        result.unavailable = NOT_INSTALLED
        return result
    result.metrics.update(report["metrics"])
    result.version = report["version"]
    result.payload = report["payload"]
    result.skipped = report.get("skipped", {})
    _print_errors(backend, report["errors"])
    for metric, reason in result.skipped.items():
        print(f"[{backend}] {metric} skipped: {reason}", flush=True)
    if only and RSS_PROBE not in only:
        return result
    print(f"[{backend}] measuring daemon RSS ...", flush=True)
    try:
        result.metrics.update(_run_child("rss", backend, quick)["metrics"])
    except BenchError as exc:
        print(f"[{backend}] daemon RSS probe crashed: {exc}", flush=True)
    return result


def _format_value(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _ratio(metric: Metric, zmesh: float | None, ray: float | None) -> str:
    if zmesh is None or ray is None or min(zmesh, ray) <= 0:
        return ""
    ratio = zmesh / ray if metric.higher_is_better else ray / zmesh
    return f"{ratio:.2f}x"


def _cell(result: BackendResult, metric: Metric) -> str:
    if result.unavailable:
        return result.unavailable
    value = result.metrics.get(metric.name)
    if value is None:
        return "skipped" if metric.name in result.skipped else "error"
    return _format_value(value)


def _table_rows(results: list[BackendResult], selected: bool = False) -> list[list[str]]:
    """One row per metric; with ``selected`` (``--only``), only the metrics some backend measured or skipped."""
    by_name = {r.backend: r for r in results}
    compare = "zmesh" in by_name and "ray" in by_name
    header = ["metric", *(r.backend for r in results)] + (["ratio"] if compare else [])
    rows = [header]
    for metric in METRICS:
        if selected and not any(metric.name in r.metrics or metric.name in r.skipped for r in results):
            continue
        row = [metric.name, *(_cell(r, metric) for r in results)]
        if compare:
            row.append(
                _ratio(
                    metric,
                    by_name["zmesh"].metrics.get(metric.name),
                    by_name["ray"].metrics.get(metric.name),
                )
            )
        rows.append(row)
    return rows


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        print("  ".join(cells).rstrip())
        if index == 0:
            print("  ".join("-" * w for w in widths))


def _cliff_warnings(result: BackendResult) -> list[str]:
    """The sweep sizes whose MB/s falls below CLIFF_TOLERANCE of the next smaller size's."""
    warnings = []
    for smaller, bigger in itertools.pairwise(PAYLOAD_SWEEP):
        low, high = result.metrics.get(smaller.mbps_metric), result.metrics.get(bigger.mbps_metric)
        if low is not None and high is not None and high < CLIFF_TOLERANCE * low:
            warnings.append(
                f"WARNING [{result.backend}] payload sweep: {bigger.label} gives {_format_value(high)} MB/s, "
                f"{high / low:.2f}x the {_format_value(low)} MB/s of {smaller.label} (a cliff: below {CLIFF_TOLERANCE}x)"
            )
    return warnings


def _print_cliff_check(results: list[BackendResult]) -> None:
    """Under the table: MB/s should hold or rise with the argument size; name each size where it drops."""
    print()
    for result in results:
        if not all(size.mbps_metric in result.metrics for size in PAYLOAD_SWEEP):
            continue
        warnings = _cliff_warnings(result)
        for line in warnings:
            print(line)
        if not warnings:
            print(f"[{result.backend}] payload sweep: no cliff (each size's MB/s >= {CLIFF_TOLERANCE}x the next smaller size's)")
        print(_threshold_line(result))


def _threshold_line(result: BackendResult) -> str:
    """The step across zmesh's store threshold, named apart: the issue's "no cliff at the threshold" check."""
    below = next(s for s in PAYLOAD_SWEEP if s.nbytes == STORE_THRESHOLD - 1)
    at = next(s for s in PAYLOAD_SWEEP if s.nbytes == STORE_THRESHOLD)
    low, high = result.metrics[below.mbps_metric], result.metrics[at.mbps_metric]
    verdict = "ok" if high >= CLIFF_TOLERANCE * low else "CLIFF"
    return (
        f"[{result.backend}] at zmesh's store threshold: {at.label} gives {high / low:.2f}x the MB/s of {below.label} "
        f"({_format_value(high)} against {_format_value(low)}; >= {CLIFF_TOLERANCE}x): {verdict}"
    )


def _print_footnote(results: list[BackendResult], sizes: Sizes) -> None:
    ran = [r for r in results if r.metrics]
    machine = f"{os.cpu_count()} cores, Python {platform.python_version()}"
    print()
    print(f"Machine: {machine}.")
    if ran:
        print("Versions: " + ", ".join(f"{r.backend} {r.version}" for r in ran) + ".")
        payloads = ", ".join(f"{r.backend} {r.payload}" for r in ran)
        print(
            f"100 MB argument: passed directly (a copy per call), one call at a time; by ref: put once, then its ref "
            f"passed (no copy); the method reads 4 elements; GB/s from the median call; payload type: {payloads}."
        )
        window = SWEEP_WINDOW_BYTES // 2**20
        print(
            f"Payload sweep: bytes arguments passed directly, at most {window} MiB of them (or {SWEEP_MIN_WINDOW} calls) in flight; "
            f"MB = 10^6 bytes; zmesh's store threshold is {STORE_THRESHOLD // 2**20} MiB (from there arguments go through shared memory)."
        )
        print(
            f"Tasks: no-op remote functions; tasks at once: {sizes.task_burst:,} submitted in a loop, then waited for "
            f"(at most {sizes.task_burst_limit_s} s); driver RSS is its peak of after submitting and after the last result."
        )
    for r in ran:
        rss = r.metrics.get("tasks at once: driver RSS [MB]")
        if rss is not None:
            verdict = "ok" if rss < TASK_BURST_RSS_MB else "MISS"
            before = r.metrics.get(RSS_BEFORE_BURST, math.nan)
            print(
                f"[{r.backend}] tasks at once: driver RSS {rss:.0f} MB, {before:.0f} MB before the burst "
                f"(target < {TASK_BURST_RSS_MB} MB): {verdict}."
            )
    for r in ran:
        if "node daemon RSS [MB]" in r.metrics:
            print(f"{r.backend} daemon RSS: {RSS_NOTES[r.backend]}, {RSS_ACTORS} live actors.")
    print("Ratio > 1 means zmesh is better. All figures are from one run.")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: zmesh,ray")
    parser.add_argument("--quick", action="store_true", help="about 10x fewer operations (smoke test)")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--rss", choices=BACKENDS, help=argparse.SUPPRESS)
    names = [_workload_name(w) for w in WORKLOADS] + [RSS_PROBE]
    parser.add_argument("--only", default="", help=f"comma-separated, among: {','.join(names)} (default: all)")
    args = parser.parse_args(argv)
    args.only = tuple(n.strip() for n in args.only.split(",") if n.strip())
    if set(args.only) - set(names):
        parser.error(f"unknown workload(s) {','.join(sorted(set(args.only) - set(names)))}; known: {','.join(names)}")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown or not args.backends:
        parser.error(f"--backends must be a comma-separated subset of {','.join(BACKENDS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.worker:
        print(json.dumps(_run_workloads(args.worker, sizes, args.only)), flush=True)
        return 0
    if args.rss:
        print(json.dumps(_run_rss(args.rss, sizes)), flush=True)
        return 0
    _become_subreaper()
    results = [_bench_backend(backend, args.quick, args.only) for backend in args.backends]
    print()
    _print_table(_table_rows(results, selected=bool(args.only)))
    _print_cliff_check(results)
    _print_footnote(results, QUICK if args.quick else FULL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
