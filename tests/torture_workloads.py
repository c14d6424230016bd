"""Torture-test workloads: what they are made of, the actors they call, and a runner that plays and checks them."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import gc
import itertools
import os
import pickle
import select
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmesh
from zmesh import runtime as zmesh_runtime
from zmesh.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, TaskError
from zmesh.testing import wait_for, zmesh_processes

HERE = Path(__file__).resolve().parent
KINDS = ("sequential", "threaded", "async", "grouped")
HOWS = ("get", "wait", "await")
GROUPS = {"io": 2, "compute": 1}

# Everything between the two prelude markers is copied verbatim into the reproducer scripts that
# Workload.to_python() prints, so a printed workload runs with nothing but zmesh and numpy installed.
# ---- script prelude begins

ACTOR_TIMEOUT = 10.0  # bounds every wait inside an actor, so a lost call shows up as an error, not a hang


def blob(size: int, kind: str = "bytes") -> bytes | str:
    """``size`` bytes or characters in a pattern with no long runs, so a misplaced copy cannot look right."""
    if kind == "bytes":
        return (bytes(range(1, 252)) * (size // 251 + 1))[:size]
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789" if kind == "str" else "zmesh-\u00fc\u20ac\U0001d11e"
    return (alphabet * (size // len(alphabet) + 1))[:size]


def arr(dtype: str, n: int, layout: str = "c") -> Any:
    """``n`` elements of ``dtype``: contiguous ("c"), a Fortran-ordered 2-D array ("f") or every other element ("strided")."""
    import numpy as np  # imported here: workers import this module, and most of them never see an array

    base = np.arange(2 * n if layout == "strided" else n) % 251 + 1
    values = base % 2 == 0 if dtype == "bool" else base.astype(dtype)
    if layout == "strided":
        return values[::2]
    if layout == "f" and n >= 2 and n % 2 == 0:
        return np.asfortranarray(values.reshape(2, n // 2))
    return values


def keep(made: list[Any], value: Any) -> Any:
    """Remember an array the caller will change right after passing it."""
    made.append(value)
    return value


def resolve(value: Any) -> Any:
    """``value`` with every ObjectRef inside it replaced by its value (fetched with zmesh.get)."""
    if isinstance(value, zmesh.ObjectRef):
        return resolve(zmesh.get(value, timeout=ACTOR_TIMEOUT))
    if type(value) in (list, tuple):
        return type(value)(resolve(v) for v in value)
    if type(value) is dict:
        return {k: resolve(v) for k, v in value.items()}
    return value


async def resolve_async(value: Any) -> Any:
    """``resolve`` for asyncio code: each ObjectRef is awaited."""
    if isinstance(value, zmesh.ObjectRef):
        return await resolve_async(await asyncio.wait_for(awaited(value), ACTOR_TIMEOUT))
    if type(value) in (list, tuple):
        return type(value)([await resolve_async(v) for v in value])
    if type(value) is dict:
        return {k: await resolve_async(v) for k, v in value.items()}
    return value


async def awaited(ref: Any) -> Any:
    return await ref


def fetch(ref: Any, how: str) -> Any:
    """The value behind ``ref``, obtained the way ``how`` says: zmesh.get, zmesh.wait then get, or await."""
    if how == "await":
        return asyncio.run(asyncio.wait_for(awaited(ref), ACTOR_TIMEOUT))
    if how == "wait":
        ready, _ = zmesh.wait([ref], timeout=ACTOR_TIMEOUT)
        if not ready:
            raise TimeoutError(f"zmesh.wait: {ref} not ready after {ACTOR_TIMEOUT} s")
        return zmesh.get(ref, timeout=0)
    return zmesh.get(ref, timeout=ACTOR_TIMEOUT)


def crash_once(marker: str) -> None:
    """Exit the worker the first time ``marker`` is seen; a retry of the same call finds it and goes on."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


class Echoer:
    """Sends back what it gets; records per caller the last sequence number it ran, for the order check."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}

    def _record(self, caller: str, seq: int) -> tuple[int, int]:
        prev = self.last.get(caller, -1)
        self.last[caller] = seq
        return os.getpid(), prev

    def echo(self, caller: str, seq: int, value: Any, deref: bool) -> tuple[int, int, Any]:
        pid, prev = self._record(caller, seq)
        return pid, prev, resolve(value) if deref else value

    def plain(self, value: Any) -> Any:
        return value

    def fail(self, caller: str, seq: int) -> None:
        self._record(caller, seq)
        raise ValueError(f"boom {caller}#{seq}")

    def crash(self, caller: str, seq: int, marker: str) -> tuple[int, int, str]:
        crash_once(marker)
        pid, prev = self._record(caller, seq)
        return pid, prev, "survived"

    def relay(self, target: Any, value: Any, how: str) -> Any:
        return fetch(target.plain.remote(value), how)

    def held(self) -> int:
        """How many objects this worker's runtime still tracks (a zmesh internal): 0 once its calls are done."""
        from zmesh import runtime

        gc.collect()  # refs caught in reference cycles count only until the collector runs, as in the driver's check
        return len(runtime.current().objects._entries)


class GroupedEchoer(Echoer):
    """An Echoer whose relays and plain echoes run in concurrency groups of their own."""

    @zmesh.method(concurrency_group="io")
    def relay(self, target: Any, value: Any, how: str) -> Any:
        return super().relay(target, value, how)

    @zmesh.method(concurrency_group="compute")
    def plain(self, value: Any) -> Any:
        return value


