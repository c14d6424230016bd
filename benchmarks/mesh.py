"""The mesh's figures against the issue's targets: convergence, failure detection, names, restarts, calls, tasks, objects, stalls, bursts.

Usage::

    python benchmarks/mesh.py                        # every section, about 6 minutes on 2 cores
    python benchmarks/mesh.py --quick                # fewer repetitions, a 30 s stall run
    python benchmarks/mesh.py --only sigkill,calls   # selected sections
    python benchmarks/mesh.py --only tasks           # remote functions over 3 nodes against one
    python benchmarks/mesh.py --only objects         # a 1 GB object across nodes against raw pyzmq; memory per reader
    python benchmarks/mesh.py --stall-minutes 10     # the full stall-tolerance run
    python benchmarks/mesh.py --only burst --burst 600   # a smaller burst of creations

Every node is a real `zmesh node` process on 127.0.0.1 (``zmesh.testing.LocalCluster``)
with the default timings of ``NodeConfig``. Views are read by polling each node's
members (a fresh admin request, a few ms each), so times carry that resolution.
Ray's single-node call rates are measured in a subprocess, for the ratios; large objects
across nodes are measured against raw pyzmq with CURVE between two processes (``transfer.py``).
The burst section runs 2,000 worker processes at once: about 12 GB of memory, 70 s on 2 cores.
Figures are printed, never asserted: a missed target reads ``MISS`` in the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import psutil
import transfer

import zmesh
from zmesh.exceptions import ZmeshError
from zmesh.node.admin import AdminError
from zmesh.testing import LocalCluster, wait_for
from zmesh.util.scheduling_strategies import NodeAffinitySchedulingStrategy

POLL_S = 0.02
NAMESPACE = "mesh-bench"
GONE = ("DEAD", "LEFT")
SECTIONS = ("convergence", "sigkill", "sigstop", "sigterm", "names", "restart", "calls", "tasks", "objects", "stalls", "burst")
# Keeps Ray on the loopback interface and stops it from reporting usage statistics.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


class _Pinger:
    def ping(self) -> int:
        return 1

    def node(self) -> str:
        return str(zmesh.get_runtime_context().get_node_id())


Pinger = zmesh.remote(_Pinger)  # not a decorator: mypy would keep the bare class's type


def _noop() -> int:
    return 1


def _nap(seconds: float) -> tuple[float, float, str]:
    """Sleep; when it started and ended (wall clock: the same on every process of the host) and on which node."""
    start = time.time()
    time.sleep(seconds)
    return start, time.time(), str(zmesh.get_runtime_context().get_node_id())


noop = zmesh.remote(_noop)
nap = zmesh.remote(_nap)


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the final table; ``op`` and ``limit`` make its target, if it has one."""

    metric: str
    value: float
    fmt: str = "{:.3f}"
    op: str = ""
    limit: float = math.nan
    note: str = ""

    @property
    def target(self) -> str:
        return self.note or (f"{self.op} {self.limit:g}" if self.op else "")

    @property
    def verdict(self) -> str:
        if math.isnan(self.value):
            return "ERROR"
        if not self.op:
            return ""
        met = self.value <= self.limit if self.op == "<=" else self.value >= self.limit
        return "ok" if met else "MISS"

    def text(self) -> str:
        return "n/a" if math.isnan(self.value) else "inf" if math.isinf(self.value) else self.fmt.format(self.value)


@dataclasses.dataclass(frozen=True)
class Options:
    quick: bool
    kills: int
    stall_minutes: float
    burst: int = 2000


def say(text: str) -> None:
    print(text, flush=True)


def pct(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method); the value itself for one sample."""
    if len(values) < 2:
        return values[0] if values else math.nan
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def hard(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


# --------------------------------------------------------------------------
# Reading the nodes' views
# --------------------------------------------------------------------------


class Views:
    """Polls members of a cluster's nodes; remembers every live node that someone reported DEAD or LEFT."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self._ids: dict[int, str] = {}
        self.false_deaths: set[tuple[str, str, str]] = set()  # (observer, subject, state)
        self.suspicions: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def node_id(self, i: int) -> str:
        if i not in self._ids:
            self._ids[i] = self.cluster.node_id(i)
        return self._ids[i]

    def live_ids(self, indexes: list[int]) -> set[str]:
        return {self.node_id(i) for i in indexes}

    def states(self, i: int, live: set[str], timeout: float = 1.0) -> dict[str, str] | None:
        """Node ``i``'s view (node id -> state), None if it did not answer; notes false deaths among ``live``."""
        try:
            view = {str(m["node_id"]): str(m["state"]) for m in self.cluster.members(i, timeout=timeout)}
        except AdminError:
            return None
        observer = self.node_id(i)
        with self._lock:
            for subject, state in view.items():
                if subject not in live or subject == observer:
                    continue
                if state in GONE:
                    if (observer, subject, state) not in self.false_deaths:
                        say(f"   !! false death: {observer} reports live node {subject} {state}")
                    self.false_deaths.add((observer, subject, state))
                elif state == "SUSPECT":
                    self.suspicions.add((observer, subject))
        return view

    def wait_state(
        self, observers: list[int], subject: str, states: tuple[str, ...], start: float, live: set[str], timeout: float = 30.0
    ) -> dict[int, tuple[float, str]]:
        """Per observer: seconds from ``start`` until it first reported ``subject`` in one of ``states``, and which."""
        seen: dict[int, tuple[float, str]] = {}
        while len(seen) < len(observers) and time.monotonic() < start + timeout:
            for i in observers:
                if i in seen:
                    continue
                view = self.states(i, live)
                state = view.get(subject) if view is not None else None
                if state in states:
                    seen[i] = (time.monotonic() - start, str(state))
            time.sleep(POLL_S)
        return seen


