"""A pooled task worker: runs the remote functions its leaseholders send, one at a time, on its main thread.

A task worker is forked like an actor's worker but belongs to no actor: its node leases it to
callers, one at a time, and takes it back. Each TASK batch names the worker (its id and 0); a
task carries its function's key, and the pickled function the first time a lease sends it, which
the worker keeps for later tasks. Tasks run on the ``Inline`` executor (the main thread receives,
runs and answers each), so a task costs no thread hand-off.

``zmesh.cancel`` reaches the worker's runtime (its I/O thread), not the call sockets the main
thread is busy with: a task not started yet is skipped when its turn comes; the running one is
interrupted with SIGINT, whose handler raises ``TaskCancelledError`` only if that task still runs.
While a task waits in ``zmesh.get``/``wait`` the worker tells its node, which lends the task's CPUs
to others until it resumes (as Ray does), so recursive tasks on a full node do not deadlock.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from zmesh.exceptions import TaskCancelledError
from zmesh.runtime import Runtime, calls, segments
from zmesh.runtime.inbound import header_len
from zmesh.transport import protocol, serialization
from zmesh.transport.ids import ObjectId
from zmesh.worker import executors, framing, streams
from zmesh.worker.main import LogStream, adopt_code_path, resolve_refs

logger = logging.getLogger(__name__)

DEFAULT_GROUP = "_default"
_REMEMBER_CANCELLED = 10_000
_FUNCTIONS = 1_000  # functions kept unpickled; an older one is sent again by its next lease


class TaskWorker:
    """The Target of a task worker's executor: remote functions, by key."""

    def __init__(self, rt: Runtime, worker_id: str) -> None:
        self.rt = rt
        self.worker_id = worker_id
        self.call_target: calls.CallTarget = (worker_id, 0)
        self.message_type = protocol.TASK
        self.limits = {DEFAULT_GROUP: 1}
        self._functions: OrderedDict[str, tuple[Any, str]] = OrderedDict()
        self._running: bytes | None = None
        self._cancel: bytes | None = None  # the running task a cancel asked to interrupt
        self._cancelled: OrderedDict[bytes, None] = OrderedDict()  # tasks cancelled before they started
        self._main = threading.main_thread().ident
        self._gpu_env = os.environ.get("CUDA_VISIBLE_DEVICES")
        rt.inbound.router.register(protocol.CANCEL, self._on_cancel, header_len(2))
        rt.on_blocked = self._blocked
        signal.signal(signal.SIGINT, self._interrupt)
        self.credits = streams.Credits()  # streaming tasks' producers, paced by their callers' acks
        self.credits.register(rt.inbound)
        self.executor = executors.Inline(self)
        # Lines a task prints go to its caller ahead of its result (as Ray shows them on the driver's console).
        self._out = LogStream(rt, None, "task", "stdout", self._log_direct)
        self._err = LogStream(rt, None, "task", "stderr", self._log_direct)
        sys.stdout, sys.stderr = self._out, self._err

    def serve(self) -> str:
        return self.executor.address

    # ------------------------------------------------------------------ the Target protocol

    def split(self, identity: bytes, msg: protocol.Message) -> tuple[calls.CallTarget, list[Any]]:
        return calls.split_tasks(identity, msg)

    def keep_code(self, items: list[Any]) -> None:
        """Tasks given back unrun: the functions they carry are kept, as the caller sends them to this worker once."""
        for _, _, fn_key, options, frames in items:
            if frames[0]:
                try:
                    self._function(fn_key, frames[0], options)
                except Exception:  # it fails, naming why, wherever the task runs
                    logger.debug("could not load the function of a task given back", exc_info=True)

    def refusal(self, target: calls.CallTarget, items: list[Any]) -> list[Any]:
        logger.debug("refusing %d task(s) for worker %s: this is %s", len(items), target[0], self.worker_id)
        return calls.refusal(target, items)

    def group_of(self, method_name: str, group: str | None) -> str | None:
        return DEFAULT_GROUP

    def run(self, item: calls.TaskItem) -> executors.Reply:
        identity, oids, fn_key, options, frames = item
        oid = oids[0]
        where = fn_key
        mapped: list[Any] = []  # the mappings of shared-memory arguments, weakly: gone once nothing here reads them
        try:
            fn, where = self._function(fn_key, frames[0], options)
            self._environment(options.get("env"))
            with segments.reading(mapped):
                args, kwargs = serialization.loads_args(frames[1:])
            args, kwargs = resolve_refs(args, kwargs)
            if oid in self._cancelled:
                del self._cancelled[oid]
                raise TaskCancelledError(f"task {where} was cancelled before it started")
            self.rt.task_id = ObjectId(oid)
            self._out.prefix = self._err.prefix = f"{where} pid={os.getpid()}"
            self._running = oid
            try:
                value = fn(*args, **kwargs)
                del args, kwargs
                if inspect.iscoroutine(value):
                    value = asyncio.run(value)
                window = options.get("window")
                if window is not None:  # streaming: the items go out now, the result is their count
                    value = streams.produce(_sync(value), self._stream_call(identity, oids, where, int(window)), self.credits, self.rt)
            finally:
                self._running = None
                self.rt.task_id = None
                self._out.flush()
                self._err.flush()
            ok, parts, refs = framing.frame_value(self.rt, identity, oids, where, value, "task")
        except BaseException as exc:  # the user's code may raise anything; it must reach the caller
            ok, parts, refs = False, framing.error_frames(oids, where, exc), []
        return framing.reply(self.rt, identity, oids, ok, parts, refs, released=segments.released(mapped))

    async def run_async(self, item: calls.TaskItem) -> executors.Reply:
        return self.run(item)

    def _stream_call(self, identity: bytes, oids: tuple[Any, ...], where: str, window: int) -> streams.StreamCall:
        def frame(value: Any) -> tuple[list[Any], list[Any]]:
            _, parts, refs = framing.frame_value(self.rt, identity, oids, where, value, "task")
            return parts[0], refs

        inline = self.executor
        return streams.StreamCall(oids[0], identity, window, inline.send_item, frame, inline.wait_credit)

    # ------------------------------------------------------------------ functions

    def _function(self, key: str, blob: Any, options: dict[str, Any]) -> tuple[Any, str]:
        if blob:
            adopt_code_path(options.get("path") or [])
            fn = serialization.loads_code(blob)
            self._functions[key] = (fn, str(options.get("name") or getattr(fn, "__qualname__", key)))
            while len(self._functions) > _FUNCTIONS:
                self._functions.popitem(last=False)
        found = self._functions.get(key)
        if found is None:
            raise RuntimeError(f"task function {key} was never sent to this worker")
        self._functions.move_to_end(key)
        return found

    def _environment(self, env: Any) -> None:
        """The GPUs of this task's lease, set before it runs; a task without any sees the worker's own."""
        gpus = env.get("CUDA_VISIBLE_DEVICES") if isinstance(env, dict) else None
        if gpus is None:
            gpus = self._gpu_env
        if gpus is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus)

    # ------------------------------------------------------------------ cancel and blocking (any thread)

    def _on_cancel(self, identity: bytes, msg: protocol.Message) -> None:
        """On the I/O thread: cancel a task queued here or running now; with ``recursive`` its children too."""
        oid, recursive = msg.header
        if not isinstance(oid, bytes):
            raise protocol.ProtocolError("a cancel names no task")
        if recursive:
            self.rt.task_calls.cancel_all()
        if oid == self._running and self._main is not None:
            self._cancel = oid
            signal.pthread_kill(self._main, signal.SIGINT)
            return
        self._cancelled[oid] = None
        while len(self._cancelled) > _REMEMBER_CANCELLED:
            self._cancelled.popitem(last=False)

    def _interrupt(self, signum: int, frame: Any) -> None:
        """SIGINT on the main thread: a cancel of the task running now raises there; any other is ignored."""
        target, self._cancel = self._cancel, None
        if target is not None and target == self._running:
            raise TaskCancelledError("the task was cancelled while it ran")

    def _log_direct(self, prefix: str, stream: str, text: str) -> bool:
        current = self.executor.current
        if current is None:
            return False
        return self.executor.send_ahead([protocol.header_frame(protocol.LOG, (prefix, stream, text))], current[1])

    def _blocked(self, blocked: bool) -> None:
        """The running task starts or stops waiting in get: its CPUs are lent meanwhile, and the tasks queued
        behind it go back to their callers unrun (one of them may be what it waits for)."""
        if self._running is None:
            return
        if threading.get_ident() == self._main:
            self.executor.give_back(blocked)
        self.rt.node.send(protocol.encode(protocol.REQUEST, (0, "blocked", (bool(blocked),))))


def _sync(values: Any) -> Any:
    """An async generator's items, one event-loop run each (a task runs on a plain thread); anything else as it is."""
    if not hasattr(values, "__aiter__"):
        return values
    return _drive(values)


def _drive(agen: Any) -> Iterator[Any]:
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        try:
            loop.run_until_complete(agen.aclose())
        finally:
            loop.close()