class AsyncEchoer:
    """The Echoer's methods as coroutines: an async actor."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}

    def _record(self, caller: str, seq: int) -> tuple[int, int]:
        prev = self.last.get(caller, -1)
        self.last[caller] = seq
        return os.getpid(), prev

    async def echo(self, caller: str, seq: int, value: Any, deref: bool) -> tuple[int, int, Any]:
        pid, prev = self._record(caller, seq)
        return pid, prev, await resolve_async(value) if deref else value

    async def plain(self, value: Any) -> Any:
        return value

    async def fail(self, caller: str, seq: int) -> None:
        self._record(caller, seq)
        raise ValueError(f"boom {caller}#{seq}")

    async def crash(self, caller: str, seq: int, marker: str) -> tuple[int, int, str]:
        crash_once(marker)
        pid, prev = self._record(caller, seq)
        return pid, prev, "survived"

    async def relay(self, target: Any, value: Any, how: str) -> Any:
        ref = target.plain.remote(value)
        if how == "await":
            return await asyncio.wait_for(awaited(ref), ACTOR_TIMEOUT)
        return fetch(ref, how)  # blocks the loop, as a blocking get does in any async actor

    async def held(self) -> int:
        from zmesh import runtime

        gc.collect()
        return len(runtime.current().objects._entries)


Target = zmesh.remote(Echoer)
Grouped = zmesh.remote(GroupedEchoer)
AsyncTarget = zmesh.remote(AsyncEchoer)


@dataclasses.dataclass(frozen=True)
class RefTo:
    """Expected: an ObjectRef equal to ``ref`` whose value is ``value``."""

    ref: Any
    value: Any


def same(got: Any, want: Any, timeout: float = ACTOR_TIMEOUT, path: str = "result") -> None:
    """Raise AssertionError naming the first place where ``got`` differs from ``want``; numpy by dtype, shape and content."""
    if isinstance(want, RefTo):
        if not isinstance(got, zmesh.ObjectRef) or got != want.ref:
            raise AssertionError(f"{path}: expected {want.ref!r}, got {type(got).__name__} {got!r:.80}")
        same(zmesh.get(got, timeout=timeout), want.value, timeout, f"{path}.get()")
    elif type(want).__module__ == "numpy":
        import numpy as np

        if type(got) is not type(want) or got.dtype != want.dtype or got.shape != want.shape:
            raise AssertionError(f"{path}: expected {want.dtype} array {want.shape}, got {type(got).__name__} {got!r:.80}")
        if not np.array_equal(got, want):
            where = np.flatnonzero(got.ravel() != want.ravel())[:5].tolist() if want.size else []
            raise AssertionError(f"{path}: {want.dtype} array {want.shape} differs at flat indices {where}")
    elif type(want) in (list, tuple):
        if type(got) is not type(want) or len(got) != len(want):
            raise AssertionError(f"{path}: expected {type(want).__name__} of {len(want)}, got {type(got).__name__} {got!r:.80}")
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            same(g, w, timeout, f"{path}[{i}]")
    elif type(want) is dict:
        if type(got) is not dict or list(got) != list(want):
            raise AssertionError(f"{path}: expected dict with keys {list(want)!r:.80}, got {type(got).__name__} {got!r:.80}")
        for k in want:
            same(got[k], want[k], timeout, f"{path}[{k!r}]")
    elif type(got) is not type(want) or got != want:
        raise AssertionError(f"{path}: expected {type(want).__name__} {want!r:.80}, got {type(got).__name__} {got!r:.80}")


def outcome(
    where: str, ref: Any, kind: str, want: Any = None, errors: tuple[type[BaseException], ...] = (), prev: int | None = None
) -> None:
    """Reproducer-script check: the call behind ``ref`` ended as expected (raising kinds: ``want`` is in the message)."""
    try:
        value = zmesh.get(ref, timeout=60)
    except Exception as exc:
        if kind == "raise" and isinstance(exc, TaskError) and isinstance(exc, ValueError) and want in str(exc):
            return
        if isinstance(exc, errors):
            return
        raise AssertionError(f"{where}: raised {type(exc).__name__}: {exc}") from exc
    assert kind != "raise", f"{where}: returned {value!r:.80} instead of raising {want!r}"
    if kind in ("echo", "crash"):
        _, got_prev, value = value
        assert prev is None or got_prev == prev, f"{where}: ran after call #{got_prev}, expected after #{prev} (submission order)"
    same(resolve(value), want, path=where)


# ---- script prelude ends


# ------------------------------------------------------------------ values


@dataclasses.dataclass(frozen=True)
class Blob:
    """bytes ("bytes"), ASCII str ("str") or non-ASCII str ("utf8") of ``size`` bytes or characters."""

    size: int
    kind: str = "bytes"


@dataclasses.dataclass(frozen=True)
class Arr:
    dtype: str
    n: int
    layout: str = "c"


@dataclasses.dataclass(frozen=True)
class Coll:
    """A list, tuple or dict of ``items``, then ``pad`` small ints (to cross the 64-element limit without listing them)."""

    kind: str
    items: tuple[Any, ...] = ()
    pad: int = 0


@dataclasses.dataclass(frozen=True)
class Put:
    """``zmesh.put(value)``: an ObjectRef owned by the caller."""

    value: Any


@dataclasses.dataclass(frozen=True)
class Result:
    """The ObjectRef of another call, ``actors[actor].plain.remote(value)``."""

    actor: int
    value: Any


@dataclasses.dataclass(frozen=True)
class Handle:
    actor: int


def value_code(v: Any, made: bool = False) -> str:
    """Python source that builds ``v`` (with ``made``: arrays are kept, to be changed after the call)."""
    if v is None or type(v) is int:
        return repr(v)
    if isinstance(v, Blob):
        return f"blob({v.size}, {v.kind!r})"
    if isinstance(v, Arr):
        code = f"arr({v.dtype!r}, {v.n}, {v.layout!r})"
        return f"keep(made, {code})" if made else code
    if isinstance(v, Coll):
        return _coll_code(v, [value_code(i, made) for i in v.items])
    if isinstance(v, Put):
        return f"zmesh.put({value_code(v.value, made)})"
    if isinstance(v, Result):
        return f"a{v.actor}.plain.remote({value_code(v.value, made)})"
    if isinstance(v, Handle):
        return f"a{v.actor}"
    raise TypeError(f"not a workload value: {v!r}")


def want_code(v: Any) -> str:
    """Python source for what ``v`` looks like once every ref in it is resolved."""
    if isinstance(v, Put | Result):
        return want_code(v.value)
    if isinstance(v, Coll):
        return _coll_code(v, [want_code(i) for i in v.items])
    return value_code(v)


def _coll_code(v: Coll, parts: list[str]) -> str:
    if v.kind == "dict":
        parts = [f"'k{i}': {p}" for i, p in enumerate(parts)]
        if v.pad:
            parts.append(f"**{{f'p{{i}}': i for i in range({v.pad})}}")
        return "{" + ", ".join(parts) + "}"
    if v.pad:
        parts.append(f"*range({v.pad})")
    if v.kind == "tuple":
        return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
    return "[" + ", ".join(parts) + "]"


def result_actors(v: Any) -> set[int]:
    """Actors whose calls make refs inside ``v`` (their faults may reach whoever reads those refs)."""
    if isinstance(v, Result):
        return {v.actor} | result_actors(v.value)
    if isinstance(v, Put):
        return result_actors(v.value)
    if isinstance(v, Coll):
        return set().union(*(result_actors(i) for i in v.items))
    return set()


def value_bytes(v: Any) -> int:
    """A rough size of ``v`` once built."""
    if isinstance(v, Blob):
        return v.size * (4 if v.kind == "utf8" else 1)
    if isinstance(v, Arr):
        return v.n * (16 if v.dtype == "complex128" else 8) * (2 if v.layout == "strided" else 1)
    if isinstance(v, Coll):
        return sum(value_bytes(i) for i in v.items) + 8 * v.pad
    if isinstance(v, Put | Result):
        return value_bytes(v.value)
    return 8


# ------------------------------------------------------------------ workloads


@dataclasses.dataclass(frozen=True)
class ActorSpec:
    kind: str = "sequential"
    max_restarts: int = 0
    max_task_retries: int = 0

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.kind == "threaded":
            opts["max_concurrency"] = 4
        if self.kind == "grouped":
            opts["concurrency_groups"] = dict(GROUPS)
        if self.max_restarts:
            opts["max_restarts"] = self.max_restarts
        if self.max_task_retries:
            opts["max_task_retries"] = self.max_task_retries
        return opts

    def actor_class(self) -> Any:
        return {"async": AsyncTarget, "grouped": Grouped}.get(self.kind, Target)

    def class_code(self) -> str:
        return {"async": "AsyncTarget", "grouped": "Grouped"}.get(self.kind, "Target")


@dataclasses.dataclass(frozen=True)
class Echo:
    """``echo(value)``; with ``deref`` the actor resolves nested refs itself; with ``scribble`` the caller zeroes its arrays right after."""

    actor: int
    value: Any = None
    deref: bool = False
    scribble: bool = False


@dataclasses.dataclass(frozen=True)
class Stream:
    """``count`` echoes of one value, all in flight at once."""

    actor: int
    count: int
    value: Any = None


@dataclasses.dataclass(frozen=True)
class Relay:
    """``actors[actor]`` calls ``actors[target].plain(value)`` and fetches the result the way ``how`` says."""

    actor: int
    target: int
    value: Any = None
    how: str = "get"


@dataclasses.dataclass(frozen=True)
class Raise:
    """A method that raises ValueError."""

    actor: int


@dataclasses.dataclass(frozen=True)
class Crash:
    """A method that exits the worker (``os._exit(1)``) the first time it runs."""

    actor: int


@dataclasses.dataclass(frozen=True)
class Kill:
    """``zmesh.kill(actor, no_restart=False)``."""

    actor: int


@dataclasses.dataclass(frozen=True)
class Collect:
    """Wait for every call this caller has in flight, with get, wait or await."""

    how: str = "get"


RECORDING = (Echo, Stream, Raise, Crash)  # calls that record their sequence number in the actor


@dataclasses.dataclass(frozen=True)
class Caller:
    """One thread of one driver process, running ``ops`` in order, then collecting what is left with ``finish``."""

    ops: tuple[Any, ...]
    driver: int = 0
    finish: str = "get"


@dataclasses.dataclass(frozen=True)
class Workload:
    actors: tuple[ActorSpec, ...]
    callers: tuple[Caller, ...]

    @property
    def drivers(self) -> int:
        return 1 + max(c.driver for c in self.callers)

    def faults(self, actor: int) -> int:
        return sum(1 for c in self.callers for op in c.ops if isinstance(op, Kill | Crash) and op.actor == actor)

    def fault_errors(self, actor: int) -> tuple[type[BaseException], ...]:
        """The errors a call to ``actor`` may end with, given how often it is killed or crashed and its options."""
        count, spec = self.faults(actor), self.actors[actor]
        errors: list[type[BaseException]] = []
        if count and spec.max_restarts != 0 and spec.max_task_retries != -1 and count > spec.max_task_retries:
            errors.append(ActorUnavailableError)
        if count and spec.max_restarts != -1 and count > spec.max_restarts:
            errors.append(ActorDiedError)
        return tuple(errors)

    def errors_of(self, actors: set[int]) -> tuple[type[BaseException], ...]:
        return tuple(sorted({e for a in actors for e in self.fault_errors(a)}, key=lambda e: e.__name__))

    def nbytes(self) -> int:
        """A rough bound of the memory the workload's values take at once."""
        total = 0
        for c in self.callers:
            for op in c.ops:
                if isinstance(op, Echo | Relay):
                    total += 3 * value_bytes(op.value)  # the argument, the expected copy, the result
                elif isinstance(op, Stream):
                    total += (op.count + 2) * value_bytes(op.value)
        return total

    def to_python(self) -> str:
        """A standalone script that runs this workload with plain zmesh calls and checks each call's outcome."""
        return _Script(self).render()