def everywhere(seen: dict[int, tuple[float, str]], observers: list[int]) -> float:
    """When the last observer saw it; inf if one never did."""
    return max(t for t, _ in seen.values()) if len(seen) == len(observers) else math.inf


# --------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------


class TimedCluster(LocalCluster):
    """A LocalCluster that notes when all its nodes had printed their banner and when they converged."""

    banners_done = math.nan
    converged_at = math.nan

    def wait_converged(self, timeout: float | None = None) -> None:
        # __enter__ calls this once every node has printed its banner (they start one after another).
        if math.isnan(self.banners_done):
            self.banners_done = time.monotonic()
        wait_for(self.converged, timeout or self.timeout, interval=0.01, what="the nodes to see each other")
        self.converged_at = time.monotonic()


def convergence(opts: Options) -> list[Row]:
    totals, after = [], []
    for r in range(1 if opts.quick else 3):
        cluster = TimedCluster(nodes=5, num_cpus=1, fast=False)
        start = time.monotonic()
        with cluster:
            totals.append(cluster.converged_at - start)
            after.append(cluster.converged_at - cluster.banners_done)
        say(f"   run {r + 1}: all 5 ALIVE everywhere {totals[-1]:.3f} s after launch, {after[-1]:.3f} s after the last banner")
    return [
        Row("convergence of 5 nodes from launch, max [s]", max(totals), op="<=", limit=2.0),
        Row("convergence of 5 nodes after the last banner, max [s]", max(after)),
    ]


def sigkill(opts: Options) -> list[Row]:
    times: list[float] = []
    with LocalCluster(nodes=5, num_cpus=1, fast=False) as cluster:
        views = Views(cluster)
        for k in range(opts.kills):
            live = cluster.live_indexes()
            victim = live[k % len(live)]
            subject = views.node_id(victim)
            observers = [i for i in live if i != victim]
            start = time.monotonic()
            cluster.kill_node(victim)
            seen = views.wait_state(observers, subject, GONE, start, views.live_ids(observers))
            times.append(everywhere(seen, observers))
            first = min((t for t, _ in seen.values()), default=math.inf)
            odd = sorted({s for _, s in seen.values()} - {"DEAD"})
            say(f"   kill {k + 1}/{opts.kills}: DEAD everywhere after {times[-1]:.3f} s (first {first:.3f} s) {odd or ''}")
            cluster.add_node()
        false = len(views.false_deaths)
    return [
        Row(f"SIGKILL -> DEAD on every peer, p50 [s] ({len(times)} kills)", pct(times, 50)),
        Row("SIGKILL -> DEAD on every peer, p99 [s]", pct(times, 99), op="<=", limit=3.0),
        Row("SIGKILL -> DEAD on every peer, max [s]", max(times)),
        Row("false deaths seen during the SIGKILL runs", false, "{:.0f}", "<=", 0),
    ]


def sigstop(opts: Options) -> list[Row]:
    times: list[float] = []
    back: list[float] = []
    with LocalCluster(nodes=5, num_cpus=1, fast=False) as cluster:
        views = Views(cluster)
        for k in range(2 if opts.quick else 5):
            live = cluster.live_indexes()
            victim = live[k % len(live)]
            subject = views.node_id(victim)
            observers = [i for i in live if i != victim]
            others = views.live_ids(observers)
            start = time.monotonic()
            cluster.freeze_node(victim)
            times.append(everywhere(views.wait_state(observers, subject, ("DEAD",), start, others), observers))
            # Thawed, it learns it was buried and may come back under a higher incarnation: noted, not a target.
            thawed = time.monotonic()
            cluster.thaw_node(victim)
            back.append(everywhere(views.wait_state(observers, subject, ("ALIVE",), thawed, others, timeout=10), observers))
            say(f"   freeze {k + 1}: DEAD everywhere after {times[-1]:.3f} s; thawed, ALIVE again everywhere after {back[-1]:.3f} s")
            cluster.stop_node(victim)
            cluster.add_node()
        false = len(views.false_deaths)
    return [
        Row(f"SIGSTOP -> DEAD on every peer, max [s] ({len(times)} freezes)", max(times), op="<=", limit=4.0),
        Row("  thawed node ALIVE again on every peer, max [s]", max(back)),
        Row("false deaths seen during the SIGSTOP runs", false, "{:.0f}", "<=", 0),
    ]


