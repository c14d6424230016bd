"""Soak test: a long run of calls, put/get pairs, actor churn and tasks against a real node, checked for leaks.

Usage::

    python benchmarks/soak.py [--scale 0.01] [--json]

It starts a standalone ``zmesh node`` (fresh ``ZMESH_RUN_DIR`` and cluster key in
temporary directories), connects to it with ``zmesh.init(address="auto")`` and runs:

1. a warm-up: a few percent of each phase below, so that allocator pools, caches
   and lazily started threads exist before the baseline is taken;
2. 1,000,000 pipelined calls on one actor in windows of 1,000 in flight, with
   20,000 synchronous calls interleaved between the windows;
3. 100,000 ``put``/``get`` pairs (with ``--pass-refs``, every tenth ref is also passed
   to the actor, which fetches it from the driver: this exercises the cross-process
   reference counting, which must free such a value once the call is done);
4. 10,000 actor creations and ``kill``s, in batches of 20 so that few are alive at once;
5. 200,000 tasks (remote functions) in waves of 10,000 submitted at once, each wave then got;
6. 1,000 streaming generator tasks of 10 items each, where this zmesh has them (``ObjectRefGenerator``).

After the warm-up and after each phase it prints the RSS, open file descriptors and
threads of the driver, the soak actor's worker, the node and its zygote, each task
worker the node keeps (``task <pid>``; the warm-up's tasks start them), plus the
node's live actors and the IPC socket files in the run directory. The checks (one
PASS/FAIL line each, exit status 1 if any fails): from the end of the warm-up to the
end, RSS grows by at most 10 MB per process and fds and threads by at most 2; killed
actors' workers and socket files are gone; and once the driver has disconnected and the
node has been stopped with SIGTERM, no process of the run and no socket file is left.
``--scale`` multiplies every count (0.01 is a smoke run of a few seconds; a full
run takes about 2 minutes on 2 cores). Every process started is ended, also on
failure or Ctrl-C. The progress lines carry every process's RSS, to see a leak grow.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import psutil

import zmesh
from zmesh.runtime import current
from zmesh.testing import zmesh_processes
from zmesh.transport import rundir

REPO_ROOT = Path(__file__).resolve().parent.parent
PIPELINED_CALLS = 1_000_000
SYNC_CALLS = 20_000
PUT_GETS = 100_000
ACTORS = 10_000
WINDOW = 1000
ACTOR_BATCH = 20
TASKS = 200_000
TASK_WAVE = 10_000
STREAMS = 1000
STREAM_ITEMS = 10
# With --pass-refs, every n-th put ref also goes to the actor: the worker fetches it from the driver, which must free it afterwards.
REF_TO_ACTOR_EVERY = 10
WARMUP_FRACTION = 0.05
PAYLOAD = b"s" * 100
RSS_LIMIT_MB = 10.0
FD_SLACK = 2
THREAD_SLACK = 2
# Per process figure: how much it may grow from the end of the warm-up to the end, its unit and format.
LIMITS = (("rss_mb", RSS_LIMIT_MB, " MB", ".1f"), ("fds", FD_SLACK, "", ".0f"), ("threads", THREAD_SLACK, "", ".0f"))
GET_TIMEOUT_S = 60.0
NODE_START_TIMEOUT_S = 30.0
STOP_GRACE_S = 15.0
# Killed workers exit asynchronously; this is how long they get before counting as left behind.
SETTLE_TIMEOUT_S = 10.0
# Variables that would point the driver at another node or another key than the soak's own.
FOREIGN_ENV = ("ZMESH_ADDRESS", "ZMESH_CLUSTER_KEY_FILE")


class SoakTarget:
    """The soak actor: echoes, measures, and reports its own process."""

    def echo(self, value: Any) -> Any:
        return value

    def pid(self) -> int:
        return os.getpid()

    def collect(self) -> int:
        # Garbage that only a collection would free is not a leak: measure after one.
        gc.collect()
        return os.getpid()


class Churn:
    """A trivial actor, created and killed by the thousand."""

    def pid(self) -> int:
        return os.getpid()


def task_echo(value: int, nap_s: float = 0.0) -> tuple[int, int]:
    """The soak's task: its argument back, and which worker ran it."""
    time.sleep(nap_s)
    return value, os.getpid()