# ------------------------------------------------------------------ playing a workload


@dataclasses.dataclass
class Pending:
    """One call in flight and what it may end as."""

    where: str
    ref: Any
    kind: str  # "echo", "raise", "crash" or "relay"
    want: Any
    errors: tuple[type[BaseException], ...]
    actor: int
    seq: int = -1
    ran: bool | None = None  # True: it ran once (success, or its own ValueError); None: unknown (a fault)
    row: tuple[int, int] | None = None  # (pid, previous sequence number) the actor reported


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _brief(op: Any) -> str:
    text = repr(op)
    return text if len(text) <= 160 else text[:157] + "..."


class _Builder:
    """Builds a workload value for one call: the argument, what the call should return, the arrays to scribble on."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles
        self.arrays: list[Any] = []

    def build(self, v: Any) -> tuple[Any, Any]:
        if v is None or type(v) is int:
            return v, v
        if isinstance(v, Blob):
            x = blob(v.size, v.kind)
            return x, x
        if isinstance(v, Arr):
            a = arr(v.dtype, v.n, v.layout)
            self.arrays.append(a)
            return a, a.copy()
        if isinstance(v, Coll):
            parts = [self.build(i) for i in v.items]
            if v.kind == "dict":
                pad = {f"p{i}": i for i in range(v.pad)}
                return {f"k{i}": a for i, (a, _) in enumerate(parts)} | pad, {f"k{i}": e for i, (_, e) in enumerate(parts)} | pad
            args, wants = [a for a, _ in parts] + list(range(v.pad)), [e for _, e in parts] + list(range(v.pad))
            return (tuple(args), tuple(wants)) if v.kind == "tuple" else (args, wants)
        if isinstance(v, Put):
            a, e = self.build(v.value)
            ref = zmesh.put(a)
            return ref, RefTo(ref, e)
        if isinstance(v, Result):
            a, e = self.build(v.value)
            ref = self.handles[v.actor].plain.remote(a)
            return ref, RefTo(ref, top(e))
        if isinstance(v, Handle):
            return self.handles[v.actor], self.handles[v.actor]
        raise TypeError(f"not a workload value: {v!r}")


def top(want: Any) -> Any:
    """What a call returns for an argument: a top-level ref arrives as its value, as in Ray."""
    return want.value if isinstance(want, RefTo) else want


def resolved(want: Any) -> Any:
    """The expectation once the actor has resolved every nested ref itself."""
    if isinstance(want, RefTo):
        return resolved(want.value)
    if type(want) in (list, tuple):
        return type(want)(resolved(w) for w in want)
    if type(want) is dict:
        return {k: resolved(w) for k, w in want.items()}
    return want


def echo_method(handle: Any, spec: ActorSpec, seq: int) -> Any:
    """A grouped actor's echoes go to each of its groups in turn (chosen per call with .options)."""
    if spec.kind != "grouped" or seq % 3 == 2:
        return handle.echo
    return handle.echo.options(concurrency_group=("io", "compute")[seq % 3])