def sigterm(opts: Options) -> list[Row]:
    times: list[float] = []
    dead_not_left = 0
    with LocalCluster(nodes=5, num_cpus=1, fast=False) as cluster:
        views = Views(cluster)
        for k in range(3 if opts.quick else 5):
            live = cluster.live_indexes()
            victim = live[k % len(live)]
            subject = views.node_id(victim)
            observers = [i for i in live if i != victim]
            start = time.monotonic()
            cluster.nodes[victim].proc.send_signal(signal.SIGTERM)
            seen = views.wait_state(observers, subject, GONE, start, views.live_ids(observers), timeout=10)
            times.append(everywhere(seen, observers))
            dead_not_left += sum(1 for _, s in seen.values() if s != "LEFT")
            say(f"   SIGTERM {k + 1}: LEFT everywhere after {times[-1]:.3f} s ({sorted(s for _, s in seen.values())})")
            cluster.stop_node(victim)
            cluster.add_node()
    return [
        Row(f"SIGTERM -> LEFT on every peer, max [s] ({len(times)} stops)", max(times), op="<=", limit=0.3),
        Row("  peers that said DEAD instead of LEFT", dead_not_left, "{:.0f}", "<=", 0),
    ]


def _has_name(cluster: LocalCluster, i: int, name: str) -> bool:
    try:
        cluster._ask(i, "lookup", NAMESPACE, name, timeout=2)
        return True
    except AdminError:
        return False


def names(opts: Options) -> list[Row]:
    times: list[float] = []
    with LocalCluster(nodes=5, num_cpus=1, fast=False) as cluster:
        cluster.connect(0)
        here = hard(cluster.node_id(0))
        zmesh.get(Pinger.options(scheduling_strategy=here).remote().ping.remote())  # the zygote is warm
        for k in range(5 if opts.quick else 10):
            name = f"visible-{k}"
            actor = Pinger.options(name=name, namespace=NAMESPACE, scheduling_strategy=here).remote()
            start = time.monotonic()
            found: dict[int, float] = {}
            while len(found) < 5 and time.monotonic() < start + 10:
                for i in set(range(5)) - set(found):
                    if _has_name(cluster, i, name):
                        found[i] = time.monotonic() - start
            times.append(max(found.values()) if len(found) == 5 else math.inf)
            per_node = ", ".join(f"{found.get(i, math.inf):.3f}" for i in range(5))
            say(f"   {name}: found on all 5 nodes after {times[-1]:.3f} s (per node: {per_node})")
            assert zmesh.get(actor.node.remote(), timeout=10) == cluster.node_id(0)
            zmesh.kill(actor)
    return [
        Row("new named actor found by lookup on every node, p50 [s]", pct(times, 50)),
        Row(f"new named actor found by lookup on every node, max [s] ({len(times)})", max(times), op="<=", limit=0.25),
    ]


def _detect_into(views: Views, observers: list[int], subject: str, start: float, seen: dict[int, tuple[float, str]]) -> None:
    seen.update(views.wait_state(observers, subject, ("DEAD",), start, views.live_ids(observers)))


def restart(opts: Options) -> list[Row]:
    margins: list[float] = []
    rows: list[Row] = []
    with LocalCluster(nodes=5, num_cpus=1, fast=False) as cluster:
        views = Views(cluster)
        cluster.connect(0)
        for r in range(1 if opts.quick else 3):
            live = cluster.live_indexes()
            victim = live[1 + r % (len(live) - 1)]  # never node 0: the driver's
            subject = views.node_id(victim)
            observers = [i for i in live if i != victim]
            views.live_ids(observers)  # ids known before the watcher thread needs them
            name = f"phoenix-{r}"
            soft = NodeAffinitySchedulingStrategy(subject, soft=True)
            actor = Pinger.options(name=name, namespace=NAMESPACE, lifetime="detached", max_restarts=1, scheduling_strategy=soft).remote()
            assert zmesh.get(actor.node.remote(), timeout=30) == subject
            seen: dict[int, tuple[float, str]] = {}
            start = time.monotonic()
            watcher = threading.Thread(target=_detect_into, args=(views, observers, subject, start, seen), name="mesh-bench-detect")
            watcher.start()
            cluster.kill_node(victim)
            answered, where = math.inf, ""
            while time.monotonic() < start + 30:
                try:
                    handle = zmesh.get_actor(name, namespace=NAMESPACE, timeout=2)
                    where = zmesh.get(handle.node.remote(), timeout=2)
                    answered = time.monotonic() - start
                    break
                except (ZmeshError, ValueError):
                    time.sleep(POLL_S)
            watcher.join()
            detected = everywhere(seen, observers)
            margins.append(answered - detected)
            moved = "another node" if where and where != subject else f"node {where or '?'}"
            say(f"   restart {r + 1}: answers again from {moved} {answered:.3f} s after the kill; DEAD everywhere after {detected:.3f} s")
            metric = f"restartable actor answers again after SIGKILL, run {r + 1} [s]"
            rows += [
                Row(metric, answered, op="<=", limit=detected + 1, note=f"<= {detected:.3f} + 1"),
                Row("  detection time in that run [s]", detected),
            ]
            zmesh.kill(zmesh.get_actor(name, namespace=NAMESPACE))
            cluster.add_node()
        rows.append(Row("restart time - detection time, max [s]", max(margins), op="<=", limit=1.0))
        rows.append(Row("false deaths seen during the restart runs", len(views.false_deaths), "{:.0f}", "<=", 0))
    return rows


