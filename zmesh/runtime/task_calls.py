"""Calls of remote functions (tasks): inputs awaited, workers leased per resource shape, dispatch, retries, cancel.

A task first waits in its caller until its top-level ``ObjectRef`` inputs exist, holding no
worker and no CPU; one that failed fails the task with its error. It then queues for its
*shape* (resource demand and scheduling strategy). For a shape with tasks queued the caller
asks its node for worker leases, a few at a time and never more than tasks wait; a lease is a
worker on some member, bound to this caller until it hands it back. Tasks go straight to the
leased worker's call sockets as TASK batches and come back as RESULT batches on the same
connection: the node is off the per-task path. A lease runs one task at a time while tasks are
slow and keeps a few in flight while they are quick (``depth``), so a burst of tiny tasks flows
in batches and long tasks spread over every lease. A lease with nothing to do goes back after
``LINGER_S``, so a loop of synchronous tasks keeps its worker.

Everything here runs on the I/O thread, except ``submit`` and ``cancel``, which queue the work
and wake it. A worker lost with tasks in flight (``LEASE_LOST`` from the node, or a refusal)
sends them again while ``max_retries`` allows, else fails them with ``WorkerCrashedError``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from zmesh.exceptions import NodeUnavailableError, TaskCancelledError, WorkerCrashedError
from zmesh.runtime import calls, objects, segments
from zmesh.runtime.inbound import Inbound, header_len
from zmesh.runtime.io_loop import IoLoop
from zmesh.runtime.node_client import NodeClient, node_error
from zmesh.runtime.object_service import ObjectService, Outcome
from zmesh.runtime.outbox import RUN, TO_PEER, Outbox
from zmesh.transport import protocol, serialization
from zmesh.transport.ids import ClientId, ObjectId

logger = logging.getLogger(__name__)

LINGER_S = 0.2  # an idle lease is handed back after this long: a synchronous loop keeps its worker
MAX_ASKING = 8  # lease requests waiting at the node at once, per shape (Ray asks up to 10)
MAX_DEPTH = 256  # tasks in flight on one lease when they are quick: big batches, few sends
QUICK_S = 0.002  # a task answered this fast lets its lease take more in flight; a slower one brings it back to 1

ShapeKey = tuple[Any, ...]


@dataclasses.dataclass(eq=False, slots=True)
class Task:
    oids: tuple[ObjectId, ...]
    fn_key: str
    fn_blob: bytes
    name: str
    frames: list[Any]
    options: dict[str, Any]
    shape: ShapeKey
    retries: int  # left; -1: for ever
    retry_exceptions: bool | tuple[type[BaseException], ...]
    keep: list[Any] | None  # the refs pickled into the arguments, alive until the task ends
    deps: list[objects.Entry]
    path: list[str] = dataclasses.field(default_factory=list)  # the caller's import path, sent with the function
    waiting: int = 0  # inputs not there yet
    cancelled: bool = False
    lease: Lease | None = None
    sent_at: float = 0.0


@dataclasses.dataclass(eq=False, slots=True)
class Lease:
    lease_id: str
    shape: ShapeKey
    address: str  # the worker's call sockets
    runtime_address: str  # the worker's runtime (cancels go there: its main thread runs the task)
    worker_id: str
    node_id: str
    env: dict[str, str]
    inflight: dict[ObjectId, Task] = dataclasses.field(default_factory=dict)
    functions: set[str] = dataclasses.field(default_factory=set)  # sent to this worker already
    depth: int = 1
    idle_since: float | None = None
    last_answer: float = 0.0


@dataclasses.dataclass(eq=False, slots=True)
class Shape:
    key: ShapeKey
    demand: dict[str, float]
    strategy: Any
    queue: deque[Task] = dataclasses.field(default_factory=deque)
    leases: list[Lease] = dataclasses.field(default_factory=list)
    asking: dict[str, float] = dataclasses.field(default_factory=dict)  # lease ids asked for -> when


class TaskCalls:
    """The caller's side of tasks: one Shape per resource demand and strategy, the leases it holds, its tasks."""

    def __init__(
        self,
        lock: Any,
        store: objects.ObjectStore,
        loop: IoLoop,
        outbox: Outbox,
        node: NodeClient,
        results: ObjectService,
        client_id: ClientId,
        closed: Callable[[], bool],
    ) -> None:
        self._lock = lock
        self._store = store
        self._loop = loop
        self._outbox = outbox
        self._node = node
        self._results = results
        self._client_id = client_id
        self._closed = closed
        self._incoming: deque[Task] = deque()  # submitted by user threads, taken by the I/O thread
        self._shapes: dict[ShapeKey, Shape] = {}
        self._leases: dict[str, Lease] = {}
        self._lease_at: dict[str, Lease] = {}
        self._tasks: dict[ObjectId, Task] = {}  # every task not finished, by its first result id
        self._lease_ids = 0

    def register(self, inbound: Inbound) -> None:
        inbound.news.register(protocol.LEASE_LOST, lambda _, m: self._lease_lost(str(m.header[0]), str(m.header[1])), header_len(2))

    def owns(self, address: str) -> bool:
        """Whether ``address`` is a worker this process leased (its RESULTs and refusals are ours)."""
        return address in self._lease_at

    @property
    def pending(self) -> int:
        return len(self._tasks)

    # ------------------------------------------------------------------ user threads

    def submit(self, task: Task, deps: list[tuple[ObjectId, str]]) -> None:
        """Queue ``task`` (its result entries already made); ``deps``: its top-level ref inputs."""
        task.deps = self._results.entries_for(deps) if deps else []
        self._incoming.append(task)
        self._loop.push((RUN, None, self._take_incoming))

    def cancel(self, oid: ObjectId, force: bool, recursive: bool) -> None:
        self._loop.push((RUN, None, lambda: self._cancel(oid, force, recursive)))

    def cancel_all(self) -> None:
        """Cancel every task this process submitted and has not seen finish (a cancelled task's children)."""
        self._loop.push((RUN, None, self._cancel_all))

    def _cancel_all(self) -> None:
        for oid in list(self._tasks):
            self._cancel(oid, False, True)

    # ------------------------------------------------------------------ the I/O thread: inputs and queues

    def _take_incoming(self) -> None:
        touched: set[ShapeKey] = set()
        while self._incoming:
            task = self._incoming.popleft()
            self._tasks[task.oids[0]] = task
            pending = [e for e in task.deps if not e.done]
            if not pending:
                if self._inputs_ready(task):
                    touched.add(task.shape)
                continue
            task.waiting = len(pending)
            for entry in pending:
                self._store.add_callback(entry, self._when_input(task))
        for key in touched:
            self._pump(self._shapes[key])

    def _when_input(self, task: Task) -> Callable[[], None]:
        """What an input's completion calls (on whichever thread completes it): the I/O thread then counts it."""
        return lambda: self._loop.push((RUN, None, lambda: self._input_done(task)))

    def _input_done(self, task: Task) -> None:
        task.waiting -= 1
        if task.waiting == 0 and self._tasks.get(task.oids[0]) is task and self._inputs_ready(task):
            self._pump(self._shapes[task.shape])

    def _inputs_ready(self, task: Task) -> bool:
        """Queue ``task`` now that its inputs exist; False (and the task failed) if one of them failed."""
        if task.cancelled:
            return False
        failed = next((e for e in task.deps if not e.ok or e.error is not None), None)
        task.deps = []
        if failed is not None:
            self._finish(task)
            self._results.complete([(oid, failed.frames, False, failed.error) for oid in task.oids])
            return False
        self._shapes[task.shape].queue.append(task)
        return True

    def shape_for(self, key: ShapeKey, demand: dict[str, float], strategy: Any) -> None:
        """Make the shape ``key`` known (from the user thread that submits its first task; dict writes are atomic)."""
        if key not in self._shapes:
            self._shapes.setdefault(key, Shape(key, demand, strategy))

    def _pump(self, shape: Shape) -> None:
        """Give queued tasks to leases with room; ask for more leases while tasks still wait."""
        queue = shape.queue
        if queue:
            for lease in shape.leases:
                batch: list[tuple[tuple[Any, ...], list[Any]]] = []
                while queue and len(lease.inflight) < lease.depth:
                    task = queue.popleft()
                    if task.cancelled:  # cancelled while it was away (given back by a worker): it ends here
                        self._finish(task)
                        self._results.fail(task.oids, TaskCancelledError(f"task {task.name} was cancelled"))
                        continue
                    batch.append(self._entry(task, lease))
                if batch:
                    lease.idle_since = None
                    self._outbox.send_batch(calls.TASK, lease.address, (lease.worker_id, 0), batch)
                if not queue:
                    break
        want = min(len(queue) - len(shape.asking), MAX_ASKING - len(shape.asking))
        for _ in range(max(0, want)):
            self._ask(shape)

    def _entry(self, task: Task, lease: Lease) -> tuple[tuple[Any, ...], list[Any]]:
        task.lease = lease
        task.sent_at = time.monotonic()
        lease.inflight[task.oids[0]] = task
        options = task.options
        if task.fn_key in lease.functions:
            blob = b""
        else:
            blob = task.fn_blob
            lease.functions.add(task.fn_key)
            options = {**options, "path": task.path}
        if lease.env:
            options = {**options, "env": lease.env}
        return calls.task_entry(task.oids, task.fn_key, options, [blob, *task.frames])

    # ------------------------------------------------------------------ leases

    def _ask(self, shape: Shape) -> None:
        self._lease_ids += 1
        lease_id = f"{self._client_id.hex()}-{self._lease_ids}"
        key = shape.key
        shape.asking[lease_id] = time.monotonic()

        def on_reply(ok: bool, value: Any, payload: list[Any]) -> None:
            self._granted(shape, key, lease_id, ok, value)

        try:
            self._node.request_nowait("lease", (lease_id, shape.demand, shape.strategy), [], on_reply)
        except NodeUnavailableError as exc:
            shape.asking.pop(lease_id, None)
            self._fail_shape(shape, exc)

    def _granted(self, shape: Shape, key: ShapeKey, lease_id: str, ok: bool, value: Any) -> None:
        if shape.asking.pop(lease_id, None) is None:
            if ok:  # asked for, then no longer wanted: straight back
                self._hand_back(lease_id)
            return
        if not ok:
            error = node_error(value)
            if not isinstance(value, list | tuple) or value[0] != "Returned":
                self._fail_shape(shape, error)
            return
        lease_id, address, runtime_address, worker_id, node_id, env = value
        lease = Lease(str(lease_id), key, str(address), str(runtime_address), str(worker_id), str(node_id), dict(env or {}))
        self._leases[lease.lease_id] = lease
        self._lease_at[lease.address] = lease
        shape.leases.append(lease)
        lease.idle_since = time.monotonic()
        self._pump(shape)

    def _fail_shape(self, shape: Shape, error: BaseException) -> None:
        """No lease can be had for this shape (an impossible placement, the node gone): its queued tasks fail."""
        while shape.queue:
            task = shape.queue.popleft()
            self._finish(task)
            self._results.fail(task.oids, error)

    def _hand_back(self, lease_id: str) -> None:
        if self._node.lost is None and not self._closed():
            try:
                self._node.request_nowait("return_lease", (lease_id,), [], _ignore)
            except NodeUnavailableError:
                pass

    def after_round(self, now: float) -> None:
        """Hand back leases idle for ``LINGER_S`` and lease requests no queued task needs any more."""
        for shape in list(self._shapes.values()):
            if not shape.queue and shape.asking:
                for lease_id in list(shape.asking):
                    del shape.asking[lease_id]
                    self._hand_back(lease_id)
            for lease in list(shape.leases):
                if lease.idle_since is not None and now - lease.idle_since >= LINGER_S and not lease.inflight:
                    self._drop_lease(lease)
                    self._hand_back(lease.lease_id)

    def hand_back_idle(self) -> None:
        """At shutdown: every lease with nothing in flight goes back (the others end with this process)."""
        for shape in list(self._shapes.values()):
            for lease in list(shape.leases):
                if not lease.inflight and self._node.lost is None:
                    self._drop_lease(lease)
                    self._node.request_nowait("return_lease", (lease.lease_id,), [], _ignore)

    def _drop_lease(self, lease: Lease) -> None:
        self._leases.pop(lease.lease_id, None)
        if self._lease_at.get(lease.address) is lease:
            del self._lease_at[lease.address]
        shape = self._shapes.get(lease.shape)
        if shape is not None and lease in shape.leases:
            shape.leases.remove(lease)

    def _lease_lost(self, lease_id: str, reason: str) -> None:
        """The node says the lease's worker (or its whole node) is gone: what it had in flight runs again or fails."""
        lease = self._leases.get(lease_id)
        if lease is None:
            return
        self._drop_lease(lease)
        self._lost(lease, reason)

    def _lost(self, lease: Lease, reason: str) -> None:
        shape = self._shapes[lease.shape]
        again: list[Task] = []
        for task in lease.inflight.values():
            task.lease = None
            if task.cancelled:
                self._finish(task)
                self._results.fail(task.oids, TaskCancelledError(f"task {task.name} was cancelled"))
            elif task.retries != 0:
                task.retries -= 1 if task.retries > 0 else 0
                again.append(task)
            else:
                self._finish(task)
                why = f"the worker running task {task.name} died ({reason}) and it has no retries left"
                self._results.fail(task.oids, WorkerCrashedError(why))
        lease.inflight.clear()
        if again:
            logger.info("task worker lost (%s): sending %d task(s) again", reason, len(again))
            shape.queue.extendleft(reversed(again))
        self._pump(shape)

    def on_refused(self, address: str, target: calls.CallTarget, refused: list[tuple[bytes, ...]]) -> None:
        """The worker at ``address`` is not the one leased (a stale lease): as if it were lost."""
        lease = self._lease_at.get(address)
        if lease is not None and target == (lease.worker_id, 0):
            self._drop_lease(lease)
            self._lost(lease, "another process answered at its address")
            self._hand_back(lease.lease_id)

    def on_returned(self, address: str, target: calls.CallTarget, returned: list[tuple[bytes, ...]]) -> None:
        """The worker gave these tasks back unrun (its running task waits in get): they go to another lease."""
        lease = self._lease_at.get(address)
        if lease is None or target != (lease.worker_id, 0):
            return
        again = [task for oids in returned if (task := lease.inflight.pop(ObjectId(oids[0]), None)) is not None]
        for task in again:
            task.lease = None
        lease.depth = 1  # its running task is slow: one at a time until answers come quickly again
        shape = self._shapes[lease.shape]
        shape.queue.extendleft(reversed(again))
        self._pump(shape)

    def on_node_lost(self, why: str) -> None:
        error = NodeUnavailableError(why)
        for task in list(self._tasks.values()):
            self._finish(task)
            self._results.fail(task.oids, error)
        for shape in self._shapes.values():
            shape.queue.clear()
            shape.leases.clear()
            shape.asking.clear()
        self._leases.clear()
        self._lease_at.clear()

    # ------------------------------------------------------------------ results

    def on_results(self, address: str, items: list[calls.ResultItem]) -> None:
        lease = self._lease_at.get(address)
        if lease is None:
            return
        now = time.monotonic()
        outcomes: list[Outcome] = []
        for oids, ok, parts, lent in items:
            task = lease.inflight.pop(ObjectId(oids[0]), None)
            if task is None:
                continue
            started = max(task.sent_at, lease.last_answer)
            lease.last_answer = now
            lease.depth = min(lease.depth * 2, MAX_DEPTH) if now - started < QUICK_S else 1
            if task.cancelled:
                self._finish(task)
                self._results.fail(task.oids, TaskCancelledError(f"task {task.name} was cancelled"))
                continue
            if not ok and task.retries != 0 and task.retry_exceptions and self._retry_error(task, parts):
                task.retries -= 1 if task.retries > 0 else 0
                self._shapes[task.shape].queue.appendleft(task)
                continue
            if lent & calls.ARGS_RELEASED:
                segments.reusable(task.keep)
            self._finish(task)
            if lent & calls.LENT:
                for oid in oids:
                    entry = self._store.get_locked(ObjectId(oid))
                    if entry is not None:
                        entry.lender = address
            outcomes.extend((ObjectId(oid), part, ok, None) for oid, part in zip(oids, parts, strict=True))
        self._results.complete(outcomes)
        if not lease.inflight:
            lease.idle_since = now
        self._pump(self._shapes[lease.shape])

    def _retry_error(self, task: Task, parts: list[list[Any]]) -> bool:
        """Whether the error in ``parts`` is one the task retries on (``retry_exceptions``)."""
        if task.retry_exceptions is True:
            return True
        try:
            error = serialization.loads_value(parts[0])
        except serialization.DeserializationError:
            return False
        cause = getattr(error, "cause", None) or error
        return isinstance(cause, task.retry_exceptions) if isinstance(task.retry_exceptions, tuple) else False

    def fail_unsent(self, address: str, entries: list[tuple[Any, ...]], error: BaseException) -> None:
        lease = self._lease_at.get(address)
        if lease is None:
            return
        for entry in entries:
            task = lease.inflight.pop(ObjectId(entry[0][0]), None)
            if task is not None:
                self._finish(task)
                self._results.fail(task.oids, error)

    def _finish(self, task: Task) -> None:
        self._tasks.pop(task.oids[0], None)
        task.keep = None
        task.frames = []

    # ------------------------------------------------------------------ cancel

    def _cancel(self, oid: ObjectId, force: bool, recursive: bool) -> None:
        task = self._tasks.get(oid)
        if task is None or task.cancelled:
            return  # finished (or never ours): nothing to do, as in Ray
        task.cancelled = True
        error = TaskCancelledError(f"task {task.name} was cancelled")
        lease = task.lease
        if lease is None:
            shape = self._shapes[task.shape]
            if task in shape.queue:
                shape.queue.remove(task)
            self._finish(task)
            self._results.fail(task.oids, error)
            return
        if force:
            try:
                self._node.request_nowait("kill_lease", (lease.lease_id,), [], _ignore)
            except NodeUnavailableError:
                pass
            return
        frames = protocol.encode(protocol.CANCEL, (bytes(task.oids[0]), bool(recursive)))
        self._loop.push((TO_PEER, lease.runtime_address, frames))


def _ignore(ok: bool, value: Any, payload: list[Any]) -> None:
    pass