def run_caller(w: Workload, index: int, handles: list[Any], deadline: float, scratch: Path) -> None:
    """Play one caller's ops in this thread and check every call it made."""
    caller = w.callers[index]
    name = f"c{index}"
    seqs = itertools.count()
    pending: list[Pending] = []
    done: list[Pending] = []
    for k, op in enumerate(caller.ops):
        where = f"caller {index} op {k} {_brief(op)}"
        if isinstance(op, Collect):
            settle(pending, op.how, deadline)
            done += pending
            pending = []
            continue
        if isinstance(op, Kill):
            zmesh.kill(handles[op.actor], no_restart=False)
            continue
        builder = _Builder(handles)
        spec = w.actors[op.actor]
        if isinstance(op, Echo):
            arg, want = builder.build(op.value)
            seq = next(seqs)
            ref = echo_method(handles[op.actor], spec, seq).remote(name, seq, arg, op.deref)
            if op.scribble:
                for a in builder.arrays:
                    a.fill(0)  # the caller may reuse its buffers at once: the call must still see the old values
            want = resolved(want) if op.deref else top(want)
            errors = w.errors_of({op.actor} | result_actors(op.value))
            pending.append(Pending(where, ref, "echo", want, errors, op.actor, seq))
        elif isinstance(op, Stream):
            arg, want = builder.build(op.value)
            errors = w.errors_of({op.actor} | result_actors(op.value))
            for i in range(op.count):
                seq = next(seqs)
                ref = echo_method(handles[op.actor], spec, seq).remote(name, seq, arg, False)
                pending.append(Pending(f"{where} #{i}", ref, "echo", top(want), errors, op.actor, seq))
        elif isinstance(op, Relay):
            arg, want = builder.build(op.value)
            ref = handles[op.actor].relay.remote(handles[op.target], arg, op.how)
            errors = w.errors_of({op.actor, op.target} | result_actors(op.value))
            pending.append(Pending(where, ref, "relay", top(want), errors, op.actor))
        elif isinstance(op, Raise):
            seq = next(seqs)
            ref = handles[op.actor].fail.remote(name, seq)
            pending.append(Pending(where, ref, "raise", f"boom {name}#{seq}", w.fault_errors(op.actor), op.actor, seq))
        elif isinstance(op, Crash):
            seq = next(seqs)
            marker = str(scratch / f"crash-{name}-{seq}")
            ref = handles[op.actor].crash.remote(name, seq, marker)
            survives = "survived" if spec.max_task_retries != 0 else None  # only a retry can get past the crash
            pending.append(Pending(where, ref, "crash", survives, w.fault_errors(op.actor), op.actor, seq))
        else:
            raise TypeError(f"not a workload op: {op!r}")
        del builder
    settle(pending, caller.finish, deadline)
    check_order(w, index, done + pending)