def _rates(handle: Any, sync_n: int, pipe_n: int) -> tuple[float, float, float]:
    """Sync calls/s, sync p50 latency [us], pipelined calls/s."""
    for _ in range(200):
        zmesh.get(handle.ping.remote())
    lat = []
    start = time.perf_counter()
    for _ in range(sync_n):
        t = time.perf_counter_ns()
        zmesh.get(handle.ping.remote())
        lat.append(time.perf_counter_ns() - t)
    sync = sync_n / (time.perf_counter() - start)
    start = time.perf_counter()
    zmesh.get([handle.ping.remote() for _ in range(pipe_n)])
    return sync, statistics.median(lat) / 1000, pipe_n / (time.perf_counter() - start)


def calls(opts: Options) -> list[Row]:
    sync_n, pipe_n = (1000, 5000) if opts.quick else (3000, 20000)
    columns: dict[str, tuple[float, float, float]] = {}
    with LocalCluster(nodes=2, num_cpus=1, fast=False) as cluster:
        cluster.connect(0)
        a, b = cluster.node_id(0), cluster.node_id(1)
        here = Pinger.options(scheduling_strategy=hard(a)).remote()
        there = Pinger.options(scheduling_strategy=hard(b)).remote()
        assert zmesh.get([here.node.remote(), there.node.remote()], timeout=30) == [a, b]
        columns["same node"] = _rates(here, sync_n, pipe_n)
        columns["cross node"] = _rates(there, sync_n, pipe_n)
        # Two nodes of one host talk over IPC; across hosts it is TCP with CURVE. Connections made
        # while ZMESH_LOCAL_IPC=0 take TCP, so a fresh actor on B measures the cross-host path.
        os.environ["ZMESH_LOCAL_IPC"] = "0"
        try:
            far = Pinger.options(scheduling_strategy=hard(b)).remote()
            columns["cross node TCP+CURVE"] = _rates(far, sync_n, pipe_n)
        finally:
            del os.environ["ZMESH_LOCAL_IPC"]
    ray = ray_rates(sync_n, pipe_n)
    if ray is not None:
        columns["Ray 1 node"] = ray
    labels = ("sync [calls/s]", "sync p50 [us]", "pipelined [calls/s]")
    say("   " + " | ".join([f"{'':<20}", *(f"{c:>20}" for c in columns)]))
    for n, label in enumerate(labels):
        say("   " + " | ".join([f"{label:<20}", *(f"{v[n]:>20,.0f}" for v in columns.values())]))
    rows = []
    for column, values in columns.items():
        rows += [Row(f"{column}: {label}", v, "{:,.0f}") for label, v in zip(labels, values, strict=True)]
    if ray is not None:
        for column in ("cross node TCP+CURVE", "cross node"):
            cross = columns[column]
            rows += [
                Row(f"{column} / Ray: sync calls [x]", cross[0] / ray[0], "{:.2f}", ">=", 3.0),
                Row(f"{column} / Ray: pipelined calls [x]", cross[2] / ray[2], "{:.2f}", ">=", 5.0),
            ]
    else:
        rows.append(Row("Ray not measured: no ratios", math.nan, note="cross >= 3x Ray sync, >= 5x pipelined"))
    return rows


# --------------------------------------------------------------------------
# Tasks (remote functions) over several nodes
# --------------------------------------------------------------------------

TASK_NODES = 3
TASK_CPUS = 2  # per node: the spillback check's 60 one-CPU tasks fill 6 CPUs at once
NAPS, NAP_S = 60, 0.5


def _pipelined_tasks(count: int, strategy: str = "DEFAULT") -> float:
    """Seconds to submit ``count`` no-op tasks, then get them all; after a warm-up that starts the workers."""
    fn = noop.options(scheduling_strategy=strategy)
    zmesh.get([fn.remote() for _ in range(200)], timeout=60)
    start = time.perf_counter()
    results = zmesh.get([fn.remote() for _ in range(count)], timeout=300)
    elapsed = time.perf_counter() - start
    assert sum(results) == count, "lost task results"
    return elapsed


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most spans open at one instant (a span ending as another starts does not overlap it)."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = now = 0
    for _, step in events:  # at equal times -1 sorts first: ends before starts
        now += step
        most = max(most, now)
    return most


