"""Torture-test workloads of remote functions (tasks): the ops they are made of, the tasks they run, a runner that checks them.

A workload is a few caller threads, in one or several driver processes, each playing a list of
ops: task chains passing refs (top-level or nested in a list) with faults on the way, tasks that
submit tasks and get them, fan-out/fan-in, cancels, streaming generator tasks taken whole or
stopped early (with an error mid-stream, and windows down to one item). Every ref an op makes is judged exactly:
its value, or the one error the op allows. A worker kill (a crashing task, a forced cancel) may
also take tasks that were in flight on the same lease; those cost a retry, so a task with fewer
retries than the workload has kills may end with WorkerCrashedError, and nothing else.

After the callers, the runner checks that nothing is left: the driver's objects, reference
counts and task state are back where they were, sampled task workers hold no objects, and every
node has no granted or waiting lease and no busy task worker once the leases linger out.

A new op kind is one more dataclass, one branch in ``_submit`` returning its Pending refs, and one
strategy in the test file.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torture_workloads as tw
from torture_workloads import Caller, Collect

import zmesh
from zmesh import runtime as zmesh_runtime
from zmesh.exceptions import GetTimeoutError, TaskCancelledError, TaskError, WorkerCrashedError
from zmesh.testing import wait_for

HERE = Path(__file__).resolve().parent
INNER_TIMEOUT = 20.0  # bounds every wait inside a task, so a lost task shows up as an error, not a hang
SLEEP_S = 20.0  # how long a task that waits to be cancelled or released runs at most

# ------------------------------------------------------------------ the tasks


def first_time(marker: str) -> bool:
    """True the first time ``marker`` is seen (it is made then): a retry of the same task finds it."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


@zmesh.remote
def link(x: Any, salt: str, mode: str, fault: str, marker: str) -> list[Any]:
    """One link of a chain: ``[salt, previous]``; ``mode`` "nested": ``x`` is ``[ref]`` to the previous link, fetched here."""
    prev = zmesh.get(x[0], timeout=INNER_TIMEOUT) if mode == "nested" else x
    if fault == "raise" or (fault == "raise_once" and first_time(marker)):
        raise ValueError(f"boom {salt}")
    if fault == "exit_once" and first_time(marker):
        os._exit(1)
    if fault == "kill_once" and first_time(marker):
        os.kill(os.getpid(), signal.SIGKILL)
    return [salt, prev]


@zmesh.remote
def nest(depth: int, width: int, value: Any, how: str) -> Any:
    """``width`` children one level down, each the same, fetched with get or wait: ``[depth, [child, ...]]``."""
    if depth == 0:
        return value
    refs = [nest.remote(depth - 1, width, value, how) for _ in range(width)]
    if how == "wait":
        ready, _ = zmesh.wait(refs, num_returns=len(refs), timeout=INNER_TIMEOUT)
        if len(ready) != len(refs):
            raise TimeoutError(f"{len(refs) - len(ready)} child tasks never ended")
    return [depth, zmesh.get(refs, timeout=INNER_TIMEOUT)]


@zmesh.remote
def produce(count: int, value: Any, fail_at: int | None) -> Any:
    """A streaming task: ``[i, value]`` for each i, raising instead at ``fail_at``."""
    for i in range(count):
        if i == fail_at:
            raise ValueError(f"stream broke at {i}")
        yield [i, value]


@zmesh.remote
def ident(i: int, value: Any) -> list[Any]:
    return [i, value]


@zmesh.remote
def gather(*values: Any) -> list[Any]:
    return list(values)


@zmesh.remote
def gather_nested(refs: list[Any]) -> list[Any]:
    return list(zmesh.get(refs, timeout=INNER_TIMEOUT))


@zmesh.remote
def sleeper(started: str, release: str) -> str:
    """Says it started (a file), then runs until ``release`` exists (or SLEEP_S): a task to cancel while it runs."""
    Path(started).touch()
    end = time.monotonic() + SLEEP_S
    while time.monotonic() < end and not os.path.exists(release):
        time.sleep(0.01)
    return "released"