def settle(pending: list[Pending], how: str, deadline: float) -> None:
    """Wait for every pending call the way ``how`` says, then judge each outcome."""
    refs = [p.ref for p in pending]
    if how == "get":
        outcomes = _settle_get(pending, refs, deadline)
    elif how == "wait":
        outcomes = _settle_wait(pending, refs, deadline)
    else:
        outcomes = _settle_await(pending, refs, deadline)
    for p, (ok, value) in zip(pending, outcomes, strict=True):
        judge(p, ok, value, deadline)


def _hang(pending: list[Pending], how: str) -> AssertionError:
    _, not_ready = zmesh.wait([p.ref for p in pending], num_returns=len(pending), timeout=0)
    stuck = set(not_ready)
    names = [p.where for p in pending if p.ref in stuck]
    return AssertionError(f"{len(names)} of {len(pending)} calls never ended ({how}); first ones: {names[:5]}")


def _outcome(ref: Any, timeout: float) -> tuple[bool, Any]:
    try:
        return True, zmesh.get(ref, timeout=timeout)
    except GetTimeoutError:
        raise
    except Exception as exc:
        return False, exc


def _settle_get(pending: list[Pending], refs: list[Any], deadline: float) -> list[tuple[bool, Any]]:
    try:
        return [(True, v) for v in zmesh.get(refs, timeout=_left(deadline))]
    except GetTimeoutError:
        raise _hang(pending, "get") from None
    except Exception:
        pass  # some call failed: which, and whether it may, is judged call by call below
    try:
        return [_outcome(r, _left(deadline)) for r in refs]
    except GetTimeoutError:
        raise _hang(pending, "get") from None


def _settle_wait(pending: list[Pending], refs: list[Any], deadline: float) -> list[tuple[bool, Any]]:
    rest = list(refs)
    if not rest:
        assert zmesh.wait([], timeout=_left(deadline)) == ([], []), "zmesh.wait([]) must return ([], [])"
    while rest:
        # One at a time as Ray code often does; a long list at once, since each wait scans all of it.
        want = 1 if len(rest) <= 64 else len(rest)
        ready, not_ready = zmesh.wait(rest, num_returns=want, timeout=_left(deadline))
        assert collections.Counter(ready + not_ready) == collections.Counter(rest), "zmesh.wait lost or invented refs"
        assert [r for r in rest if r in set(ready)] == ready, "zmesh.wait's ready list is out of order"
        assert len(ready) <= want, f"zmesh.wait(num_returns={want}) returned {len(ready)} ready refs"
        if len(ready) < want:
            raise _hang(pending, "wait")
        rest = not_ready
    try:
        # Ready means done: not one of them may make get wait.
        return [_outcome(r, 0) for r in refs]
    except GetTimeoutError as exc:
        raise AssertionError(f"zmesh.wait said ready but get(timeout=0) timed out: {exc}") from None


def _settle_await(pending: list[Pending], refs: list[Any], deadline: float) -> list[tuple[bool, Any]]:
    async def one(ref: Any) -> tuple[bool, Any]:
        try:
            return True, await ref
        except Exception as exc:
            return False, exc

    async def every() -> list[tuple[bool, Any]]:
        return list(await asyncio.wait_for(asyncio.gather(*(one(r) for r in refs)), _left(deadline)))

    try:
        return asyncio.run(every())
    except TimeoutError:
        raise _hang(pending, "await") from None


def judge(p: Pending, ok: bool, value: Any, deadline: float) -> None:
    """Check one call's outcome against what its op allows."""
    if not ok:
        exc = value
        if p.kind == "raise" and isinstance(exc, TaskError) and isinstance(exc, ValueError) and p.want in str(exc):
            p.ran = True
            return
        if isinstance(exc, p.errors):
            return
        allowed = [e.__name__ for e in p.errors] or "no error"
        raise AssertionError(f"{p.where}: raised {type(exc).__name__} ({allowed} allowed): {exc}") from exc
    if p.kind == "raise":
        raise AssertionError(f"{p.where}: returned {value!r:.80} instead of raising ValueError")
    if p.kind == "crash" and p.want is None:
        raise AssertionError(f"{p.where}: returned {value!r:.80}, but with max_task_retries=0 the call that crashed cannot run again")
    if p.kind in ("echo", "crash"):
        pid, prev, value = value
        p.row, p.ran = (pid, prev), True
    try:
        same(value, p.want, _left(deadline), p.where)
    except AssertionError:
        raise
    except GetTimeoutError as exc:
        raise AssertionError(f"{p.where}: a nested ref never resolved: {exc}") from exc
    except Exception as exc:  # a nested ref's own call failed
        if not isinstance(exc, p.errors):
            raise AssertionError(f"{p.where}: a nested ref raised {type(exc).__name__}: {exc}") from exc


def check_order(w: Workload, index: int, calls: list[Pending]) -> None:
    """Calls from one caller to one sequential actor ran in submission order.

    With no fault and every call known to have run once, each call must have run right after
    the previous one; otherwise, within one worker process, later calls ran after earlier ones.
    """
    for actor, spec in enumerate(w.actors):
        mine = sorted((p for p in calls if p.actor == actor and p.kind != "relay"), key=lambda p: p.seq)
        if spec.kind != "sequential" or not mine:
            continue
        if w.faults(actor) == 0 and all(p.ran for p in mine):
            for before, p in itertools.pairwise([None, *mine]):
                expected = before.seq if before is not None else -1
                if p.row is not None and p.row[1] != expected:
                    raise AssertionError(f"{p.where}: ran after call #{p.row[1]} of caller {index}, expected after #{expected}")
            continue
        last: dict[int, int] = {}
        for p in mine:
            if p.row is None:
                continue
            pid, prev = p.row
            if not last.get(pid, -1) <= prev < p.seq:
                raise AssertionError(f"{p.where}: ran after call #{prev}, but call #{last.get(pid)} had already run in that worker")
            last[pid] = p.seq


