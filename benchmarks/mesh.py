"""The mesh's figures: convergence, failure detection, name visibility, restarts, cross-node calls.

Usage::

    python benchmarks/mesh.py [--quick] [--stall-minutes M]

Every node is a real `zmesh node` process on 127.0.0.1 (``zmesh.testing.LocalCluster``)
with the default timings of ``NodeConfig``. Ray's single-node call rates are measured in a
subprocess of the same run, for the ratios. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import zmesh
from zmesh.testing import LocalCluster, wait_for
from zmesh.util.scheduling_strategies import NodeAffinitySchedulingStrategy

POLL_S = 0.02


@zmesh.remote
class Pinger:
    def ping(self) -> int:
        return 1

    def node(self) -> str:
        return zmesh.get_runtime_context().get_node_id()


def _states(cluster: LocalCluster, i: int) -> dict[str, str]:
    try:
        return {m["node_id"]: m["state"] for m in cluster.members(i, timeout=2)}
    except Exception:
        return {}


def _until_all(cluster: LocalCluster, observers: list[int], node_id: str, states: set[str], timeout: float = 30) -> float:
    """Seconds until every observer reports ``node_id`` in one of ``states``."""
    start = time.monotonic()
    pending = set(observers)
    while pending:
        pending = {i for i in pending if _states(cluster, i).get(node_id) not in states}
        if time.monotonic() - start > timeout:
            return float("inf")
        if pending:
            time.sleep(POLL_S)
    return time.monotonic() - start


def _pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def convergence(quick: bool) -> dict[str, float]:
    out = []
    for _ in range(1 if quick else 3):
        start = time.monotonic()
        with LocalCluster(nodes=5, num_cpus=1, fast=False) as cluster:
            out.append(time.monotonic() - start)
            del cluster
    return {"5 nodes started together: all see each other [s]": max(out)}


def detection(quick: bool) -> dict[str, float]:
    kills = 5 if quick else 20
    results: dict[str, float] = {}
    with LocalCluster(nodes=5, num_cpus=1, fast=False) as cluster:
        times = []
        for _ in range(kills):
            victim = cluster.live_indexes()[-1]
            node_id = cluster.node_id(victim)
            observers = [i for i in cluster.live_indexes() if i != victim]
            cluster.kill_node(victim)
            times.append(_until_all(cluster, observers, node_id, {"DEAD"}))
            cluster.add_node()
        results[f"SIGKILL declared dead by every peer, p50 [s] ({kills} kills)"] = _pct(times, 50)
        results["SIGKILL declared dead by every peer, p99 [s]"] = _pct(times, 99)
        times = []
        for _ in range(2 if quick else 5):
            victim = cluster.live_indexes()[-1]
            node_id = cluster.node_id(victim)
            observers = [i for i in cluster.live_indexes() if i != victim]
            cluster.freeze_node(victim)
            times.append(_until_all(cluster, observers, node_id, {"DEAD"}))
            cluster.kill_node(victim)
            cluster.add_node()
        results["SIGSTOP declared dead by every peer, max [s]"] = max(times)
        times = []
        for _ in range(2 if quick else 5):
            victim = cluster.live_indexes()[-1]
            node_id = cluster.node_id(victim)
            observers = [i for i in cluster.live_indexes() if i != victim]
            started = time.monotonic()
            cluster.nodes[victim].proc.terminate()
            _until_all(cluster, observers, node_id, {"LEFT"})
            times.append(time.monotonic() - started)
            cluster.stop_node(victim)
            cluster.add_node()
        results["SIGTERM: every peer drops it, max [s]"] = max(times)
    return results


def names_and_restarts(quick: bool) -> dict[str, float]:
    results: dict[str, float] = {}
    with LocalCluster(nodes=5, num_cpus=2, fast=False) as cluster:
        cluster.connect()
        seen = []
        for k in range(3 if quick else 10):
            actor = Pinger.options(name=f"visible-{k}", lifetime="detached").remote()
            zmesh.get(actor.ping.remote())
            start = time.monotonic()
            for i in range(1, 5):
                wait_for(lambda i=i, k=k: _has_name(cluster, i, f"visible-{k}"), 10, interval=0.005)
            seen.append(time.monotonic() - start)
        results["new named actor found on every node, max [s]"] = max(seen)
        victim = 4
        soft = NodeAffinitySchedulingStrategy(cluster.node_id(victim), soft=True)
        phoenix = Pinger.options(name="phoenix", lifetime="detached", max_restarts=1, scheduling_strategy=soft).remote()
        zmesh.get(phoenix.ping.remote())
        node_id = cluster.node_id(victim)
        killed = time.monotonic()
        cluster.kill_node(victim)
        detected = _until_all(cluster, [0, 1, 2, 3], node_id, {"DEAD"})

        def answers() -> bool:
            try:
                return bool(zmesh.get(zmesh.get_actor("phoenix").ping.remote(), timeout=2))
            except Exception:
                return False

        wait_for(answers, 30, interval=0.02)
        results["restartable actor answers again from another node [s]"] = time.monotonic() - killed
        results["  (detection time in that run [s])"] = detected
    return results


def _has_name(cluster: LocalCluster, i: int, name: str) -> bool:
    try:
        cluster._ask(i, "lookup", "default", name, timeout=2)
        return True
    except Exception:
        return False


def _rates(handle: Any, sync_calls: int, pipelined_calls: int) -> tuple[float, float, float]:
    for _ in range(200):
        zmesh.get(handle.ping.remote())
    lat = []
    start = time.perf_counter()
    for _ in range(sync_calls):
        t = time.perf_counter_ns()
        zmesh.get(handle.ping.remote())
        lat.append(time.perf_counter_ns() - t)
    sync = sync_calls / (time.perf_counter() - start)
    start = time.perf_counter()
    zmesh.get([handle.ping.remote() for _ in range(pipelined_calls)])
    return sync, statistics.median(lat) / 1000, pipelined_calls / (time.perf_counter() - start)


def calls(quick: bool) -> dict[str, float]:
    sync_n, pipe_n = (1000, 5000) if quick else (3000, 20000)
    results: dict[str, float] = {}
    with LocalCluster(nodes=2, num_cpus=2, fast=False) as cluster:
        cluster.connect()
        here = Pinger.options(scheduling_strategy=NodeAffinitySchedulingStrategy(cluster.node_id(0), soft=False)).remote()
        there = Pinger.options(scheduling_strategy=NodeAffinitySchedulingStrategy(cluster.node_id(1), soft=False)).remote()
        for label, handle in (("same node", here), ("cross node", there)):
            sync, p50, pipelined = _rates(handle, sync_n, pipe_n)
            results[f"{label}: sync [calls/s]"] = sync
            results[f"{label}: sync p50 [us]"] = p50
            results[f"{label}: pipelined [calls/s]"] = pipelined
        # On one host the two nodes' processes would talk over IPC; across hosts it is TCP with CURVE.
        # Measure that path too: connections made from now on skip IPC.
        os.environ["ZMESH_LOCAL_IPC"] = "0"
        try:
            remote = Pinger.options(scheduling_strategy=NodeAffinitySchedulingStrategy(cluster.node_id(1), soft=False)).remote()
            sync, p50, pipelined = _rates(remote, sync_n, pipe_n)
        finally:
            del os.environ["ZMESH_LOCAL_IPC"]
        results["cross node, TCP+CURVE: sync [calls/s]"] = sync
        results["cross node, TCP+CURVE: sync p50 [us]"] = p50
        results["cross node, TCP+CURVE: pipelined [calls/s]"] = pipelined
    ray = _ray_rates(sync_n, pipe_n)
    if ray:
        results["Ray single node: sync [calls/s]"] = ray["sync"]
        results["Ray single node: pipelined [calls/s]"] = ray["pipelined"]
        results["cross-node TCP+CURVE sync / Ray sync [x]"] = results["cross node, TCP+CURVE: sync [calls/s]"] / ray["sync"]
        results["cross-node TCP+CURVE pipelined / Ray pipelined [x]"] = (
            results["cross node, TCP+CURVE: pipelined [calls/s]"] / ray["pipelined"]
        )
    return results


RAY_SCRIPT = """
import json, statistics, sys, time, os
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
import ray
ray.init(address="local", include_dashboard=False, logging_level="ERROR")
@ray.remote
class Pinger:
    def ping(self):
        return 1
