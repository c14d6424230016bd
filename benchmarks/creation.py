"""Actor creation with its first call, on one node: sequential and in a burst.

Usage::

    python benchmarks/creation.py [--node embedded|daemon|both] [--sequential N] [--burst N] [--rounds R]

``sequential``: each ``Counter.remote()`` then ``zmesh.get(c.inc.remote())``, one
after another. ``burst``: all ``.remote()`` first, then a get of each one's first
call. ``embedded`` is ``zmesh.init()`` with nothing running (the node runs in this
process); ``daemon`` is a ``zmesh node`` started for the run. Actors are killed
between rounds, and the node is left a moment to reap them, so rounds do not
compete with the teardown of the one before. The best round of each is reported
(the machine is shared); all of them are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# The zmesh measured: this checkout's, or the tree given on PYTHONPATH (--baseline runs another in turn).
sys.path.insert(0, os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or str(REPO_ROOT))
# Processes a node may keep forked and waiting for an actor (a warm pool): not leftovers of a round.
WARM_POOL_SLACK = 8

import psutil  # noqa: E402

import zmesh  # noqa: E402
from zmesh.testing import NodeProcess, wait_for, zmesh_processes  # noqa: E402


@zmesh.remote
class Counter:
    def __init__(self) -> None:
        self.n = 0

    def inc(self) -> int:
        self.n += 1
        return self.n


def _settle(count: int) -> None:
    """Wait until the killed actors' workers have exited (at most a few seconds), so rounds do not overlap."""

    def workers() -> int:
        return sum(len(p.children()) for p in zmesh_processes(os.environ["ZMESH_RUN_DIR"]) if "zygote" in " ".join(p.cmdline()))

    try:
        wait_for(lambda: workers() <= WARM_POOL_SLACK, timeout=10.0, interval=0.05, what="workers reaped")
    except (TimeoutError, psutil.Error):
        pass


def sequential(n: int) -> float:
    actors = []
    start = time.perf_counter()
    for _ in range(n):
        c = Counter.remote()
        assert zmesh.get(c.inc.remote(), timeout=30) == 1
        actors.append(c)
    elapsed = time.perf_counter() - start
    for c in actors:
        zmesh.kill(c)
    _settle(n)
    return n / elapsed


def burst(n: int) -> float:
    start = time.perf_counter()
    actors = [Counter.remote() for _ in range(n)]
    assert zmesh.get([c.inc.remote() for c in actors], timeout=120) == [1] * n
    elapsed = time.perf_counter() - start
    for c in actors:
        zmesh.kill(c)
    _settle(n)
    return n / elapsed


def measure(args: argparse.Namespace) -> dict[str, Any]:
    # Warm-up: the class is shipped and the first connection made once.
    zmesh.get(Counter.remote().inc.remote(), timeout=30)
    seq = [sequential(args.sequential) for _ in range(args.rounds)]
    bur = [burst(args.burst) for _ in range(args.rounds)]
    return {"sequential [actors/s]": max(seq), "burst [actors/s]": max(bur), "rounds": {"sequential": seq, "burst": bur}}


def run_embedded(args: argparse.Namespace) -> dict[str, Any]:
    zmesh.init()
    try:
        return measure(args)
    finally:
        zmesh.shutdown()


def run_daemon(args: argparse.Namespace) -> dict[str, Any]:
    node = NodeProcess(os.environ["ZMESH_RUN_DIR"])
    try:
        zmesh.init(address="auto")
        try:
            return measure(args)
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
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=tree)
        if done.returncode != 0:
            sys.exit(f"{mode} run with {tree} failed:\n{done.stdout}\n{done.stderr}")
        report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", choices=("embedded", "daemon", "both"), default="both")
    parser.add_argument("--sequential", type=int, default=100)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another source tree of zmesh, measured in turn with this one")
    parser.add_argument("--repeat", type=int, default=1, help="fresh processes per tree and mode (alternating trees)")
    parser.add_argument("--child", choices=("embedded", "daemon"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        report = run_embedded(args) if args.child == "embedded" else run_daemon(args)
        print(json.dumps(report))
        return
    trees = {"this": REPO_ROOT} if args.baseline is None else {"baseline": args.baseline.resolve(), "this": REPO_ROOT}
    modes = ("embedded", "daemon") if args.node == "both" else (args.node,)
    for mode in modes:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        for _ in range(args.repeat):
            for name, tree in trees.items():
                runs[name].append(_child(mode, tree, args))
        for name, reports in runs.items():
            seq = [x for r in reports for x in r["rounds"]["sequential"]]
            bur = [x for r in reports for x in r["rounds"]["burst"]]
            print(
                f"{mode:9s} {name:9s} sequential best {max(seq):6.1f} median {statistics.median(seq):6.1f} actors/s   "
                f"burst best {max(bur):6.1f} median {statistics.median(bur):6.1f} actors/s"
            )


if __name__ == "__main__":
    main()