def play_driver(w: Workload, driver: int, handles: list[Any], deadline: float, scratch: Path) -> None:
    """Run this driver's callers at once, the first on this thread; re-raise the first failure."""
    mine = [i for i, c in enumerate(w.callers) if c.driver == driver]
    if not mine:
        return
    start = threading.Barrier(len(mine))
    failures: dict[int, BaseException] = {}

    def run(i: int) -> None:
        try:
            start.wait(timeout=_left(deadline))
            run_caller(w, i, handles, deadline, scratch)
        except BaseException as exc:
            failures[i] = exc

    threads = [threading.Thread(target=run, args=(i,), name=f"torture-caller-{i}", daemon=True) for i in mine[1:]]
    for t in threads:
        t.start()
    run(mine[0])
    for t in threads:
        t.join(_left(deadline) + 10)
    stuck = [t for t in threads if t.is_alive()]
    if stuck:
        frames = sys._current_frames()
        stacks = "\n".join(f"{t.name}:\n{''.join(traceback.format_stack(frames[t.ident]))}" for t in stuck if t.ident in frames)
        raise AssertionError(f"callers still running past the deadline:\n{stacks}")
    if failures:
        raise failures[min(failures)]


def residue(rt: Any) -> dict[str, int]:
    """Per-call state a runtime holds (zmesh internals): objects, reference counts, calls queued or in flight."""
    conns = list(getattr(rt, "_actors", {}).values())
    return {
        "objects": len(rt.objects._entries),
        "refcounts": len(rt.objects._refcounts),
        "calls": sum(len(c.inflight) + len(c.queue) for c in conns),
    }


def wait_clean(rt: Any, before: dict[str, int], what: str) -> None:
    """Wait until ``rt`` holds no more per-call state than ``before`` (refs are released lazily by its I/O thread)."""
    gc.collect()
    try:
        wait_for(lambda: all(v <= before[k] for k, v in residue(rt).items()), timeout=5, interval=0.05, what=what)
    except TimeoutError:
        raise AssertionError(f"{what}: still holds {residue(rt)} (before the workload: {before})") from None


def check_workers(w: Workload, handles: list[Any], deadline: float) -> None:
    """Every actor still alive holds no objects once its calls are done."""
    for i, h in enumerate(handles):
        errors = w.fault_errors(i)
        last: list[int] = []

        def clean(h: Any = h, errors: tuple[type[BaseException], ...] = errors, last: list[int] = last) -> bool:
            try:
                last.append(zmesh.get(h.held.remote(), timeout=max(_left(deadline), 1)))
            except errors:
                return True  # it is dead (or its restart lost this call): nothing left to hold
            return last[-1] == 0

        try:
            wait_for(clean, timeout=5, interval=0.1, what=f"actor {i}'s worker to let go of its objects")
        except TimeoutError:
            raise AssertionError(f"actor {i} ({w.actors[i]}) still holds {last[-1:]} objects after the workload") from None


# Set by the mesh variant of the test: extra drivers connect to these nodes in turn, and actors are SPREAD.
MESH_ADDRESSES: list[str] = []
# The nodes whose object stores play() checks; a test may set them, else the connected node or every MESH_ADDRESSES node.
STORES: list[Callable[[], dict[str, Any]]] = []


# ------------------------------------------------------------------ the shared-memory object stores


def node_status(address: str) -> dict[str, Any]:
    """The status of the node at ``address`` (host:port), asked as `zmesh status` does, with this user's cluster key."""
    from zmesh.node.admin import request
    from zmesh.transport.security import Security, resolve_key

    return dict(request(f"tcp://{address}", "status", security=Security(resolve_key(None)[0])))


def store_nodes() -> list[Callable[[], dict[str, Any]]]:
    if STORES:
        return list(STORES)
    if MESH_ADDRESSES:
        return [functools.partial(node_status, a) for a in MESH_ADDRESSES]
    return [zmesh.api._status]


def stores_now(nodes: list[Callable[[], dict[str, Any]]]) -> dict[str, tuple[int, frozenset[str]]]:
    """Each node's segments: how many its store counts, and its files in /dev/shm (lock file aside)."""
    from zmesh.transport import shm

    out = {}
    for status in nodes:
        s = status()
        node_id = str(s["node_id"])
        files = frozenset(p.name for p in shm.directory().glob(f"zmesh.{node_id}.*") if not p.name.endswith(".lock"))
        out[node_id] = (int(s["object_store"]["segments"]), files)
    return out


def wait_stores_clean(nodes: list[Callable[[], dict[str, Any]]], before: dict[str, tuple[int, frozenset[str]]], what: str) -> None:
    """Every node's store is back to what it held before the workload: its segments freed and their files gone.

    A hold of a process on another node ends when that node relays the free, or (the holder killed) within the
    mesh's grace for the dead (a few seconds): hence the long wait.
    """
    last: list[dict[str, tuple[int, frozenset[str]]]] = []

    def clean() -> bool:
        last.append(stores_now(nodes))
        return all(n <= before.get(k, (0, frozenset()))[0] and f <= before.get(k, (0, frozenset()))[1] for k, (n, f) in last[-1].items())

    try:
        wait_for(clean, timeout=15, interval=0.1, what=what)
    except TimeoutError:
        now = {k: (n, sorted(f)) for k, (n, f) in last[-1].items()}
        raise AssertionError(f"{what}: the object stores hold {now} (before the workload: {before})") from None


