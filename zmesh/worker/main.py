"""A worker process's main loop: build one actor, then run the calls sent to it.

How calls run is the executor's (``executors.py``: sequential, threaded, asyncio,
each with optional concurrency groups); what runs, and how a call is decoded
and its result framed, is ``ActorWorker``'s.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import io
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from zmesh import runtime as runtime_mod
from zmesh.exceptions import ActorDiedError, NodeUnavailableError
from zmesh.object_ref import ObjectRef
from zmesh.runtime import Runtime, calls, segments
from zmesh.transport import protocol, serialization
from zmesh.transport.security import Security
from zmesh.worker import executors, framing, streams

logger = logging.getLogger(__name__)

DEFAULT_GROUP = "_default"
CallItem = calls.CallItem
ASYNC_DEFAULT_CONCURRENCY = 1000  # Ray's default for async actors
_MAX_ERROR_CHARS = 64 * 1024


class LogStream(io.TextIOBase):
    """Sends each line printed in the actor (or task) to the driver that owns it (or called it).

    ``owner`` None: lines that cannot go ``direct`` (on the running call's connection) go to the node's log.
    ``prefix`` may be changed between calls (a task worker names each task's lines).
    """

    def __init__(self, rt: Runtime, owner: str | None, prefix: str, stream: str, direct: Callable[[str, str, str], bool]) -> None:
        self._rt, self._owner, self.prefix, self._stream = rt, owner, prefix, stream
        self._direct = direct
        self._buffer = ""
        self._lock = threading.Lock()

    def _send(self, text: str) -> None:
        if self._direct(self.prefix, self._stream, text):
            return
        if self._owner is not None and self._rt.send_log(self._owner, self.prefix, self._stream, text):
            return
        # The owner is gone (a detached actor outlives its creator): the line goes to the node's log instead.
        fallback = sys.__stderr__ if self._stream == "stderr" else sys.__stdout__
        if fallback is not None:
            try:
                fallback.write(f"({self.prefix}) {text}")
                fallback.flush()
            except (OSError, ValueError):
                pass

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += text
            if "\n" in self._buffer:
                lines, self._buffer = self._buffer.rsplit("\n", 1)
                self._send(lines + "\n")
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._buffer:
                self._send(self._buffer)
                self._buffer = ""


def method_options(cls: type, name: str) -> tuple[int, str | None]:
    """(num_returns, concurrency group) declared with ``@zmesh.method`` on ``cls.name``."""
    opts = getattr(getattr(cls, name, None), "_zmesh_method_options", None)
    if opts is None:
        return 1, None
    return opts.num_returns, opts.concurrency_group


def is_async_class(cls: type) -> bool:
    return any(inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn) for _, fn in inspect.getmembers(cls, inspect.isfunction))


class ActorWorker:
    """The target of a worker's executor: one actor's methods, and how a call to one is decoded and answered."""

    def __init__(self, rt: Runtime, actor_id: str, incarnation: int, spec: dict[str, Any], payload: list[Any]) -> None:
        self.rt = rt
        self.actor_id = actor_id
        self.incarnation = incarnation
        # What every CALL batch must name to run here: calls for any other actor or incarnation are refused unrun.
        self.call_target: calls.CallTarget = (str(actor_id), int(incarnation))
        self.message_type = protocol.CALL
        adopt_code_path(spec.get("sys_path") or [])
        self.cls: type = serialization.loads_code(payload[0])
        self.class_name = spec["class_name"]
        self.init_args = payload[2:]
        self.instance: Any = None
        self.is_async = is_async_class(self.cls)
        default_limit = spec.get("max_concurrency") or (ASYNC_DEFAULT_CONCURRENCY if self.is_async else 1)
        self.limits: dict[str, int] = {DEFAULT_GROUP: default_limit, **(spec.get("concurrency_groups") or {})}
        self.sequential = not self.is_async and all(v == 1 for v in self.limits.values()) and len(self.limits) == 1
        self.creator_id: bytes | None = spec.get("creator_id")
        self.credits = streams.Credits()  # streaming calls' producers, paced by their callers' acks
        self.credits.register(rt.inbound)
        # Calls can arrive (on the I/O thread) while the constructor runs: the executor queues them.
        self.executor: executors.Executor = executors.AsyncLoop(self) if self.is_async else executors.Threaded(self)

    # --- construction

    def construct(self) -> None:
        args, kwargs = serialization.loads_args(self.init_args)
        args, kwargs = resolve_refs(args, kwargs)
        self.instance = self.cls(*args, **kwargs)

    def serve(self) -> str | None:
        """Pick how calls run once the actor is built; returns the address of its own call sockets, if any."""
        if self.sequential:
            self.executor = executors.Inline(self)
            return self.executor.address
        return None

    # --- receiving (I/O thread)

    def on_call(self, identity: bytes, msg: protocol.Message) -> None:
        """A batch of calls from one caller, split into items in their order (on the I/O thread)."""
        target, items = calls.split_calls(identity, msg)
        if target != self.call_target:
            self.rt.send_to_caller(identity, self.refusal(target, items))
            return
        self.executor.submit(items)

    def split(self, identity: bytes, msg: protocol.Message) -> tuple[calls.CallTarget, list[Any]]:
        return calls.split_calls(identity, msg)

    def keep_code(self, items: list[Any]) -> None:
        pass  # an actor's calls carry no code

    def refusal(self, target: calls.CallTarget, items: list[CallItem]) -> list[Any]:
        """The answer to a batch meant for another actor or incarnation (a caller's stale view): none of it runs."""
        logger.debug("refusing %d call(s) for actor %s incarnation %d: this is %s incarnation %d", len(items), *target, *self.call_target)
        return calls.refusal(target, items)

    def log_direct(self, prefix: str, stream: str, text: str) -> bool:
        """Send a line printed during a call from the actor's creator ahead of that call's result.

        On the call's own connection the line cannot be overtaken by the result, so it is
        not lost when the driver exits right after ``get``. Other lines go through the I/O thread.
        """
        executor = self.executor
        if not isinstance(executor, executors.Inline):
            return False
        return executor.send_ahead([protocol.header_frame(protocol.LOG, (prefix, stream, text))], self.creator_id)

    # --- one call: decode, invoke, frame the result (the Target the executors run)

    def group_of(self, method_name: str, group: str | None) -> str | None:
        """The group a call runs in; None for one the actor does not define (the call then fails, naming it)."""
        if group is None:
            group = method_options(self.cls, method_name)[1]
        if group is None:
            return DEFAULT_GROUP
        return group if group in self.limits else None

    def run(self, item: CallItem) -> executors.Reply:
        """Run one call on this thread; returns its result's batch entry and frames."""
        identity, oids, method_name, group, frames, window = item
        mapped: list[Any] = []  # the mappings of shared-memory arguments, weakly: gone once nothing here reads them
        try:
            method, args, kwargs = self._prepare(method_name, group, frames, mapped)
            args, kwargs = resolve_refs(args, kwargs)
            value = method(*args, **kwargs)
            del args, kwargs
            if window is not None:  # streaming: the items go out now, the result is their count
                value = streams.produce(value, self._stream_call(identity, oids, method_name, window), self.credits, self.rt)
            ok, parts, refs = self._frame_value(identity, oids, method_name, value)
        except BaseException as exc:  # the user's code may raise anything; it must reach the caller
            ok, parts, refs = False, self._error_frames(oids, method_name, exc), []
        return framing.reply(self.rt, identity, oids, ok, parts, refs, released=segments.released(mapped))

    async def run_async(self, item: CallItem) -> executors.Reply:
        identity, oids, method_name, group, frames, window = item
        mapped: list[Any] = []
        try:
            method, args, kwargs = self._prepare(method_name, group, frames, mapped)
            args = [await a if isinstance(a, ObjectRef) else a for a in args]
            kwargs = {k: (await v if isinstance(v, ObjectRef) else v) for k, v in kwargs.items()}
            result = method(*args, **kwargs)
            del args, kwargs
            if window is not None:
                result = await streams.produce_async(result, self._stream_call(identity, oids, method_name, window), self.credits, self.rt)
            elif inspect.isawaitable(result):
                result = await result
            ok, parts, refs = self._frame_value(identity, oids, method_name, result)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            ok, parts, refs = False, self._error_frames(oids, method_name, exc), []
        if not self.rt.borrows.settled:
            await asyncio.to_thread(self.rt.settle_borrows)  # owners answer over the network: never block the loop
        return framing.reply(self.rt, identity, oids, ok, parts, refs, settle=False, released=segments.released(mapped))

    def _stream_call(self, identity: bytes, oids: tuple[Any, ...], method_name: str, window: int) -> streams.StreamCall:
        """How this executor sends a streaming call's items: the inline one on its call socket, else via the I/O thread."""
        executor = self.executor
        inline = executor if isinstance(executor, executors.Inline) else None

        def frame(value: Any) -> tuple[list[Any], list[Any]]:
            _, parts, refs = self._frame_value(identity, oids, method_name, value)
            return parts[0], refs

        send = inline.send_item if inline is not None else functools.partial(self.rt.send_to_caller, identity)
        return streams.StreamCall(oids[0], identity, window, send, frame, inline.wait_credit if inline is not None else None)

    def _prepare(self, method_name: str, group: str | None, frames: list[Any], mapped: list[Any]) -> tuple[Any, list[Any], dict[str, Any]]:
        """The bound method and its decoded arguments (top-level refs still refs: each executor resolves them its way)."""
        if self.group_of(method_name, group) is None:
            defined = ", ".join(repr(g) for g in self.limits if g != DEFAULT_GROUP) or "none"
            where = f"{self.class_name}.{method_name}"
            raise ValueError(f"{where} was called in concurrency group {group!r}, which the actor does not define (defined: {defined})")
        method = getattr(self.instance, method_name, None)
        if method is None or not callable(method):
            raise AttributeError(f"'{self.class_name}' actor has no method {method_name!r}")
        with segments.reading(mapped):
            args, kwargs = serialization.loads_args(frames)
        return method, args, kwargs

    def _frame_value(self, identity: bytes, oids: tuple[Any, ...], method_name: str, value: Any) -> tuple[bool, list[list[Any]], list[Any]]:
        """(ok, frames of each return value, refs pickled into them)."""
        return framing.frame_value(self.rt, identity, oids, f"{self.class_name}.{method_name}", value, "method")

    def _error_frames(self, oids: tuple[Any, ...], method_name: str, exc: BaseException) -> list[list[Any]]:
        return framing.error_frames(oids, f"{self.class_name}.{method_name}", exc)


def adopt_code_path(paths: list[str]) -> None:
    """Put the creator's import path first, so modules it imports by name import here too."""
    missing = [p for p in paths if isinstance(p, str) and p not in sys.path and os.path.isdir(p)]
    sys.path[:0] = missing


def resolve_refs(args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """Top-level ObjectRef arguments arrive as their values, as in Ray."""
    if not any(isinstance(a, ObjectRef) for a in args) and not any(isinstance(v, ObjectRef) for v in kwargs.values()):
        return args, kwargs
    rt = runtime_mod.current()
    assert rt is not None
    refs = [a for a in args if isinstance(a, ObjectRef)] + [v for v in kwargs.values() if isinstance(v, ObjectRef)]
    values = dict(zip(refs, rt.get([(r.id, r.owner) for r in refs]), strict=True))
    return [values[a] if isinstance(a, ObjectRef) else a for a in args], {
        k: (values[v] if isinstance(v, ObjectRef) else v) for k, v in kwargs.items()
    }


def _serve_tasks(rt: Runtime, worker_id: str) -> int:
    """A pooled task worker: leased to callers by its node, it runs their functions until the node lets it go."""
    from zmesh.worker.tasks import TaskWorker  # it builds on this module

    worker = TaskWorker(rt, worker_id)
    rt.request("started", (worker_id, 0, True, None, worker.serve()))
    worker.executor.serve()
    return 0


def main(node_address: str, token: str, security: Security, listen_host: str, *, warm: bool = False) -> int:
    """Entry point of a forked worker: returns the process exit code.

    ``warm``: forked ahead of demand; its ``init`` is answered when the node gives it an actor, however long that takes.
    """
    try:
        rt = Runtime(node_address, kind="worker", token=token, security=security, listen_host=listen_host)
    except NodeUnavailableError as exc:
        # The node stopped while this worker started (it was logged where it was seen): nothing to run, nobody to tell.
        logger.debug("worker %s not started: %s", token, exc)
        return 1
    runtime_mod.set_current(rt)
    wait = threading.TIMEOUT_MAX if warm else None
    try:
        (actor_id, incarnation, spec), payload = rt.request("init", (token,), timeout=wait, with_payload=True)
    except ActorDiedError:
        rt.close()
        return 0  # the actor was killed before this worker got to it, or a warm worker was sent away
    # Before any of the actor's code runs (unpickling its class may import its module): its GPUs.
    os.environ.update(spec.get("env") or {})
    rt.namespace = str(spec.get("job_namespace") or rt.namespace)
    if spec.get("kind") == "tasks":
        return _serve_tasks(rt, str(actor_id))
    worker = ActorWorker(rt, actor_id, incarnation, spec, payload)
    rt.actor_id, rt.actor_name, rt.actor_incarnation = actor_id, spec.get("name"), incarnation
    rt.actor_handle_parts = (actor_id, worker.class_name, bytes(payload[1]))
    rt.on_call = worker.on_call
    owner = spec.get("owner_address")
    if owner:
        prefix = f"{worker.class_name} pid={os.getpid()}"
        sys.stdout = LogStream(rt, owner, prefix, "stdout", worker.log_direct)
        sys.stderr = LogStream(rt, owner, prefix, "stderr", worker.log_direct)
    try:
        worker.construct()
    except BaseException as exc:
        text = f"{worker.class_name}.__init__ raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        if len(text) > _MAX_ERROR_CHARS:  # the report must fit in one node request, whatever the message
            text = text[: _MAX_ERROR_CHARS // 2] + "\n[... cut ...]\n" + text[-_MAX_ERROR_CHARS // 2 :]
        rt.request("started", (actor_id, incarnation, False, text, None))
        sys.stderr.flush()
        rt.close()
        return 1
    address = worker.serve()
    rt.request("started", (actor_id, incarnation, True, None, address))
    worker.executor.serve()
    return 0
