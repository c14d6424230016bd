"""Actor creation with its first call, on one node: sequential and in a burst, in actors/s and CPU per actor.

Usage::

    python benchmarks/creation.py [--node embedded|daemon|both] [--sequential N] [--burst N] [--rounds R]
                                  [--baseline DIR] [--repeat K]

``sequential``: each ``Counter.remote()`` then ``zmesh.get(c.inc.remote())``, one
after another. ``burst``: all ``.remote()`` first, then a get of each one's first
call. ``embedded`` is ``zmesh.init()`` with nothing running (the node runs in this
process); ``daemon`` is a ``zmesh node`` started for the run. Actors are killed
between rounds and their workers left to exit, so rounds do not compete with the
teardown of the one before.

Beside the rate, each round adds up the CPU time that its processes spent (driver,
node, zygote and every worker, all threads, from ``/proc``) per actor: on a shared
machine the rate follows the neighbours' load, the CPU per actor much less, and
``2000 / cpu_ms`` is the rate two free cores would allow. ``--baseline DIR`` runs
another source tree of zmesh in turn with this one (each in fresh processes, K
times alternating), so before and after are measured under the same load.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# The zmesh measured: this checkout's, or the tree given on PYTHONPATH (--baseline runs another in turn).
sys.path.insert(0, os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or str(REPO_ROOT))

import psutil  # noqa: E402

import zmesh  # noqa: E402
from zmesh.testing import NodeProcess, wait_for  # noqa: E402

# Workers a node may keep forked and waiting for an actor (its warm pool): not leftovers of a round.
WARM_POOL_SLACK = 8


@zmesh.remote
class Counter:
    def __init__(self) -> None:
        self.n = 0

    def inc(self) -> int:
        self.n += 1
        return self.n


def _cpu_ms(pid: int) -> float:
    """CPU time of every live thread of ``pid``, in ms (scheduler nanoseconds: precise, unlike clock ticks)."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as stat:
                total += int(stat.read().split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e6


class Meter:
    """CPU spent by this process, its node (if another process), the zygote and the zygote's workers."""

    def __init__(self, node_pid: int | None) -> None:
        self.node_pid = node_pid
        parent = psutil.Process(node_pid if node_pid is not None else os.getpid())
        zygotes = [p for p in parent.children() if "zygote" in " ".join(p.cmdline())]
        self.zygote = zygotes[0].pid

    def snapshot(self) -> dict[str, Any]:
        workers = {p.pid: _cpu_ms(p.pid) for p in psutil.Process(self.zygote).children()}
        own = time.process_time() * 1000  # this process: the driver, and the embedded node's thread
        return {"own": own, "node": _cpu_ms(self.node_pid) if self.node_pid else 0.0, "zygote": _cpu_ms(self.zygote), "workers": workers}

    def per_actor(self, before: dict[str, Any], after: dict[str, Any], n: int) -> float:
        spent = sum(after[k] - before[k] for k in ("own", "node", "zygote"))
        spent += sum(cpu - before["workers"].get(pid, 0.0) for pid, cpu in after["workers"].items())
        return spent / n

    def workers(self) -> int:
        return len(psutil.Process(self.zygote).children())


def _round(meter: Meter, n: int, create: Callable[[int], list[Any]]) -> tuple[float, float]:
    """(actors/s, CPU ms per actor) of one round; its actors are killed and their workers left to exit after."""
    before = meter.snapshot()
    start = time.perf_counter()
    actors = create(n)
    elapsed = time.perf_counter() - start
    cpu = meter.per_actor(before, meter.snapshot(), n)
    for actor in actors:
        zmesh.kill(actor)
    try:
        wait_for(lambda: meter.workers() <= WARM_POOL_SLACK, timeout=20.0, interval=0.05, what="workers reaped")
    except TimeoutError:
        pass
    return n / elapsed, cpu


def sequential(n: int) -> list[Any]:
    actors = []
    for _ in range(n):
        actor = Counter.remote()
        assert zmesh.get(actor.inc.remote(), timeout=30) == 1
        actors.append(actor)
    return actors


def burst(n: int) -> list[Any]:
    actors = [Counter.remote() for _ in range(n)]
    assert zmesh.get([a.inc.remote() for a in actors], timeout=120) == [1] * n
    return actors


def measure(args: argparse.Namespace, node_pid: int | None) -> dict[str, Any]:
    # Warm-up: the class is shipped and the first connection made once.
    zmesh.get(Counter.remote().inc.remote(), timeout=30)
    meter = Meter(node_pid)
    seq = [_round(meter, args.sequential, sequential) for _ in range(args.rounds)]
    bur = [_round(meter, args.burst, burst) for _ in range(args.rounds)]
    return {"sequential": seq, "burst": bur}


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    if args.child == "embedded":
        zmesh.init()
        try:
            return measure(args, None)
        finally:
            zmesh.shutdown()
    node = NodeProcess(os.environ["ZMESH_RUN_DIR"])
    try:
        zmesh.init(address="auto")
        try:
            return measure(args, node.pid)
        finally:
            zmesh.shutdown()
    except BaseException:
        node.stop()
        print(node.output[-20000:], file=sys.stderr)
        raise
    finally:
        node.stop()


def _child(mode: str, tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in a fresh process and run directory (it never finds another node), with ``tree``'s zmesh."""
    with tempfile.TemporaryDirectory(prefix="zmesh-creation-") as run_dir:
        env = {**os.environ, "ZMESH_RUN_DIR": run_dir, "PYTHONPATH": str(tree)}
        argv = [sys.executable, __file__, "--child", mode, "--sequential", str(args.sequential), "--burst", str(args.burst)]
        argv += ["--rounds", str(args.rounds)]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, cwd=tree)
        if done.returncode != 0:
            sys.exit(f"{mode} run with {tree} failed:\n{done.stdout}\n{done.stderr}")
        report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--node", choices=("embedded", "daemon", "both"), default="both")
    parser.add_argument("--sequential", type=int, default=100)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another source tree of zmesh, measured in turn with this one")
    parser.add_argument("--repeat", type=int, default=1, help="fresh processes per tree and mode (trees alternate)")
    parser.add_argument("--child", choices=("embedded", "daemon"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return
    trees = {"this": REPO_ROOT} if args.baseline is None else {"baseline": args.baseline.resolve(), "this": REPO_ROOT}
    modes = ("embedded", "daemon") if args.node == "both" else (args.node,)
    print(f"{'':20s} {'sequential':>34s}   {'burst':>34s}")
    print(f"{'':20s} {'best/s':>8s} {'median/s':>9s} {'cpu ms/actor':>14s}   {'best/s':>8s} {'median/s':>9s} {'cpu ms/actor':>14s}")
    for mode in modes:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        for _ in range(args.repeat):
            for name, tree in trees.items():
                runs[name].append(_child(mode, tree, args))
        for name, reports in runs.items():
            cells = []
            for kind in ("sequential", "burst"):
                rounds = [tuple(r) for report in reports for r in report[kind]]
                rates, cpus = [r[0] for r in rounds], [r[1] for r in rounds]
                cells.append(f"{max(rates):8.1f} {statistics.median(rates):9.1f} {statistics.median(cpus):14.2f}")
            print(f"{mode + ' ' + name:20s} {cells[0]}   {cells[1]}")


if __name__ == "__main__":
    main()