a = Pinger.remote()
for _ in range(200):
    ray.get(a.ping.remote())
n, m = int(sys.argv[1]), int(sys.argv[2])
start = time.perf_counter()
for _ in range(n):
    ray.get(a.ping.remote())
sync = n / (time.perf_counter() - start)
start = time.perf_counter()
ray.get([a.ping.remote() for _ in range(m)])
print(json.dumps({"sync": sync, "pipelined": m / (time.perf_counter() - start)}))
ray.shutdown()
"""


def _ray_rates(sync_n: int, pipe_n: int) -> dict[str, float] | None:
    try:
        out = subprocess.run([sys.executable, "-c", RAY_SCRIPT, str(sync_n), str(pipe_n)], capture_output=True, text=True, timeout=300)
        # Ray's own warnings can follow our line on stdout.
        return dict(json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{"))))
    except Exception as exc:
        detail = out.stderr.strip().splitlines()[-3:] if "out" in locals() else []
        print(f"(Ray not measured: {type(exc).__name__}: {exc} {detail})", file=sys.stderr)
        return None


def stalls(minutes: float) -> dict[str, float]:
    """One node SIGSTOPped for 1.5 s every 20 s while the mesh carries calls: count false deaths."""
    with LocalCluster(nodes=5, num_cpus=1, fast=False) as cluster:
        cluster.connect()
        actors = [
            Pinger.options(scheduling_strategy=NodeAffinitySchedulingStrategy(cluster.node_id(i), soft=False)).remote() for i in range(5)
        ]
        deaths: set[tuple[int, str]] = set()
        stalls_done = 0
        end = time.monotonic() + minutes * 60
        next_stall = time.monotonic() + 20
        while time.monotonic() < end:
            zmesh.get([a.ping.remote() for a in actors[:2]], timeout=30)  # never the frozen one: it would block the loop
            if time.monotonic() >= next_stall:
                cluster.freeze_node(4)
                stop_at = time.monotonic() + 1.5
                while time.monotonic() < stop_at:
                    for i in range(4):
                        deaths |= {(i, n) for n, s in _states(cluster, i).items() if s in ("DEAD", "LEFT")}
                    time.sleep(0.05)
                cluster.thaw_node(4)
                stalls_done += 1
                next_stall += 20
            for i in range(5):
                deaths |= {(i, n) for n, s in _states(cluster, i).items() if s in ("DEAD", "LEFT")}
            time.sleep(0.1)
        return {f"false deaths in {minutes:g} min with {stalls_done} stalls of 1.5 s": float(len(deaths))}


TARGETS = {
    "5 nodes started together: all see each other [s]": "<= 2",
    "SIGKILL declared dead by every peer, p99 [s]": "<= 3",
    "SIGSTOP declared dead by every peer, max [s]": "<= 4",
    "SIGTERM: every peer drops it, max [s]": "<= 0.3",
    "new named actor found on every node, max [s]": "<= 0.25",
    "restartable actor answers again from another node [s]": "<= detection + 1",
    "cross-node TCP+CURVE sync / Ray sync [x]": ">= 3",
    "cross-node TCP+CURVE pipelined / Ray pipelined [x]": ">= 5",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--stall-minutes", type=float, default=2.0, help="length of the stall-tolerance run (0 skips it)")
    parser.add_argument("--only", default="", help="comma-separated sections: convergence,detection,names,calls,stalls")
    args = parser.parse_args()
    sections: dict[str, Callable[[], dict[str, float]]] = {
        "convergence": lambda: convergence(args.quick),
        "detection": lambda: detection(args.quick),
        "names": lambda: names_and_restarts(args.quick),
        "calls": lambda: calls(args.quick),
        "stalls": lambda: stalls(args.stall_minutes) if args.stall_minutes > 0 else {},
    }
    chosen = [s for s in args.only.split(",") if s] or list(sections)
    results: dict[str, float] = {}
    for name in chosen:
        print(f"-- {name}", flush=True)
        figures = sections[name]()
        for key, value in figures.items():
            print(f"   {key}: {value:.3f}", flush=True)
        results.update(figures)
    print(f"\n{'metric':<62} {'value':>12}  target")
    for key, value in results.items():
        print(f"{key:<62} {value:>12.3f}  {TARGETS.get(key, '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