def task_stream(count: int) -> Iterator[int]:
    """The soak's streaming generator task: ``count`` items, one ref each."""
    yield from range(count)


class SoakFailure(Exception):
    """A phase saw a wrong result or a broken invariant."""


@dataclass(frozen=True)
class Counts:
    """How much each phase does; ``scaled`` shrinks them all for a quick run."""

    pipelined_calls: int = PIPELINED_CALLS
    sync_calls: int = SYNC_CALLS
    put_gets: int = PUT_GETS
    actors: int = ACTORS
    tasks: int = TASKS
    streams: int = STREAMS

    def scaled(self, factor: float) -> Counts:
        return Counts(*(max(1, round(n * factor)) for n in vars(self).values()))


@dataclass
class Snapshot:
    """Resource figures of every process of the run at the end of one phase."""

    phase: str
    elapsed_s: float
    procs: dict[str, dict[str, float]]
    live_actors: int
    socket_files: int
    zygote_children: int


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Soak:
    """One soak run: the node, the driver's handles and everything measured."""

    counts: Counts
    out: TextIO
    run_dir: Path
    pass_refs: bool = False
    node: subprocess.Popen[bytes] | None = None
    node_log: Path | None = None
    actor: Any = None
    worker_pid: int = 0
    zygote_pid: int = 0
    task_pids: set[int] = field(default_factory=set)  # the node's task workers that ran the soak's tasks
    started: float = field(default_factory=time.perf_counter)
    snapshots: list[Snapshot] = field(default_factory=list)
    rates: dict[str, float] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def rss_line(self) -> str:
        """Every process's RSS now, for the progress lines: a leak shows as a steady climb."""
        pids = {"driver": os.getpid(), "worker": self.worker_pid, "node": self.node.pid if self.node else 0, "zygote": self.zygote_pid}
        parts = []
        for role, pid in pids.items():
            try:
                parts.append(f"{role} {psutil.Process(pid).memory_info().rss / 1e6:.1f}")
            except (psutil.Error, ValueError):
                parts.append(f"{role} ?")
        tasks = 0.0
        for pid in self.task_pids:
            with contextlib.suppress(psutil.Error):
                tasks += psutil.Process(pid).memory_info().rss / 1e6
        parts.append(f"{len(self.task_pids)} task workers {tasks:.1f} in all")
        return "RSS MB: " + ", ".join(parts)