@zmesh.remote
def held() -> int:
    """How many objects this task worker's runtime tracks (a zmesh internal): 0 between tasks but for this one's own."""
    gc.collect()
    return len(zmesh_runtime.current().objects._entries)


# ------------------------------------------------------------------ workloads


@dataclasses.dataclass(frozen=True)
class Opts:
    """A task's options: ``max_retries``, ``retry_exceptions`` (False, True, or "ValueError"/"KeyError": that class only), SPREAD."""

    max_retries: int = 3
    retry_exceptions: bool | str = False
    spread: bool = False

    def kwargs(self) -> dict[str, Any]:
        retry = self.retry_exceptions
        out: dict[str, Any] = {
            "max_retries": self.max_retries,
            "retry_exceptions": retry if isinstance(retry, bool) else [{"ValueError": ValueError, "KeyError": KeyError}[retry]],
        }
        if self.spread:
            out["scheduling_strategy"] = "SPREAD"
        return out

    def retries_on_value_error(self) -> bool:
        return self.max_retries != 0 and self.retry_exceptions in (True, "ValueError")


@dataclasses.dataclass(frozen=True)
class Link:
    """A chain link: gets the previous link's ref top-level ("top") or in a list ("nested"); ``fault``: "", "raise"
    (always), "raise_once", "exit_once" (os._exit) or "kill_once" (SIGKILL of itself)."""

    mode: str = "top"
    fault: str = ""
    opts: Opts = Opts()


@dataclasses.dataclass(frozen=True)
class Chain:
    """``links`` tasks, each taking the previous one's ref; the first takes ``value`` (a workload value, tw.Blob etc.)."""

    links: tuple[Link, ...]
    value: Any = None


@dataclasses.dataclass(frozen=True)
class Nest:
    """A task that submits ``width`` tasks that each submit ... ``depth`` levels deep, and gets them (``how``: get or wait)."""

    depth: int
    width: int
    value: Any = None
    how: str = "get"
    opts: Opts = Opts()


@dataclasses.dataclass(frozen=True)
class Fan:
    """``count`` tasks at once, then fan-in: the caller waits on them ("wait"), or one task takes them all, top-level or nested."""

    count: int
    how: str = "wait"
    value: Any = None
    opts: Opts = Opts()


@dataclasses.dataclass(frozen=True)
class Cancel:
    """zmesh.cancel of a task "pending" (its input not there yet), "running", "force" (running, its worker killed) or "now"
    (just submitted: it may have finished already)."""

    when: str


@dataclasses.dataclass(frozen=True)
class Stream:
    """A generator task of ``count`` items ``[i, value]``, raising at ``fail_at`` if set; the caller takes ``take`` refs
    (fewer than it makes: an early stop, the generator dropped there) with ``window`` as its back-pressure window."""

    count: int
    take: int
    fail_at: int | None = None
    window: int | None = None
    value: Any = None


@dataclasses.dataclass(frozen=True)
class TaskWorkload:
    callers: tuple[Caller, ...]

    @property
    def drivers(self) -> int:
        return 1 + max(c.driver for c in self.callers)

    def kills(self) -> int:
        """Worker kills in the whole workload: each may also take the tasks in flight on its lease."""
        count = 0
        for c in self.callers:
            for op in c.ops:
                if isinstance(op, Chain):
                    count += sum(1 for x in op.links if x.fault in ("exit_once", "kill_once"))
                elif isinstance(op, Cancel) and op.when == "force":
                    count += 1
        return count

    def retries(self) -> bool:
        """Whether a task may run again: a kill (it retries what was in flight on its worker) or a raise that retries."""
        return self.kills() > 0 or any(
            isinstance(op, Chain) and any(x.fault in ("raise", "raise_once") and x.opts.retries_on_value_error() for x in op.links)
            for c in self.callers
            for op in c.ops
        )

    def collateral(self, opts: Opts) -> tuple[type[BaseException], ...]:
        """The error a task with ``opts`` may end with through no fault of its own (a kill of the worker it was queued on)."""
        return (WorkerCrashedError,) if opts.max_retries != -1 and self.kills() > opts.max_retries else ()

    def nbytes(self) -> int:
        total = 0
        for c in self.callers:
            for op in c.ops:
                if isinstance(op, Chain):
                    total += (2 + len(op.links)) * tw.value_bytes(op.value)
                elif isinstance(op, Nest):
                    total += (2 + 2 * op.width**op.depth) * tw.value_bytes(op.value)
                elif isinstance(op, Fan):
                    total += (2 + 3 * op.count) * tw.value_bytes(op.value)
                elif isinstance(op, Stream):
                    total += (2 + op.count) * tw.value_bytes(op.value)
        return total