def _spillback() -> tuple[int, float, dict[str, int]]:
    """NAPS one-CPU tasks of NAP_S each from one driver: the most that ran at once, the time for all, tasks per node."""
    start = time.perf_counter()
    spans = zmesh.get([nap.remote(NAP_S) for _ in range(NAPS)], timeout=120)
    elapsed = time.perf_counter() - start
    per_node: dict[str, int] = {}
    for _, _, node in spans:
        per_node[node] = per_node.get(node, 0) + 1
    return max_overlap([(a, b) for a, b, _ in spans]), elapsed, per_node


def tasks(opts: Options) -> list[Row]:
    count = 2000 if opts.quick else 10_000
    with LocalCluster(nodes=1, num_cpus=TASK_CPUS, fast=False) as cluster:
        cluster.connect(0)
        one = _pipelined_tasks(count)
    say(f"   one node of {TASK_CPUS} CPUs: {count:,} no-op tasks in {one:.3f} s ({count / one:,.0f} tasks/s)")
    with LocalCluster(nodes=TASK_NODES, num_cpus=TASK_CPUS, fast=False) as cluster:
        cluster.connect(0)
        ids = {cluster.node_id(i): i for i in range(TASK_NODES)}
        # On a fresh cluster first; then again right after the no-op bursts, whose leases have just gone back.
        most, naps_s, per_node = _spillback()
        say(f"   {NAPS} tasks of {NAP_S} s: at most {most} at once, all done in {naps_s:.2f} s; {_placed(per_node, ids)}")
        spread = _pipelined_tasks(count)
        say(f"   {TASK_NODES} nodes of {TASK_CPUS} CPUs: {count:,} no-op tasks in {spread:.3f} s ({count / spread:,.0f} tasks/s)")
        spread_s = _pipelined_tasks(count, "SPREAD")
        say(f"   {TASK_NODES} nodes, SPREAD: {count:,} no-op tasks in {spread_s:.3f} s ({count / spread_s:,.0f} tasks/s)")
        again, again_s, again_nodes = _spillback()
        say(f"   again, right after: at most {again} at once, all done in {again_s:.2f} s; {_placed(again_nodes, ids)}")
    cpus = TASK_NODES * TASK_CPUS
    return [
        Row(f"one node: {count:,} pipelined no-op tasks [tasks/s]", count / one, "{:,.0f}"),
        Row(f"{TASK_NODES} nodes: {count:,} pipelined no-op tasks [tasks/s]", count / spread, "{:,.0f}"),
        Row(f"{TASK_NODES} nodes, SPREAD: {count:,} pipelined no-op tasks [tasks/s]", count / spread_s, "{:,.0f}"),
        Row(f"  {TASK_NODES}-node time / one-node time [x]", spread / one, "{:.2f}", "<=", 1.5),
        Row(f"spillback: {NAPS} one-CPU tasks of {NAP_S} s, most at once ({cpus} CPUs)", most, "{:.0f}", ">=", cpus),
        Row("  nodes that ran some", len(per_node), "{:.0f}", ">=", TASK_NODES),
        Row(
            "  time until all done [s]",
            naps_s,
            "{:.2f}",
            "<=",
            2 * NAPS * NAP_S / cpus,
            note=f"<= {2 * NAPS * NAP_S / cpus:g} (ideal {NAPS * NAP_S / cpus:g})",
        ),
        Row("spillback right after the no-op tasks: most at once", again, "{:.0f}", ">=", cpus),
        Row("  time until all done [s]", again_s, "{:.2f}", "<=", 2 * NAPS * NAP_S / cpus),
    ]


def objects(opts: Options) -> list[Row]:
    """Large objects across nodes (``transfer.py``): a 1 GB read against raw pyzmq, memory with 1 and 6 readers."""
    return [Row(**dataclasses.asdict(figure)) for figure in transfer.objects(opts.quick)]


def _placed(per_node: dict[str, int], ids: dict[str, int]) -> str:
    return "per node " + ", ".join(f"node {ids.get(n, '?')}: {k}" for n, k in sorted(per_node.items(), key=lambda kv: ids.get(kv[0], 99)))


RAY_SCRIPT = """
import contextlib, ctypes, json, signal, statistics, sys, time
import psutil
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: Ray's orphans come back to us
signal.signal(signal.SIGALRM, lambda *_: sys.exit("Ray measurement timed out"))
signal.alarm(int(sys.argv[3]))
import ray
try:
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    @ray.remote
    class Pinger:
        def ping(self):
            return 1
    a = Pinger.remote()
    for _ in range(200):
        ray.get(a.ping.remote())
    n, m = int(sys.argv[1]), int(sys.argv[2])
    lat = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter_ns()
        ray.get(a.ping.remote())
        lat.append(time.perf_counter_ns() - t)
    sync = n / (time.perf_counter() - start)
    start = time.perf_counter()
    ray.get([a.ping.remote() for _ in range(m)])
    pipelined = m / (time.perf_counter() - start)
    print(json.dumps([sync, statistics.median(lat) / 1000, pipelined]), flush=True)
finally:
    signal.alarm(0)
    ray.shutdown()
    left = psutil.Process().children(recursive=True)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    for p in psutil.wait_procs(left, timeout=10)[1]:
        with contextlib.suppress(psutil.Error):
            p.kill()
"""