def play(w: Workload, *, run_dir: str, scratch: Path, seconds: float) -> None:
    """Create the actors, run every driver's callers at once, check every call, then check nothing is left behind."""
    rt = zmesh_runtime.current()
    deadline = time.monotonic() + seconds
    before = residue(rt)
    stores = store_nodes()
    stored = stores_now(stores)
    processes = len(zmesh_processes(run_dir))
    socket_files = set(Path(run_dir).glob("s/*.sock"))
    names = [f"{scratch.name}-a{i}" for i in range(len(w.actors))]
    handles: list[Any] = []
    extras: list[subprocess.Popen[str]] = []
    passed = False
    try:
        for i, spec in enumerate(w.actors):
            named = {"name": names[i]} if w.drivers > 1 else {}  # other drivers find them by name
            spread = {"scheduling_strategy": "SPREAD"} if MESH_ADDRESSES else {}
            handles.append(spec.actor_class().options(**spec.options(), **named, **spread).remote())
        for d in range(1, w.drivers):
            extras.append(start_driver(w, d, names, scratch, deadline))
        for proc in extras:
            await_line(proc, "ready", deadline, scratch)
        for proc in extras:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        play_driver(w, 0, handles, deadline, scratch)
        for d, proc in enumerate(extras, 1):
            try:
                proc.wait(_left(deadline) + 10)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"driver {d} still running past the deadline:\n{driver_log(scratch, d)}") from None
            if proc.returncode != 0:
                raise AssertionError(f"driver {d} failed (exit {proc.returncode}):\n{driver_log(scratch, d)}")
        check_workers(w, handles, deadline)
        passed = True
    finally:
        for proc in extras:
            stop_driver(proc, deadline)
        for h in handles:
            try:
                zmesh.kill(h)
            except Exception:
                if passed:
                    raise
    del handles
    try:
        wait_for(lambda: len(zmesh_processes(run_dir)) <= processes, timeout=15, what="the workload's workers to exit")
    except TimeoutError:
        raise AssertionError(f"worker processes left after killing every actor: {zmesh_processes(run_dir)}") from None
    try:
        wait_for(lambda: set(Path(run_dir).glob("s/*.sock")) <= socket_files, timeout=5, what="the workers' IPC socket files to go")
    except TimeoutError:
        left = sorted(p.name for p in set(Path(run_dir).glob("s/*.sock")) - socket_files)
        raise AssertionError(f"IPC socket files left in the run directory after every worker exited: {left}") from None
    wait_clean(rt, before, "the driver")
    wait_stores_clean(stores, stored, "every segment of the workload freed")


def start_driver(w: Workload, index: int, names: list[str], scratch: Path, deadline: float) -> subprocess.Popen[str]:
    """Another driver process for the callers of driver ``index``; it says "ready", then waits for "go"."""
    path = scratch / f"driver{index}.pickle"
    path.write_bytes(pickle.dumps((w, index, names, str(scratch), deadline)))
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import torture_workloads; torture_workloads.driver_main({str(path)!r})"
    env = dict(os.environ)
    if MESH_ADDRESSES:
        env["ZMESH_ADDRESS"] = MESH_ADDRESSES[index % len(MESH_ADDRESSES)]  # each driver on another node
    with open(scratch / f"driver{index}.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd=HERE.parent, env=env
        )


def stop_driver(proc: subprocess.Popen[str], deadline: float) -> None:
    """Let a driver process end on its own (one still waiting for "go" sees end of input and exits); kill it only past the deadline.

    A process killed before its node knows it leaves its IPC socket file behind, which would be blamed on the workload.
    """
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it has exited already
    try:
        proc.wait(_left(deadline) + 10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()


def driver_log(scratch: Path, index: int) -> str:
    return (scratch / f"driver{index}.log").read_text()[-6000:]


def await_line(proc: subprocess.Popen[str], line: str, deadline: float, scratch: Path) -> None:
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], _left(deadline))
    got = proc.stdout.readline() if readable else ""
    if got.strip() != line:
        raise AssertionError(f"a driver process did not get ready (said {got!r}):\n{_logs(scratch)}")


def _logs(scratch: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(scratch.glob("driver*.log")))


def driver_main(path: str) -> None:
    """Entry point of an extra driver process: connect, find the actors by name, run its callers, check, exit."""
    w, index, names, scratch, deadline = pickle.loads(Path(path).read_bytes())
    zmesh.init(address="auto")
    rt = zmesh_runtime.current()
    before = residue(rt)
    handles = [zmesh.get_actor(n) for n in names]
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit(3)
    play_driver(w, index, handles, deadline, Path(scratch))
    del handles
    wait_clean(rt, before, f"driver {index}")
    zmesh.shutdown()


# ------------------------------------------------------------------ reproducer scripts