# ------------------------------------------------------------------ expected outcomes


@dataclasses.dataclass(frozen=True)
class Boom:
    """Expected: TaskError that is also a ValueError, with ``text`` in its message."""

    text: str


@dataclasses.dataclass(frozen=True)
class Fails:
    """Expected: an error of class ``error`` (TaskError wrapping it included, as a nested get re-raises it)."""

    error: type[BaseException]


@dataclasses.dataclass
class Pending:
    where: str
    ref: Any
    want: Any  # a value (tw.RefTo for refs inside), Boom or Fails
    errors: tuple[type[BaseException], ...] = ()  # errors it may end with instead


def chain_outcome(w: TaskWorkload, op: Chain, salts: list[str], want0: Any) -> tuple[Any, tuple[type[BaseException], ...]]:
    """What the last link of ``op`` ends as, and the errors it may end with instead. The first error on the way wins:
    a link whose top-level input failed fails with that error unrun; a nested one re-raises it from get."""
    want: Any = want0
    errors: set[type[BaseException]] = set()
    for salt, lk in zip(salts, op.links, strict=True):
        errors |= set(w.collateral(lk.opts))
        if lk.fault == "raise_once" and lk.opts.retries_on_value_error() and lk.opts.max_retries != -1 and w.kills() > 0:
            # One budget for both, as Ray's max_retries: a kill of the worker the link was queued on may spend its
            # retry before it first runs, and its one raise then ends it (CI found it, under load).
            errors.add(ValueError)
        if isinstance(want, Boom | Fails):
            continue
        if lk.fault == "raise" or (lk.fault == "raise_once" and not lk.opts.retries_on_value_error()):
            want = Boom(f"boom {salt}")
        elif lk.fault in ("exit_once", "kill_once") and lk.opts.max_retries == 0:
            want = Fails(WorkerCrashedError)
        else:
            want = [salt, want]
    return want, tuple(sorted(errors, key=lambda e: e.__name__))


def nest_want(depth: int, width: int, value: Any) -> Any:
    return value if depth == 0 else [depth, [nest_want(depth - 1, width, value) for _ in range(width)]]


# ------------------------------------------------------------------ playing


def _submit(w: TaskWorkload, op: Any, where: str, salt: str, scratch: Path, deadline: float) -> list[Pending]:
    """Submit one op's tasks; return every ref it made with what it must end as."""
    builder = tw._Builder([])
    if isinstance(op, Chain):
        arg, want = builder.build(op.value)
        salts = [f"{salt}l{i}" for i in range(len(op.links))]
        x = arg
        for i, lk in enumerate(op.links):
            fn = link.options(**lk.opts.kwargs())
            x = fn.remote([x] if lk.mode == "nested" and i else x, salts[i], lk.mode if i else "top", lk.fault, str(scratch / salts[i]))
        last, errors = chain_outcome(w, op, salts, tw.top(want))
        return [Pending(where, x, last, errors)]
    if isinstance(op, Nest):
        arg, want = builder.build(op.value)
        ref = nest.options(**op.opts.kwargs()).remote(op.depth, op.width, arg, op.how)
        # The children have the default options (3 retries), only the top task has op.opts.
        errors = tuple(set(w.collateral(op.opts)) | set(w.collateral(Opts())))
        return [Pending(where, ref, nest_want(op.depth, op.width, tw.top(want)), errors)]
    if isinstance(op, Fan):
        arg, want = builder.build(op.value)
        fn = ident.options(**op.opts.kwargs())
        refs = [fn.remote(i, arg) for i in range(op.count)]
        wants = [[i, tw.top(want)] for i in range(op.count)]
        errors = w.collateral(op.opts)
        out = [Pending(f"{where} #{i}", r, v, errors) for i, (r, v) in enumerate(zip(refs, wants, strict=True))]
        if op.how == "wait":
            check_wait(refs, where, deadline)
        else:
            fan_in = gather.remote(*refs) if op.how == "top" else gather_nested.remote(refs)
            out.append(Pending(f"{where} fan-in", fan_in, wants, tuple(set(errors) | set(w.collateral(Opts())))))
        return out
    if isinstance(op, Cancel):
        return _cancel(w, op, where, salt, scratch, deadline)
    if isinstance(op, Stream):
        return _stream(w, op, where, builder, deadline)
    raise TypeError(f"not a task workload op: {op!r}")