def ray_rates(sync_n: int, pipe_n: int, limit_s: int = 240) -> tuple[float, float, float] | None:
    """Ray's sync calls/s, p50 [us] and pipelined calls/s on one local node, in a subprocess; None without Ray."""
    try:
        import ray  # noqa: F401
    except ImportError:
        say("   (ray is not importable: no Ray figures)")
        return None
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ZMESH_ADDRESS")}
    proc = subprocess.Popen(
        [sys.executable, "-c", RAY_SCRIPT, str(sync_n), str(pipe_n), str(limit_s)],
        env={**env, **RAY_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=limit_s + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    # Ray's own warnings may follow our line on stdout.
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("[")), None)
    if proc.returncode != 0 or line is None:
        say(f"   (Ray not measured: exit status {proc.returncode}: {' | '.join(err.strip().splitlines()[-3:])})")
        return None
    sync, p50, pipelined = json.loads(line)
    return float(sync), float(p50), float(pipelined)


def stalls(opts: Options, period_s: float = 20.0, pause_s: float = 1.5) -> list[Row]:
    """One node SIGSTOPped for ``pause_s`` every ``period_s`` while a driver calls actors on every node."""
    if opts.stall_minutes <= 0:
        return []
    with LocalCluster(nodes=5, num_cpus=1, fast=False) as cluster:
        views = Views(cluster)
        cluster.connect(0)
        ids = [views.node_id(i) for i in range(5)]
        live = set(ids)
        actors = [Pinger.options(scheduling_strategy=hard(n)).remote() for n in ids]
        assert zmesh.get([a.node.remote() for a in actors], timeout=30) == ids
        done = failed = done_stalls = 0
        slowest = 0.0
        frozen: int | None = None
        now = time.monotonic()
        end = now + opts.stall_minutes * 60
        next_stall, thaw_at, last_report = now + period_s / 2, 0.0, now
        while now < end or frozen is not None:
            t = time.perf_counter()
            try:
                # Workers are not frozen with their node: calls to the frozen node's actor go on.
                zmesh.get([a.ping.remote() for a in actors], timeout=30)
                done += len(actors)
            except ZmeshError as exc:
                failed += len(actors)
                say(f"   !! calls failed: {type(exc).__name__}: {exc}")
            slowest = max(slowest, time.perf_counter() - t)
            for i in range(5):
                if i != frozen:
                    views.states(i, live)
            now = time.monotonic()
            if frozen is not None and now >= thaw_at:
                cluster.thaw_node(frozen)
                frozen = None
            elif frozen is None and now >= next_stall and now < end:
                frozen = 1 + done_stalls % 4  # never node 0: the driver's
                cluster.freeze_node(frozen)
                thaw_at, next_stall = now + pause_s, next_stall + period_s
                done_stalls += 1
            if now - last_report >= 30:
                last_report = now
                say(f"   {done_stalls} stalls, {done:,} calls, {len(views.false_deaths)} false deaths so far")
            time.sleep(POLL_S)
        cluster.wait_converged(timeout=10)
    suspected = len(views.suspicions)
    say(f"   {done_stalls} stalls of {pause_s} s; {suspected} (observer, node) pairs ever SUSPECT; slowest call round {slowest:.3f} s")
    return [
        Row(f"false deaths in {opts.stall_minutes:g} min, {done_stalls} stalls of {pause_s} s", len(views.false_deaths), "{:.0f}", "<=", 0),
        Row("  calls failed meanwhile", failed, "{:.0f}", "<=", 0),
        Row("  calls made meanwhile", done, "{:,.0f}"),
    ]


# --------------------------------------------------------------------------
# A burst of creations
# --------------------------------------------------------------------------

# What a node logs when its view of a member changes (mesh/link.py) or when the others buried it.
MEMBERSHIP_NEWS = (" is SUSPECT", " is DEAD", "declared this node dead")


class BurstWatch:
    """While a burst runs, in a thread: each node's view (false deaths), how slowly each answers, and memory."""

    def __init__(self, cluster: LocalCluster, views: Views, every_s: float = 0.25, memory_every_s: float = 2.0) -> None:
        self.cluster, self.views = cluster, views
        self.every_s, self.memory_every_s = every_s, memory_every_s
        self.live = views.live_ids(list(range(cluster.size)))
        self.slowest = [0.0] * cluster.size  # slowest answer to a members request, per node [s]
        self.unanswered = [0] * cluster.size
        self.baseline_used = psutil.virtual_memory().used
        self.peak_rss = self.peak_used = self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mesh-bench-burst-watch", daemon=True)

    def __enter__(self) -> BurstWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        next_memory = 0.0
        while not self._stop.wait(self.every_s):
            for i in range(self.cluster.size):
                t = time.monotonic()
                if self.views.states(i, self.live, timeout=2.0) is None:
                    self.unanswered[i] += 1
                self.slowest[i] = max(self.slowest[i], time.monotonic() - t)
            if time.monotonic() >= next_memory:
                next_memory = time.monotonic() + self.memory_every_s
                self.memory()

    def memory(self) -> None:
        """RSS summed over every node, zygote and worker (shared pages count once per process), and the host's use."""
        total = procs = 0
        for node in self.cluster.nodes:
            for proc in [psutil.Process(node.pid), *node.descendants()]:
                try:
                    total += proc.memory_info().rss
                    procs += 1
                except psutil.Error:
                    continue
        self.peak_rss, self.peak_procs = max(self.peak_rss, total), max(self.peak_procs, procs)
        self.peak_used = max(self.peak_used, psutil.virtual_memory().used - self.baseline_used)