# --------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def start_node(soak: Soak, env: dict[str, str]) -> None:
    """Start ``zmesh node`` and wait for its banner.

    Its output goes to a file, not a pipe: the node logs a line per actor creation,
    and a pipe nobody drains would block it after a few thousand.
    """
    soak.node_log = soak.run_dir.parent / "node.log"
    with open(soak.node_log, "wb") as log:
        # A session of its own: Ctrl-C on the soak reaches only the soak, which stops the node itself.
        soak.node = subprocess.Popen(
            [sys.executable, "-m", "zmesh", "node", "--port", "0", "--num-cpus", "4"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while True:
        banner = [line for line in soak.node_log.read_text(errors="replace").splitlines() if line.startswith("zmesh node ")]
        if banner and "listening on" in banner[0]:
            soak.say(f"node pid {soak.node.pid}: {banner[0]}")
            return
        if soak.node.poll() is not None:
            raise SoakFailure(f"zmesh node exited with {soak.node.returncode}:\n{_tail(soak.node_log)}")
        if time.monotonic() > deadline:
            raise SoakFailure(f"zmesh node printed no banner within {NODE_START_TIMEOUT_S} s:\n{_tail(soak.node_log)}")
        time.sleep(0.05)


def find_zygote(node_pid: int) -> int:
    """The node's zygote: its only child running ``zmesh.node.pool.zygote`` (workers are the zygote's children)."""
    for child in psutil.Process(node_pid).children():
        with contextlib.suppress(psutil.Error):
            if "zmesh.node.pool.zygote" in " ".join(child.cmdline()):
                return int(child.pid)
    raise SoakFailure(f"node {node_pid} has no zygote child")


def stop_everything(soak: Soak) -> tuple[list[str], list[str]]:
    """Disconnect, SIGTERM the node, and report what was left behind; then kill whatever was.

    Returns the processes still alive after a graceful stop and the socket files
    still in the run directory: both should be empty.
    """
    with contextlib.suppress(Exception):
        zmesh.shutdown()
    node = soak.node
    if node is not None and node.poll() is None:
        node.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(STOP_GRACE_S)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    leftovers = zmesh_processes(str(soak.run_dir))
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.1)
        leftovers = zmesh_processes(str(soak.run_dir))
    left = []
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            left.append(f"pid {proc.pid} ({' '.join(proc.cmdline())[:80]})")
    # Now end everything by force: the node's process group, then anything of the run dir that escaped it.
    if node is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(leftovers, timeout=STOP_GRACE_S)
    sockets = sorted(p.name for p in (soak.run_dir / "s").glob("*")) if (soak.run_dir / "s").exists() else []
    return left, sockets


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


def _proc_stats(pid: int) -> dict[str, float]:
    proc = psutil.Process(pid)
    with proc.oneshot():
        return {"pid": pid, "rss_mb": proc.memory_info().rss / 1e6, "fds": proc.num_fds(), "threads": proc.num_threads()}


def take_snapshot(soak: Soak, phase: str) -> Snapshot:
    """Collect garbage where we can, then read every process's figures."""
    assert soak.node is not None
    gc.collect()
    worker_pid = zmesh.get(soak.actor.collect.remote(), timeout=GET_TIMEOUT_S)
    if worker_pid != soak.worker_pid:
        raise SoakFailure(f"the soak actor's worker changed from pid {soak.worker_pid} to {worker_pid}: it was restarted")
    zygote_pid = find_zygote(soak.node.pid)
    if zygote_pid != soak.zygote_pid:
        raise SoakFailure(f"the zygote changed from pid {soak.zygote_pid} to {zygote_pid}: it died and was restarted")
    pids = {"driver": os.getpid(), "worker": soak.worker_pid, "node": soak.node.pid, "zygote": zygote_pid}
    # Task workers the node let exit are left out: check_growth fails a role the warm-up had and the end lacks.
    pids.update((f"task {pid}", pid) for pid in sorted(soak.task_pids) if psutil.pid_exists(pid))
    rt = current()
    assert rt is not None
    status = rt.request("status")
    snapshot = Snapshot(
        phase=phase,
        elapsed_s=time.perf_counter() - soak.started,
        procs={role: _proc_stats(pid) for role, pid in pids.items()},
        live_actors=len(status["actors"]),
        socket_files=len(list(rundir.socket_dir().glob("*"))),
        zygote_children=len(psutil.Process(zygote_pid).children()),
    )
    soak.snapshots.append(snapshot)
    soak.say(f"== {phase} (t={snapshot.elapsed_s:.1f} s)")
    soak.say(f"   {'process':<12} {'pid':>8} {'RSS MB':>8} {'fds':>5} {'threads':>7}")
    for role, stats in snapshot.procs.items():
        soak.say(f"   {role:<12} {stats['pid']:>8.0f} {stats['rss_mb']:>8.1f} {stats['fds']:>5.0f} {stats['threads']:>7.0f}")
    soak.say(
        f"   live actors {snapshot.live_actors}, zygote children {snapshot.zygote_children}, "
        f"socket files {snapshot.socket_files}, dropped messages {status['dropped_messages']}, clients {status['clients']}"
    )
    return snapshot


class Progress:
    """Prints ``done/total`` with the rate since the last line and overall, about every 10 %."""

    def __init__(self, soak: Soak, what: str, total: int, unit: str, quiet: bool) -> None:
        self.soak, self.what, self.total, self.unit, self.quiet = soak, what, total, unit, quiet
        self.start = self.last_time = time.perf_counter()
        self.last_done = 0
        self.step = max(1, total // 10)
        self.next_report = self.step

    def update(self, done: int, extra: str = "") -> None:
        if self.quiet or done < self.next_report:
            return
        now = time.perf_counter()
        recent = (done - self.last_done) / max(now - self.last_time, 1e-9)
        overall = done / max(now - self.start, 1e-9)
        self.soak.say(
            f"   {self.what}: {done:,}/{self.total:,}  {recent:,.0f} {self.unit}/s now, {overall:,.0f} {self.unit}/s overall; "
            f"{self.soak.rss_line()}{extra}"
        )
        self.last_time, self.last_done = now, done
        while self.next_report <= done:
            self.next_report += self.step

    def rate(self, done: int) -> float:
        return done / max(time.perf_counter() - self.start, 1e-9)


# --------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------


def phase_calls(soak: Soak, pipelined: int, sync: int, quiet: bool = False) -> None:
    """``pipelined`` calls in windows of WINDOW in flight, with ``sync`` calls spread between the windows."""
    windows = max(1, -(-pipelined // WINDOW))
    progress = Progress(soak, "calls", pipelined + sync, "calls", quiet)
    done = sync_done = 0
    sync_time = 0.0
    for window in range(windows):
        base = window * WINDOW
        size = min(WINDOW, pipelined - base)
        refs = [soak.actor.echo.remote(i) for i in range(base, base + size)]
        if zmesh.get(refs, timeout=GET_TIMEOUT_S) != list(range(base, base + size)):
            raise SoakFailure(f"pipelined window {window}: wrong or out-of-order results")
        done += size
        # The sync calls due by now, so they end with the last window whatever the ratio.
        due = sync * (window + 1) // windows
        sync_start = time.perf_counter()
        while sync_done < due:
            if zmesh.get(soak.actor.echo.remote(-sync_done), timeout=GET_TIMEOUT_S) != -sync_done:
                raise SoakFailure(f"sync call {sync_done}: wrong result")
            sync_done += 1
            done += 1
        sync_time += time.perf_counter() - sync_start
        progress.update(done)
    if not quiet:
        soak.rates["calls (all) [calls/s]"] = progress.rate(done)
        soak.rates["sync calls [calls/s]"] = sync_done / max(sync_time, 1e-9)
        soak.say(f"   calls done: {progress.rate(done):,.0f} calls/s overall, sync {soak.rates['sync calls [calls/s]']:,.0f} calls/s")


def phase_put_get(soak: Soak, count: int, quiet: bool = False) -> None:
    """``get(put(v))`` ``count`` times with distinct values; with ``pass_refs``, every REF_TO_ACTOR_EVERY-th ref also goes to the actor."""
    progress = Progress(soak, "put/get", count, "pairs", quiet)
    for i in range(count):
        value = (i, PAYLOAD)
        ref = zmesh.put(value)
        if zmesh.get(ref, timeout=GET_TIMEOUT_S) != value:
            raise SoakFailure(f"put/get {i}: wrong value")
        if soak.pass_refs and i % REF_TO_ACTOR_EVERY == 0 and zmesh.get(soak.actor.echo.remote(ref), timeout=GET_TIMEOUT_S) != value:
            raise SoakFailure(f"put/get {i}: the actor got a wrong value for the ref")
        progress.update(i + 1)
    if not quiet:
        soak.rates["put/get [pairs/s]"] = progress.rate(count)
        soak.say(f"   put/get done: {progress.rate(count):,.0f} pairs/s overall")


def phase_actors(soak: Soak, count: int, quiet: bool = False) -> None:
    """Create and kill ``count`` actors, ACTOR_BATCH at a time, each answering once before it is killed."""
    churn = zmesh.remote(Churn)
    progress = Progress(soak, "actors", count, "actors", quiet)
    done = 0
    while done < count:
        batch = [churn.remote() for _ in range(min(ACTOR_BATCH, count - done))]
        pids = zmesh.get([a.pid.remote() for a in batch], timeout=GET_TIMEOUT_S)
        if len(set(pids)) != len(batch) or soak.worker_pid in pids:
            raise SoakFailure(f"actor batch at {done}: workers share pids {pids}")
        for actor in batch:
            zmesh.kill(actor)
        done += len(batch)
        del batch
        if not quiet and done >= progress.next_report:
            with contextlib.suppress(psutil.Error):
                progress.update(done, f"; zygote children {len(psutil.Process(soak.zygote_pid).children())}")
    if not quiet:
        soak.rates["actor create+kill [actors/s]"] = progress.rate(count)
        soak.say(f"   actors done: {progress.rate(count):,.0f} actors/s overall (create, one call, kill)")


def phase_tasks(soak: Soak, count: int, quiet: bool = False) -> None:
    """``count`` tasks in waves of TASK_WAVE submitted at once, each wave then got and checked; notes the task workers."""
    echo = zmesh.remote(task_echo)
    if quiet:
        # Slow tasks, several per CPU, take a lease on every CPU: the node starts all the task workers it keeps now.
        cpus = int(zmesh.cluster_resources().get("CPU", 1))
        soak.task_pids.update(pid for _, pid in zmesh.get([echo.remote(i, 0.1) for i in range(4 * cpus)], timeout=GET_TIMEOUT_S))
    progress = Progress(soak, "tasks", count, "tasks", quiet)
    done = 0
    while done < count:
        wave = range(done, min(done + TASK_WAVE, count))
        results = zmesh.get([echo.remote(i) for i in wave], timeout=GET_TIMEOUT_S)
        if [value for value, _ in results] != list(wave):
            raise SoakFailure(f"task wave at {done}: wrong or out-of-order results")
        soak.task_pids.update(pid for _, pid in results)
        done += len(wave)
        progress.update(done)
    if not quiet:
        soak.rates["tasks [tasks/s]"] = progress.rate(count)
        soak.say(f"   tasks done: {progress.rate(count):,.0f} tasks/s overall, on {len(soak.task_pids)} task worker(s)")


def phase_streams(soak: Soak, count: int, quiet: bool = False) -> None:
    """``count`` streaming generator tasks of STREAM_ITEMS items each, every item's ref got as it comes.

    Skipped (and said so) where this zmesh has no streaming generators yet.
    """
    if not hasattr(zmesh, "ObjectRefGenerator"):
        if not quiet:
            soak.say("   streams skipped: this zmesh has no streaming generators (zmesh.ObjectRefGenerator)")
        return
    stream = zmesh.remote(num_returns="streaming")(task_stream)
    progress = Progress(soak, "streams", count, "streams", quiet)
    for i in range(count):
        items = [zmesh.get(ref, timeout=GET_TIMEOUT_S) for ref in stream.remote(STREAM_ITEMS)]
        if items != list(range(STREAM_ITEMS)):
            raise SoakFailure(f"stream {i}: got {items}")
        progress.update(i + 1)
    if not quiet:
        soak.rates["streams [streams/s]"] = progress.rate(count)
        soak.say(f"   streams done: {progress.rate(count):,.0f} streams/s overall")


def _stray_children(soak: Soak) -> list[int]:
    """The zygote's children other than the soak actor's worker and the task workers: killed actors' workers."""
    children = {p.pid for p in psutil.Process(soak.zygote_pid).children()}
    return sorted(children - {soak.worker_pid} - soak.task_pids)


def wait_for_settled(soak: Soak) -> None:
    """Wait until killed actors' workers have exited and the node has forgotten them."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            if not _stray_children(soak):
                return
        time.sleep(0.1)


# --------------------------------------------------------------------------
# Checks and the report
# --------------------------------------------------------------------------


def check(soak: Soak, name: str, ok: bool, detail: str) -> None:
    soak.checks.append(Check(name, ok, detail))
    soak.say(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")


def check_growth(soak: Soak, baseline: Snapshot, end: Snapshot) -> None:
    """Per process: RSS, fds and threads from the end of the warm-up to the end, with the phase that grew most."""
    for role in baseline.procs:
        if role not in end.procs:
            check(soak, role, False, "this task worker exited after the warm-up: the node replaced it")
            continue
        for key, limit, unit, fmt in (
            ("rss_mb", RSS_LIMIT_MB, " MB", ".1f"),
            ("fds", FD_SLACK, "", ".0f"),
            ("threads", THREAD_SLACK, "", ".0f"),
        ):
            before, after = baseline.procs[role][key], end.procs[role][key]
            growth = after - before
            # The phase that added most, to say where a leak is; the first step (start -> warm-up) does not count.
            steps = [
                (b.procs[role][key] - a.procs[role][key], b.phase)
                for a, b in itertools.pairwise(soak.snapshots[1:])
                if role in a.procs and role in b.procs
            ]
            worst = max(steps, default=(0.0, "-"))
            detail = f"{before:{fmt}} -> {after:{fmt}} ({growth:+{fmt}}{unit}, limit +{limit:{fmt}}{unit})"
            if growth > 0 and worst[0] > 0:
                detail += f"; most {worst[1]} ({worst[0]:+{fmt}}{unit})"
            check(soak, f"{role} {key.removesuffix('_mb')}", growth <= limit, detail)
    check(soak, "live actors", end.live_actors == 1, f"{end.live_actors} at the end (the soak actor only)")
    children = end.zygote_children
    tasks = sum(1 for role in end.procs if role.startswith("task "))
    new = sorted(set(end.procs) - set(baseline.procs))
    check(soak, "task workers kept", not new, f"{tasks} at the end, {', '.join(new) or 'none'} started after the warm-up")
    check(
        soak,
        "killed workers gone",
        children == 1 + tasks,
        f"the zygote has {children} child process(es), the soak actor's worker and {tasks} task worker(s) only",
    )
    check(
        soak,
        "socket files during the run",
        end.socket_files <= baseline.socket_files,
        f"{baseline.socket_files} after warm-up, {end.socket_files} at the end",
    )


def report_json(soak: Soak, ok: bool, error: str | None) -> str:
    return json.dumps(
        {
            "ok": ok,
            "error": error,
            "counts": vars(soak.counts),
            "rates": soak.rates,
            "snapshots": [vars(s) for s in soak.snapshots],
            "checks": [vars(c) for c in soak.checks],
        },
        indent=2,
    )


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C does, so the cleanup runs either way."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(soak: Soak) -> None:
    """Connect, warm up, run the phases, measure; raises SoakFailure on a wrong result."""
    counts = soak.counts
    zmesh.init(address="auto")
    soak.actor = zmesh.remote(SoakTarget).remote()
    soak.worker_pid = zmesh.get(soak.actor.pid.remote(), timeout=GET_TIMEOUT_S)
    assert soak.node is not None
    soak.zygote_pid = find_zygote(soak.node.pid)
    take_snapshot(soak, "start")

    def warm(n: int) -> int:
        return max(1, round(n * WARMUP_FRACTION))

    soak.say("warm-up ...")
    phase_calls(soak, warm(counts.pipelined_calls), warm(counts.sync_calls), quiet=True)
    phase_put_get(soak, warm(counts.put_gets), quiet=True)
    phase_actors(soak, warm(counts.actors), quiet=True)
    phase_tasks(soak, warm(counts.tasks), quiet=True)
    phase_streams(soak, warm(counts.streams), quiet=True)
    wait_for_settled(soak)
    baseline = take_snapshot(soak, "after warm-up")

    phases: list[tuple[str, str, Callable[[], None]]] = [
        (
            "calls",
            f"{counts.pipelined_calls:,} pipelined + {counts.sync_calls:,} sync calls",
            lambda: phase_calls(soak, counts.pipelined_calls, counts.sync_calls),
        ),
        ("put/get", f"{counts.put_gets:,} put/get pairs", lambda: phase_put_get(soak, counts.put_gets)),
        ("actors", f"{counts.actors:,} actor creations and kills", lambda: phase_actors(soak, counts.actors)),
        ("tasks", f"{counts.tasks:,} tasks in waves of {TASK_WAVE:,}", lambda: phase_tasks(soak, counts.tasks)),
        ("streams", f"{counts.streams:,} streams of {STREAM_ITEMS} items", lambda: phase_streams(soak, counts.streams)),
    ]
    for name, title, body in phases:
        soak.say(f"{title} ...")
        body()
        wait_for_settled(soak)
        take_snapshot(soak, f"after {name}")
    check_growth(soak, baseline, soak.snapshots[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every count by this (0.01: a smoke run)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on stdout (progress goes to stderr)")
    parser.add_argument(
        "--pass-refs",
        action="store_true",
        help="also pass every 10th put ref to the actor (cross-process reference counting)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 100:
        parser.error("--scale must be in (0, 100]")
    tmp = Path(tempfile.mkdtemp(prefix="zmesh-soak-"))
    run_dir = tmp / "run"
    config = tmp / "config"
    run_dir.mkdir(mode=0o700)
    config.mkdir(mode=0o700)
    # The driver finds the node (address="auto") and its key through these, as any user's driver would.
    for name in FOREIGN_ENV:
        os.environ.pop(name, None)
    os.environ["ZMESH_RUN_DIR"] = str(run_dir)
    os.environ["XDG_CONFIG_HOME"] = str(config)
    soak = Soak(counts=Counts().scaled(args.scale), out=sys.stderr if args.json else sys.stdout, run_dir=run_dir, pass_refs=args.pass_refs)
    soak.say(f"zmesh soak, scale {args.scale}{', passing refs' if args.pass_refs else ''}: {soak.counts}; run dir {run_dir}")
    error: str | None = None
    interrupted = False
    with sigterm_as_interrupt():
        try:
            start_node(soak, os.environ.copy())
            run(soak)
        except KeyboardInterrupt:
            interrupted, error = True, "interrupted"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            # A second Ctrl-C must not cut the cleanup short and leave processes behind.
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                left, sockets = stop_everything(soak)
            finally:
                signal.signal(signal.SIGINT, previous)
    if error is not None:
        soak.say(f"FAIL  run: {error}")
        if soak.node_log is not None:
            soak.say(f"node log tail:\n{_tail(soak.node_log)}")
    check(soak, "no process left behind", not left, ", ".join(left) or "none of the run dir's after SIGTERM to the node")
    check(soak, "no socket file left", not sockets, ", ".join(sockets) or f"{run_dir / 's'} is empty")
    ok = error is None and all(c.ok for c in soak.checks)
    for role in soak.snapshots[1].procs if len(soak.snapshots) >= 2 else ():
        if role in soak.snapshots[-1].procs:
            first, last = soak.snapshots[1].procs[role], soak.snapshots[-1].procs[role]
            soak.say(f"   {role:<12} RSS {first['rss_mb']:.1f} -> {last['rss_mb']:.1f} MB since warm-up")
    soak.say(f"{'PASS' if ok else 'FAIL'} ({time.perf_counter() - soak.started:.0f} s)")
    if args.json:
        print(report_json(soak, ok, error), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    if interrupted:
        return 130
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