def _cancel(w: TaskWorkload, op: Cancel, where: str, salt: str, scratch: Path, deadline: float) -> list[Pending]:
    started, release = scratch / f"{salt}-started", scratch / f"{salt}-release"
    collateral = w.collateral(Opts())
    if op.when == "pending":
        gate = sleeper.remote(str(started), str(release))
        ref = ident.remote(0, gate)
        zmesh.cancel(ref)
        release.touch()
        return [Pending(where, ref, Fails(TaskCancelledError)), Pending(f"{where} gate", gate, "released", collateral)]
    if op.when == "now":
        release.touch()
        ref = sleeper.remote(str(started), str(release))
        zmesh.cancel(ref)
        return [Pending(where, ref, "released", (TaskCancelledError, *collateral))]
    ref = sleeper.remote(str(started), str(release))
    try:
        wait_for(started.exists, timeout=max(tw._left(deadline), 0.1), interval=0.01, what="the task to cancel to start")
    except TimeoutError:
        raise AssertionError(f"{where}: the task to cancel never started") from None
    zmesh.cancel(ref, force=op.when == "force")
    return [Pending(where, ref, Fails(TaskCancelledError))]


def _stream(w: TaskWorkload, op: Stream, where: str, builder: Any, deadline: float) -> list[Pending]:
    """Take ``op.take`` refs from a generator task, in order; at its end, the next one is StopIteration."""
    arg, want = builder.build(op.value)
    fn = produce.options(_generator_backpressure_num_objects=op.window) if op.window else produce
    gen = fn.remote(op.count, arg, op.fail_at)
    fails = op.fail_at is not None and op.fail_at < op.count
    made = op.fail_at + 1 if fails and op.fail_at is not None else op.count  # the failing item is a ref too: its get raises
    # A stream is never retried: a kill of the worker it shares a lease with may end it early.
    errors = w.collateral(Opts(max_retries=0))
    out = []
    for i in range(min(op.take, made)):
        try:
            ref = gen._next_sync(max(tw._left(deadline), 0.1))
        except errors:
            return out
        except StopIteration:
            raise AssertionError(f"{where}: the stream ended after {i} of {made} items") from None
        if fails and i == op.fail_at:
            out.append(Pending(f"{where} item {i}", ref, Boom(f"stream broke at {i}")))
        else:
            out.append(Pending(f"{where} item {i}", ref, [i, tw.top(want)], errors))
    if op.take >= made:
        try:
            extra = gen._next_sync(max(tw._left(deadline), 0.1))
        except StopIteration:
            return out
        except errors:
            return out
        raise AssertionError(f"{where}: the stream gave a ref past its {made} items: {extra!r}")
    del gen  # an early stop: the producer is told to stop, and the items it made past ``take`` are freed
    return out