def _membership_news(cluster: LocalCluster, since: list[int]) -> list[str]:
    """The lines about suspicions, deaths and burials that the nodes logged after ``since`` (lengths of their output)."""
    lines = []
    for i, node in enumerate(cluster.nodes):
        text = node.output_so_far()[since[i] :]
        lines += [f"node {i}: {ln.strip()}" for ln in text.splitlines() if any(m in ln for m in MEMBERSHIP_NEWS)]
    return lines


def _answers(refs: list[Any], start: float, limit_s: float) -> tuple[int, float, dict[str, int]]:
    """How many of ``refs`` answered, when the last did (inf if some never did), and the errors of the others."""
    pending, done_at = list(refs), math.inf
    next_report = start + 5
    while pending and time.monotonic() < start + limit_s:
        _, pending = zmesh.wait(pending, num_returns=len(pending), timeout=min(1.0, start + limit_s - time.monotonic()))
        if time.monotonic() >= next_report:
            next_report += 5
            say(f"   ... {len(refs) - len(pending)}/{len(refs)} answered after {time.monotonic() - start:.1f} s")
    if not pending:
        done_at = time.monotonic() - start
    errors: dict[str, int] = {}
    answered = 0
    left = set(map(id, pending))
    for ref in refs:
        if id(ref) in left:
            errors["no answer"] = errors.get("no answer", 0) + 1
            continue
        try:
            zmesh.get(ref, timeout=5)
            answered += 1
        except ZmeshError as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
    return answered, done_at, errors


def _lag(status: dict[str, Any]) -> str:
    lag, busy = status["loop_lag_ms"], status["loop_busy_ms"]
    late = "/".join(f"{lag[q]:.1f}" for q in ("p50", "p99", "max"))
    return f"lag p50/p99/max {late} ms, busy {'/'.join(f'{busy[q]:.1f}' for q in ('p50', 'p99', 'max'))} ms"


def burst_mesh(n: int, limit_s: float = 300.0) -> list[Row]:
    """``n`` actors created at once with SPREAD by one driver of node 0 of 3, then the first call of each."""
    with LocalCluster(nodes=3, fast=False) as cluster:
        views = Views(cluster)
        ids = [views.node_id(i) for i in range(3)]
        cluster.connect(0)
        # One actor per node first: each zygote has forked once, each node has the class.
        warm = [Pinger.options(scheduling_strategy=hard(node)).remote() for node in ids]
        assert zmesh.get([a.node.remote() for a in warm], timeout=30) == ids
        since = [len(node.output_so_far()) for node in cluster.nodes]
        before = cluster.status(0)
        with BurstWatch(cluster, views) as watch:
            start = time.monotonic()
            handles = [Pinger.options(scheduling_strategy="SPREAD").remote() for _ in range(n)]
            submitted = time.monotonic() - start
            refs = [h.ping.remote() for h in handles]
            answered, done_at, errors = _answers(refs, start, limit_s)
            # Right after: the 60 s window of each node's loop holds the whole burst.
            statuses = [cluster.status(i, timeout=30) for i in range(3)]
            watch.memory()
        news = _membership_news(cluster, since)
    # A node's status lists the creations it took too; the host says where each runs.
    hosted = [sum(1 for a in s["actors"] if a["node_id"] == ids[i]) - 1 for i, s in enumerate(statuses)]  # less the warm-up
    say(f"   before the burst, node 0 loop: {_lag(before)} (since it started)")
    say(f"   {n} .remote() calls took {submitted:.3f} s; {answered} answered, all settled after {done_at:.1f} s; errors {errors or 'none'}")
    say(f"   actors per node (less one warm-up each): {hosted}")
    for i, s in enumerate(statuses):
        say(f"   node {i} loop: {_lag(s)}; slowest answer to a poll {watch.slowest[i]:.3f} s, unanswered polls {watch.unanswered[i]}")
    for line in news[:20]:
        say(f"   !! {line}")
    deaths = sum(1 for ln in news if " is DEAD" in ln or "declared this node dead" in ln) + len(views.false_deaths)
    rss, used = watch.peak_rss / 1e6, watch.peak_used / 1e6
    say(f"   peak: {watch.peak_procs} zmesh processes, RSS total {rss:,.0f} MB, host memory in use +{used:,.0f} MB")
    lag, busy = statuses[0]["loop_lag_ms"], statuses[0]["loop_busy_ms"]
    return [
        Row(f"burst of {n} SPREAD actors on 3 nodes: answered", answered, "{:.0f}", ">=", n),
        Row("  time until every first call answered or failed [s]", done_at, "{:.1f}"),
        Row("  creations answered per second [actors/s]", answered / done_at if done_at else math.nan, "{:.0f}"),
        Row("  false deaths (DEAD or buried while alive)", deaths, "{:.0f}", "<=", 0),
        Row("  suspicions logged", sum(1 for ln in news if " is SUSPECT" in ln), "{:.0f}"),
        Row("  origin node loop lag p99 [ms]", lag["p99"], "{:.1f}", "<=", 50),
        Row("  origin node loop lag max [ms]", lag["max"], "{:.1f}"),
        Row("  origin node loop busy turn p99 [ms]", busy["p99"], "{:.1f}"),
        Row("  origin node loop busy turn max [ms]", busy["max"], "{:.1f}"),
        Row("  origin node slowest answer to a members poll [s]", watch.slowest[0], "{:.3f}"),
        Row("  peak RSS of all zmesh processes, summed [MB]", rss, "{:,.0f}"),
        Row("  peak host memory in use over the start [MB]", used, "{:,.0f}"),
    ]