class _Script:
    """Renders a workload as a standalone script of plain zmesh calls."""

    def __init__(self, w: Workload) -> None:
        self.w = w

    def render(self) -> str:
        w = self.w
        source = Path(__file__).read_text()
        prelude = source.split("# ---- script prelude begins\n", 1)[1].split("# ---- script prelude ends\n", 1)[0]
        out = [
            f"# zmesh torture reproducer: {len(w.actors)} actor(s), {len(w.callers)} caller thread(s), {w.drivers} driver(s)",
            *(["# several drivers share one node: start `zmesh node` first, then run this file"] if w.drivers > 1 else []),
            "from __future__ import annotations",
            "import asyncio, dataclasses, gc, os, subprocess, sys, tempfile, threading",
            "from typing import Any",
            "import zmesh",
            "from zmesh.exceptions import ActorDiedError, ActorUnavailableError, TaskError",
            "MARKERS = tempfile.mkdtemp()",
            prelude.rstrip(),
            "",
        ]
        for d in range(w.drivers):
            out += self.driver(d)
        out += [
            "",
            'if __name__ == "__main__":',
            f"    [{', '.join(f'driver_{d}' for d in range(w.drivers))}][int(sys.argv[1]) if len(sys.argv) > 1 else 0]()",
        ]
        return "\n".join(out) + "\n"

    def driver(self, d: int) -> list[str]:
        w = self.w
        out = ["", "", f"def driver_{d}():"]
        out.append("    global " + ", ".join(f"a{i}" for i in range(len(w.actors))))
        if d == 0:
            out.append('    zmesh.init(address="auto")' if w.drivers > 1 else "    zmesh.init()")
            for i, spec in enumerate(w.actors):
                opts = spec.options() | ({"name": f"torture-a{i}"} if w.drivers > 1 else {})
                args = ", ".join(f"{k}={v!r}" for k, v in opts.items())
                out.append(
                    f"    a{i} = {spec.class_code()}.options({args}).remote()" if args else f"    a{i} = {spec.class_code()}.remote()"
                )
            if w.drivers > 1:
                out.append(f"    others = [subprocess.Popen([sys.executable, __file__, str(d)]) for d in range(1, {w.drivers})]")
        else:
            out.append('    zmesh.init(address="auto")')
            for i in range(len(w.actors)):
                out.append(f'    a{i} = zmesh.get_actor("torture-a{i}")')
        mine = [i for i, c in enumerate(w.callers) if c.driver == d]
        for i in mine:
            out += ["    " + line for line in self.caller(i)]
        out.append(f"    threads = [threading.Thread(target=f) for f in ({''.join(f'caller_{i}, ' for i in mine)})]")
        out += ["    for t in threads:", "        t.start()", "    for t in threads:", "        t.join()"]
        if d == 0 and w.drivers > 1:
            out += ["    for p in others:", "        assert p.wait() == 0"]
        out.append(f"    print('driver {d}: every call ended as expected')")
        return out

    def caller(self, index: int) -> list[str]:
        w = self.w
        caller = w.callers[index]
        name = f"c{index}"
        seq = 0
        ran: dict[int, int] = {}  # actor -> the last call known to have run there, while that is certain
        out = ["", f"def caller_{index}():", "    refs = []"]
        for k, op in enumerate(caller.ops):
            where = f"caller {index} op {k}"
            if isinstance(op, Collect):
                out += self.collect(op.how)
                continue
            if isinstance(op, Kill):
                out.append(f"    zmesh.kill(a{op.actor}, no_restart=False)")
                continue
            if isinstance(op, Echo | Stream):
                errors = w.errors_of({op.actor} | result_actors(op.value))
            elif isinstance(op, Relay):
                errors = w.errors_of({op.actor, op.target} | result_actors(op.value))
            else:
                errors = w.fault_errors(op.actor)
            err = "(" + "".join(f"{e.__name__}, " for e in errors) + ")"
            exact = isinstance(op, Echo | Stream | Raise) and w.actors[op.actor].kind == "sequential" and not errors
            prev = ran.get(op.actor, -1) if exact else None
            if isinstance(op, Echo):
                if op.scribble:
                    out.append("    made = []")
                out.append(
                    f"    ref = {self.method(op.actor, seq)}.remote({name!r}, {seq}, {value_code(op.value, op.scribble)}, {op.deref})"
                )
                if op.scribble:
                    out += [
                        "    for x in made:",
                        "        x.fill(0)  # changed right after the call: the call must still see the old values",
                    ]
                out.append(f"    refs.append(({where!r}, ref, 'echo', {want_code(op.value)}, {err}, {prev}))")
            elif isinstance(op, Stream):
                prev_code = f"seq - 1 if seq > {seq} else {prev}" if exact else "None"
                out += [
                    f"    value = {value_code(op.value)}",
                    f"    for seq in range({seq}, {seq + op.count}):",
                    f"        ref = {self.method(op.actor, None)}.remote({name!r}, seq, value, False)",
                    f"        refs.append(({where!r} + f' #{{seq}}', ref, 'echo', {want_code(op.value)}, {err}, {prev_code}))",
                ]
                seq += op.count - 1
            elif isinstance(op, Relay):
                out.append(f"    ref = a{op.actor}.relay.remote(a{op.target}, {value_code(op.value)}, {op.how!r})")
                out.append(f"    refs.append(({where!r}, ref, 'relay', {want_code(op.value)}, {err}, None))")
            elif isinstance(op, Raise):
                out.append(f"    ref = a{op.actor}.fail.remote({name!r}, {seq})")
                out.append(f"    refs.append(({where!r}, ref, 'raise', 'boom {name}#{seq}', {err}, None))")
            elif isinstance(op, Crash):
                want = "'survived'" if w.actors[op.actor].max_task_retries != 0 else "None"
                out.append(f"    ref = a{op.actor}.crash.remote({name!r}, {seq}, os.path.join(MARKERS, '{name}-{seq}'))")
                out.append(f"    refs.append(({where!r}, ref, 'crash', {want}, {err}, None))")
            if isinstance(op, RECORDING):
                if exact:
                    ran[op.actor] = seq
                else:
                    ran.pop(op.actor, None)
                seq += 1
        out += self.collect(caller.finish)
        return out

    def method(self, actor: int, seq: int | None) -> str:
        """The echo method as the runner picks it (``seq`` None: the loop variable ``seq`` decides)."""
        if self.w.actors[actor].kind != "grouped":
            return f"a{actor}.echo"
        if seq is not None:
            return f"a{actor}.echo" if seq % 3 == 2 else f"a{actor}.echo.options(concurrency_group={('io', 'compute')[seq % 3]!r})"
        return f"(a{actor}.echo if seq % 3 == 2 else a{actor}.echo.options(concurrency_group=('io', 'compute')[seq % 3]))"

    @staticmethod
    def collect(how: str) -> list[str]:
        out = []
        if how == "wait":
            out += [
                "    rest = [r[1] for r in refs]",
                "    if not rest:",
                "        assert zmesh.wait([], timeout=60) == ([], [])",
                "    while rest:",
                "        ready, rest = zmesh.wait(rest, num_returns=1 if len(rest) <= 64 else len(rest), timeout=60)",
                "        assert ready, f'{len(rest)} calls never ended'",
            ]
        elif how == "await":
            out += [
                "    async def every():",
                "        return await asyncio.gather(*(awaited(r[1]) for r in refs), return_exceptions=True)",
                "    asyncio.run(asyncio.wait_for(every(), 60))",
            ]
        out += [
            "    for where, ref, kind, want, errors, prev in refs:",
            "        outcome(where, ref, kind, want, errors, prev)",
            "    refs.clear()",
        ]
        return out