def check_wait(refs: list[Any], where: str, deadline: float) -> None:
    """zmesh.wait on many task refs: a partial wait, then all of them; ready lists in input order, nothing lost."""
    half = max(1, len(refs) // 2)
    ready, rest = zmesh.wait(refs, num_returns=half, timeout=tw._left(deadline))
    assert len(ready) == half, f"{where}: zmesh.wait(num_returns={half}) gave {len(ready)} ready refs"
    assert [r for r in refs if r in set(ready)] == ready, f"{where}: zmesh.wait's ready list is out of order"
    assert collections.Counter(ready + rest) == collections.Counter(refs), f"{where}: zmesh.wait lost or invented refs"
    left = zmesh.wait(rest, num_returns=len(rest), timeout=tw._left(deadline))[1] if rest else []
    assert not left, f"{where}: {len(left)} tasks never ended"


def run_caller(w: TaskWorkload, index: int, scratch: Path, deadline: float) -> None:
    caller = w.callers[index]
    pending: list[Pending] = []
    for k, op in enumerate(caller.ops):
        if isinstance(op, Collect):
            settle(pending, op.how, deadline)
            pending = []
            continue
        pending += _submit(w, op, f"caller {index} op {k} {tw._brief(op)}", f"c{index}o{k}", scratch, deadline)
    settle(pending, caller.finish, deadline)


def settle(pending: list[Pending], how: str, deadline: float) -> None:
    refs = [p.ref for p in pending]
    settle_fn = {"get": tw._settle_get, "wait": tw._settle_wait, "await": tw._settle_await}[how]
    for p, (ok, value) in zip(pending, settle_fn(pending, refs, deadline), strict=True):  # type: ignore[operator]
        judge(p, ok, value, deadline)


def judge(p: Pending, ok: bool, value: Any, deadline: float) -> None:
    """Check one ref's outcome against what its op allows."""
    if not ok:
        exc = value
        if isinstance(p.want, Boom) and isinstance(exc, TaskError) and isinstance(exc, ValueError) and p.want.text in str(exc):
            return
        if isinstance(p.want, Fails) and isinstance(exc, p.want.error):
            return
        if isinstance(exc, p.errors):
            return
        raise AssertionError(f"{p.where}: raised {type(exc).__name__} (expected {p.want!r:.80}, or {p.errors}): {exc}") from exc
    if isinstance(p.want, Boom | Fails):
        raise AssertionError(f"{p.where}: returned {value!r:.80} instead of raising {p.want}")
    try:
        tw.same(value, p.want, tw._left(deadline), p.where)
    except GetTimeoutError as exc:
        raise AssertionError(f"{p.where}: a nested ref never resolved: {exc}") from exc


def play_driver(w: TaskWorkload, driver: int, scratch: Path, deadline: float) -> None:
    """Run this driver's callers at once, the first on this thread; re-raise the first failure."""
    mine = [i for i, c in enumerate(w.callers) if c.driver == driver]
    if not mine:
        return
    start = threading.Barrier(len(mine))
    failures: dict[int, BaseException] = {}

    def run(i: int) -> None:
        try:
            start.wait(timeout=tw._left(deadline))
            run_caller(w, i, scratch, deadline)
        except BaseException as exc:
            failures[i] = exc

    threads = [threading.Thread(target=run, args=(i,), name=f"torture-task-caller-{i}", daemon=True) for i in mine[1:]]
    for t in threads:
        t.start()
    run(mine[0])
    for t in threads:
        t.join(tw._left(deadline) + 10)
    if any(t.is_alive() for t in threads):
        raise AssertionError("task callers still running past the deadline")
    if failures:
        raise failures[min(failures)]


# ------------------------------------------------------------------ leaks


def residue(rt: Any) -> dict[str, int]:
    """The driver's per-call state (zmesh internals): objects, refcounts, actor calls, and tasks unfinished, queued, in flight."""
    tc = rt.task_calls
    return {
        **tw.residue(rt),
        "tasks": tc.pending,
        "queued": sum(len(s.queue) for s in list(tc._shapes.values())),
        "inflight": sum(len(x.inflight) for x in list(tc._leases.values())),
        "streams": len(rt.streams),
    }


def wait_clean(rt: Any, before: dict[str, int], what: str) -> None:
    gc.collect()
    try:
        wait_for(lambda: all(v <= before.get(k, 0) for k, v in residue(rt).items()), timeout=5, interval=0.05, what=what)
    except TimeoutError:
        raise AssertionError(f"{what}: still holds {residue(rt)} (before the workload: {before})") from None


def check_task_workers(deadline: float, probes: int = 4) -> None:
    """A few task workers (whichever the probes land on) hold no objects once their tasks are done."""
    last: list[list[int]] = []

    def clean() -> bool:
        last.append(zmesh.get([held.remote() for _ in range(probes)], timeout=max(tw._left(deadline), 5)))
        return not any(last[-1])

    try:
        wait_for(clean, timeout=5, interval=0.1, what="task workers to let go of their objects")
    except TimeoutError:
        raise AssertionError(f"task workers still hold objects after the workload: {last[-1]}") from None


# Node statuses to check for leases once idle: set by the tests (the connected node, or every node of a cluster).
STATUS: list[Callable[[], dict[str, Any]]] = []
# Set by the mesh variant: extra drivers connect to these nodes in turn.
MESH_ADDRESSES: list[str] = []


def check_leases() -> None:
    """Every node: no lease granted or waiting, and every task worker idle, once the leases linger out (0.2 s)."""
    for i, status in enumerate(STATUS or [zmesh.api._status]):
        last: list[dict[str, Any]] = []

        def idle(status: Callable[[], dict[str, Any]] = status, last: list[dict[str, Any]] = last) -> bool:
            tasks = status()["tasks"]
            last.append(tasks)
            return tasks["granted"] == 0 and not tasks["waiting"] and tasks["workers"] == tasks["idle_workers"]

        try:
            wait_for(idle, timeout=5, interval=0.05, what=f"node {i}'s task leases to go back")
        except TimeoutError:
            raise AssertionError(f"node {i} still has task leases or busy task workers once idle: {last[-1]}") from None


def play(w: TaskWorkload, *, scratch: Path, seconds: float) -> None:
    """Run every driver's callers at once, check every ref, then check that nothing is left behind."""
    rt = zmesh_runtime.current()
    deadline = time.monotonic() + seconds
    before = residue(rt)
    stores = STATUS or [zmesh.api._status]
    stored = tw.stores_now(stores)
    extras: list[subprocess.Popen[str]] = []
    try:
        for d in range(1, w.drivers):
            extras.append(start_driver(w, d, scratch, deadline))
        for proc in extras:
            tw.await_line(proc, "ready", deadline, scratch)
        for proc in extras:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        play_driver(w, 0, scratch, deadline)
        for d, proc in enumerate(extras, 1):
            try:
                proc.wait(tw._left(deadline) + 10)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"driver {d} still running past the deadline:\n{tw.driver_log(scratch, d)}") from None
            if proc.returncode != 0:
                raise AssertionError(f"driver {d} failed (exit {proc.returncode}):\n{tw.driver_log(scratch, d)}")
    finally:
        for proc in extras:
            tw.stop_driver(proc, deadline)
    check_task_workers(deadline)
    wait_clean(rt, before, "the driver")
    check_leases()
    tw.wait_stores_clean(stores, stored, "every segment of the workload freed")


def start_driver(w: TaskWorkload, index: int, scratch: Path, deadline: float) -> subprocess.Popen[str]:
    """Another driver process for the callers of driver ``index``; it says "ready", then waits for "go"."""
    path = scratch / f"driver{index}.pickle"
    path.write_bytes(pickle.dumps((w, index, str(scratch), deadline)))
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import torture_tasks; torture_tasks.driver_main({str(path)!r})"
    env = dict(os.environ)
    if MESH_ADDRESSES:
        env["ZMESH_ADDRESS"] = MESH_ADDRESSES[index % len(MESH_ADDRESSES)]  # each driver on another node
    with open(scratch / f"driver{index}.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd=HERE.parent, env=env
        )


def driver_main(path: str) -> None:
    """Entry point of an extra driver process: connect, run its callers, check its own leftovers, exit."""
    w, index, scratch, deadline = pickle.loads(Path(path).read_bytes())
    zmesh.init(address="auto")
    rt = zmesh_runtime.current()
    before = residue(rt)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit(3)
    play_driver(w, index, Path(scratch), deadline)
    wait_clean(rt, before, f"driver {index}")
    zmesh.shutdown()