def burst_one_node(sequential: int = 100, at_once: int = 200) -> list[Row]:
    """Creation with its first call on one node: one after another, then ``at_once`` together."""
    with LocalCluster(nodes=1, fast=False) as cluster:
        cluster.connect(0)
        keep = [Pinger.remote()]  # handles are kept: an actor whose last handle goes is killed
        zmesh.get(keep[0].ping.remote(), timeout=30)
        start = time.perf_counter()
        for _ in range(sequential):
            keep.append(Pinger.remote())
            zmesh.get(keep[-1].ping.remote(), timeout=30)
        one_by_one = sequential / (time.perf_counter() - start)
        start = time.perf_counter()
        handles = [Pinger.remote() for _ in range(at_once)]
        zmesh.get([h.ping.remote() for h in handles], timeout=120)
        together = at_once / (time.perf_counter() - start)
        lag = _lag(cluster.status(0))
        say(f"   one node: {one_by_one:.0f} actors/s one after another, {together:.0f} actors/s {at_once} at once; {lag}")
    return [
        Row(f"one node, creation + first call, {sequential} one after another [actors/s]", one_by_one, "{:.0f}", ">=", 300),
        Row(f"one node, creation + first call, {at_once} at once [actors/s]", together, "{:.0f}", ">=", 300),
    ]


def burst(opts: Options) -> list[Row]:
    return burst_one_node() + burst_mesh(opts.burst)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--only", default="", help=f"comma-separated sections among: {','.join(SECTIONS)}")
    parser.add_argument("--kills", type=int, default=None, help="SIGKILL repetitions (default 20, 5 with --quick)")
    parser.add_argument("--stall-minutes", type=float, default=None, help="stall-tolerance run (default 2, 0.5 with --quick; 0 skips)")
    parser.add_argument("--burst", type=int, default=None, help="actors created at once on 3 nodes (default 2000, 600 with --quick)")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    opts = Options(
        quick=args.quick,
        kills=args.kills if args.kills is not None else (5 if args.quick else 20),
        stall_minutes=args.stall_minutes if args.stall_minutes is not None else (0.5 if args.quick else 2.0),
        burst=args.burst if args.burst is not None else (600 if args.quick else 2000),
    )
    runners: dict[str, Callable[[Options], list[Row]]] = {
        "convergence": convergence,
        "sigkill": sigkill,
        "sigstop": sigstop,
        "sigterm": sigterm,
        "names": names,
        "restart": restart,
        "calls": calls,
        "tasks": tasks,
        "objects": objects,
        "stalls": stalls,
        "burst": burst,
    }
    rows: list[Row] = []
    began = time.monotonic()
    for section in chosen:
        say(f"-- {section}")
        started = time.monotonic()
        try:
            figures = runners[section](opts)
        except Exception as exc:  # one broken section must not hide the others' figures
            traceback.print_exc()
            figures = [Row(f"{section}: failed ({type(exc).__name__}: {exc})"[:70], math.nan)]
        for row in figures:
            say(f"   {row.metric}: {row.text()}")
        say(f"   ({time.monotonic() - started:.0f} s)")
        rows += figures
    width = max([len(r.metric) for r in rows] + [20])
    say(f"\nzmesh mesh figures ({os.cpu_count()} cores, default NodeConfig timings, {time.monotonic() - began:.0f} s)\n")
    say(f"{'metric':<{width}}  {'value':>12}  {'target':<16}  ")
    say(f"{'-' * width}  {'-' * 12}  {'-' * 16}  -----")
    for row in rows:
        say(f"{row.metric:<{width}}  {row.text():>12}  {row.target:<16}  {row.verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
