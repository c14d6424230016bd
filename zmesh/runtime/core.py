"""The per-process runtime: a thin facade wiring the I/O loop, the node client, the outbox, actor calls and objects.

Every zmesh process (driver, worker) has one. User threads submit calls and wait
for values; the I/O thread (``io_loop``) owns the sockets. Rule: no thread sends
on a socket while holding ``_lock``, the lock user threads take to submit or get;
every component below shares that one lock.

Who does what: ``outbox`` sends what user threads queued (I/O thread);
``actor_calls`` tracks actors and their calls; ``object_service`` owns, serves,
fetches and counts objects; ``inbound`` maps each inbound message type to the
component that handles it (I/O thread).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from zmesh.exceptions import ZmeshError
from zmesh.runtime import calls, objects, ownership
from zmesh.runtime.actor_calls import ActorCalls
from zmesh.runtime.inbound import Inbound, header_len
from zmesh.runtime.io_loop import IoLoop
from zmesh.runtime.node_client import NodeClient, node_error
from zmesh.runtime.object_service import ObjectService
from zmesh.runtime.outbox import RESULT, RUN, STOP, TO_PEER, Outbox
from zmesh.runtime.peers import ConnectFailed, Peers
from zmesh.runtime.segments import Segments
from zmesh.runtime.streams import Streams
from zmesh.runtime.task_calls import Task, TaskCalls
from zmesh.transport import protocol, rundir, serialization, sockets
from zmesh.transport.ids import ActorId, ClientId, ObjectId, new_client_id
from zmesh.transport.security import Security, ZapHandler

logger = logging.getLogger(__name__)

__all__ = ["ConnectFailed", "Runtime", "node_error"]

# What decoding a peer's bad message raises: the message is dropped and counted, the process goes on.
_MALFORMED = (protocol.ProtocolError, serialization.DeserializationError)
# A worker is started per actor, and ZeroMQ pays for every socket slot up front: this many peers (actors this
# actor calls) is plenty, and past it a call fails naming the limit (ConnectFailed), as past the file limit.
WORKER_MAX_SOCKETS = 8192

CallHandler = Callable[[bytes, protocol.Message], None]


class Runtime:
    """Everything one process needs to call actors and own objects."""

    def __init__(
        self,
        node_address: str,
        *,
        kind: str = "driver",
        namespace: str = "default",
        token: str | None = None,
        connect_timeout: float = 5.0,
        security: Security | None = None,
        listen_host: str | None = None,
    ) -> None:
        self.client_id: ClientId = new_client_id()
        self.kind = kind
        self.namespace = namespace
        self.node_address = node_address
        self.closed = False
        self.security = security if security is not None else Security(None)
        self._ctx = sockets.new_context(WORKER_MAX_SOCKETS if kind == "worker" else None)
        self._lock = threading.Lock()
        self.objects = objects.ObjectStore(self._lock)
        self._oid_counter = itertools.count(1)
        self._dropped_reported = 0
        self.on_call: CallHandler | None = None  # set by a worker to receive CALLs
        self.on_log: Callable[[str, str, str], None] = _print_log
        # Called on the I/O thread with (node_id, address, state) once subscribed (zmesh.on_membership).
        self.membership_feed: Callable[[tuple[str, ...]], None] | None = None
        # Set in a worker: the actor it hosts (get_runtime_context().get_actor_id()).
        self.actor_id: str | None = None
        self.actor_name: str | None = None
        self.actor_incarnation = 0
        self.actor_handle_parts: tuple[str, str, bytes] | None = None  # (actor id, class name, meta) for current_actor
        self.on_close_hooks: list[Callable[[], None]] = []
        self.segments: Segments | None = None  # this process's end of the node's object store, once welcomed
        # Set in a task worker: told True when the task it runs starts waiting in get/wait, False when it stops.
        self.on_blocked: Callable[[bool], None] | None = None
        self.task_id: ObjectId | None = None  # the task running now, in a task worker

        self.inbound = Inbound()
        self._loop = IoLoop(self._process_outbox, self._after_round, self._on_malformed, _MALFORMED)
        self.peers = Peers(self._ctx, self.security, self.client_id, self._loop, self._on_peer)
        self.node = NodeClient(self._ctx, self.security, node_address, self.client_id, self._loop, self._on_news, self._on_node_lost)
        # Bound before any CURVE socket, so no handshake ever goes unchecked.
        self._zap = ZapHandler(self._ctx, self.security) if not self.security.insecure else None
        if self._zap is not None:
            self._loop.watch_ready(self._zap.socket, self._zap.handle)
        self.listen_host = listen_host or sockets.local_address_towards(node_address)
        self.socket_dir = rundir.socket_dir()
        self._servers, self.address = sockets.servers(self._ctx, self.security, self.listen_host, self.socket_dir)
        # Reference counting across processes (see ownership.py), guarded by _lock.
        self.borrows = ownership.Borrows(self.address)

        self.outbox = Outbox(self._loop, self.peers, self.node, self._servers)
        closed = self._is_closed
        self.object_service = ObjectService(
            self._lock, self.objects, self.borrows, self.address, self._loop, self.outbox, self.peers, self.node, closed
        )
        self.actor_calls = ActorCalls(
            self._lock, self.objects, self._loop, self.outbox, self.peers, self.node, self.request, self.object_service, closed
        )
        self.task_calls = TaskCalls(
            self._lock, self.objects, self._loop, self.outbox, self.node, self.object_service, self.client_id, closed
        )
        # The outbox exists before the components whose messages it sends: what it cannot send goes back to them.
        self.outbox.on_unsent_calls = self._unsent_calls
        self.outbox.on_unsent_message = self.object_service.unsent
        self.inbound.router.register(protocol.CALL, self._on_call, lambda msg: self.on_call is not None)
        self.inbound.router.register(protocol.LOG, self._on_log, header_len(3))
        # Printed during one of our calls, ahead of its result.
        self.inbound.peer.register(protocol.LOG, self._on_log, header_len(3))
        self.inbound.news.register(protocol.MEMBERSHIP, self._on_membership, header_len(3))
        self.streams = Streams(self._lock, self.objects, self._loop, self.outbox, self.release)  # streaming calls' items
        self.streams.register(self.inbound)
        self.object_service.register(self.inbound)
        self.actor_calls.register(self.inbound)
        self.task_calls.register(self.inbound)
        self.inbound.peer.register(protocol.RESULT, self._on_results)
        self.inbound.peer.register(protocol.REFUSED, self._on_refused)
        self.inbound.peer.register(protocol.RETURNED, lambda address, m: self.task_calls.on_returned(address, *calls.split_refusal(m)))

        for server in self._servers:
            self._loop.watch(server, functools.partial(self._on_router, server))
        self._loop.on_close(self._close_servers)
        self._loop.start()
        try:
            self.node_info: dict[str, Any] = self.node.hello(
                {
                    **protocol.identity(),
                    "client_id": self.client_id.hex(),
                    "kind": kind,
                    "pid": os.getpid(),
                    "address": self.address,
                    "token": token,
                    "cluster": self.security.key.fingerprint if self.security.key is not None else None,
                },
                connect_timeout,
            )
        except BaseException:
            self.close(goodbye=False)
            raise
        # Large values go to the node's shared-memory store from now on (serialization's one store per process).
        store = self.node_info.get("store")
        if isinstance(store, dict):
            self.segments = Segments(self.node, self._loop, self.client_id.hex(), store)
            from zmesh.object_ref import ObjectRef  # here: object_ref imports this package

            self._ref_type: Any = ObjectRef
            self.segments.inline = self._inline_ref
            serialization.use_store(self.segments)

    def _is_closed(self) -> bool:
        return self.closed

    # ------------------------------------------------------------------ the node

    def request(
        self,
        op: str,
        args: tuple[Any, ...] = (),
        payload: list[Any] | None = None,
        timeout: float | None = None,
        with_payload: bool = False,
    ) -> Any:
        """Ask the node something and wait for its answer."""
        if self.closed:
            raise ZmeshError("zmesh is shut down; call zmesh.init() first")
        return self.node.request(op, args, payload, timeout, with_payload)

    @property
    def context(self) -> sockets.Context:
        return self._ctx

    def check_size(self, frames: list[Any], what: str) -> None:
        """Refuse at the call site a frame that peers would drop (and disconnect us for)."""
        limit = self.security.max_message_bytes
        for frame in frames:
            size = memoryview(frame).nbytes
            if size > limit:
                raise ValueError(f"{what} take {size:,} bytes in one piece, over the {limit:,} byte limit (ZMESH_MAX_MESSAGE_BYTES)")

    def new_object_id(self) -> ObjectId:
        return ObjectId(self.client_id + next(self._oid_counter).to_bytes(8, "big"))

    # ------------------------------------------------------------------ objects (object_service.py)

    def put(self, value: Any) -> ObjectId:
        with ownership.collect() as refs:
            frames = serialization.dumps_value(value)
        self.check_size(frames, "zmesh.put() values")  # no other process could ever fetch it
        oid = self.new_object_id()
        self.object_service.put(oid, frames, refs)
        return oid

    def _inline_ref(self, value: Any) -> list[Any] | None:
        """A top-level ref argument to a value of ours in the store: its descriptor goes in the call instead of the ref.

        The worker maps it at once, with no round trip to fetch it from us (Ray inlines small values the same way).
        The ref is kept until the call's result, as any ref pickled into a call.
        """
        if type(value) is not self._ref_type or value.owner != self.address:
            return None
        with self._lock:
            entry = self.objects.get_locked(value.id)
            frames = entry.frames if entry is not None and entry.done and entry.ok and entry.error is None else None
        if frames is None or not serialization.is_descriptor(frames):
            return None
        ownership.pickled(value)
        return list(frames)

    def add_ref(self, oid: ObjectId, owner: str) -> None:
        self.object_service.add_ref(oid, owner)

    def release(self, oid: ObjectId) -> None:
        """An ObjectRef was dropped (called from ``__del__``, in any thread, at any moment)."""
        self.object_service.release(oid)

    def settle_borrows(self, timeout: float = 30.0) -> None:
        self.object_service.settle_borrows(timeout)

    def release_lent(self, caller: bytes, oid: ObjectId) -> None:
        self.object_service.release_lent(caller, oid)

    def lend(self, caller: bytes, oid: ObjectId, refs: list[Any]) -> None:
        self.object_service.lend(caller, oid, refs)

    def entries_for(self, refs: list[tuple[ObjectId, str]]) -> list[objects.Entry]:
        return self.object_service.entries_for(refs)

    def get(self, refs: list[tuple[ObjectId, str]], timeout: float | None = None) -> list[Any]:
        """The values behind ``(oid, owner)`` pairs, blocking until all are there."""
        entries = self.object_service.entries_for(refs)
        if len(entries) == 1 and not entries[0].done:
            self.actor_calls.spin_for(refs[0][0], entries[0])
        ready = self.wait_done(entries, len(entries), timeout)
        if ready < len(entries):
            raise objects.timeout_error(timeout, len(entries) - ready)
        return [self.object_service.value_of(e) for e in entries]

    def wait_done(self, entries: list[objects.Entry], count: int, timeout: float | None) -> int:
        """Block until ``count`` of ``entries`` are done; a task worker gives its CPU back while it waits (as Ray)."""
        blocked = self.on_blocked
        if blocked is None or sum(1 for e in entries if e.done) >= count:
            return self.objects.wait_done(entries, count, timeout)
        blocked(True)
        try:
            return self.objects.wait_done(entries, count, timeout)
        finally:
            blocked(False)

    def value_of(self, entry: objects.Entry) -> Any:
        return self.object_service.value_of(entry)

    # ------------------------------------------------------------------ actors (actor_calls.py)

    def create_actor(
        self,
        actor_id: ActorId,
        spec: dict[str, Any],
        class_key: str,
        class_blob: bytes,
        meta_blob: bytes,
        args_frames: list[Any],
        *,
        wait: bool,
        keep: list[Any] | None = None,
    ) -> Any:
        """Ask the node to create an actor; the conn queues calls until it is alive.

        ``keep``: refs pickled into the constructor's arguments, kept while the actor may (re)start.
        """
        self.check_size(args_frames, f"the arguments of {spec['class_name']}()")
        return self.actor_calls.create(actor_id, spec, class_key, class_blob, meta_blob, args_frames, wait, keep)

    def submit_call(
        self,
        actor_id: ActorId,
        method: str,
        args_frames: list[Any],
        num_returns: int,
        group: str | None,
        retries: int,
        keep: list[Any] | None = None,
        window: int | None = None,
    ) -> list[ObjectId]:
        """Send a call; ``keep``: the refs pickled into its arguments, kept alive until its result arrives.

        ``window``: a streaming call, whose producer runs at most that many items ahead (``streams``).
        """
        oids = (self.new_object_id(),) if num_returns == 1 else tuple(self.new_object_id() for _ in range(num_returns))
        self.check_size(args_frames, f"the arguments of {method}()")
        if window is not None:
            self.streams.open(oids[0], window)
        return self.actor_calls.submit(actor_id, oids, method, group, args_frames, retries, keep, window)

    # ------------------------------------------------------------------ tasks (task_calls.py)

    def submit_task(self, task: Task, deps: list[tuple[ObjectId, str]], demand: dict[str, float], strategy: Any) -> None:
        """Queue a task; its result entries are made here, before any ref to them is handed out."""
        self.check_size(task.frames, f"the arguments of {task.name}()")
        with self._lock:
            for oid in task.oids:
                self.objects.new_owned_locked(oid)
                self.objects.add_ref_locked(oid)
        self.task_calls.shape_for(task.shape, demand, strategy)
        self.task_calls.submit(task, deps)

    def cancel(self, oid: ObjectId, force: bool, recursive: bool) -> None:
        self.task_calls.cancel(oid, force, recursive)

    # ------------------------------------------------------------------ sending (any thread)

    def send_log(self, owner: str, prefix: str, stream: str, text: str) -> bool:
        """Send a printed line to ``owner``; False once it is known to be gone (nobody would read it)."""
        if owner in self.peers.gone:
            return False
        self._loop.push((TO_PEER, owner, protocol.encode(protocol.LOG, (prefix, stream, text))))
        return True

    def send_to_caller(self, identity: bytes, frames: list[Any]) -> None:
        """Send ``frames`` at once to the peer ``identity``, on the ROUTER it reached us by (any thread)."""
        self.outbox.send_or_push_router([identity, *frames])

    def send_result(self, identity: bytes, header: tuple[Any, ...], frames: list[Any]) -> None:
        """Queue one call's result for its caller; ``header`` is a ``calls.result_entry``."""
        self._loop.push((RESULT, identity, (header, frames)))

    # ------------------------------------------------------------------ shutdown

    def abandon_after_fork(self) -> None:
        """In a forked child: this runtime's thread and sockets belong to the parent; never touch them."""
        self.closed = True
        self.node.lost = "this process was forked from the one that called zmesh.init(); call zmesh.init() here"

    def close(self, goodbye: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if self.segments is not None:
            if serialization.current_store() is self.segments:
                serialization.use_store(None)
            self.segments.close()
        for hook in self.on_close_hooks:
            hook()
        if goodbye:
            # Leases with nothing in flight go back first: the node then keeps their workers for others.
            self._loop.push((RUN, None, self.task_calls.hand_back_idle))
            self.node.send(protocol.encode(protocol.GOODBYE, (self.client_id,)))
        self._loop.stop((STOP, None, None))
        with self._lock:
            woken = self.objects.fail_all_locked(ZmeshError("zmesh was shut down while this object was pending"))
        for waiters, callbacks in woken:
            objects.wake(waiters, callbacks)
        self.node.fail_pending("ZmeshError", "zmesh was shut down")
        if self._loop.stopped or self._loop.on_io_thread:
            self._ctx.destroy(linger=0)
        else:
            # Closing the sockets under a thread that still uses them makes ZeroMQ abort the whole process.
            logger.warning("zmesh I/O thread did not stop within its time; its sockets are left open")
        sockets.remove_ipc(self.address)

    def _close_servers(self) -> None:
        for server in self._servers:
            self._loop.unwatch(server)
            server.close(linger=0)
        if self._zap is not None:
            self._loop.unwatch(self._zap.socket)
            self._zap.close()

    # ------------------------------------------------------------------ the I/O thread

    def _process_outbox(self, outbox: deque[Any]) -> bool:
        return self.outbox.process(outbox)

    def _after_round(self) -> None:
        self.object_service.after_round()
        if self.segments is not None:
            self.segments.after_round()
        self.task_calls.after_round(time.monotonic())
        if self.kind == "worker" and self.dropped != self._dropped_reported and self.node.lost is None:
            self._dropped_reported = self.dropped
            self.node.send_now(protocol.encode(protocol.REQUEST, (0, "dropped", (self.dropped,))))
        self.object_service.watch_peers()

    def _on_node_lost(self, why: str) -> None:
        self.actor_calls.on_node_lost(why)
        self.task_calls.on_node_lost(why)

    def _unsent_calls(self, address: str, entries: list[tuple[Any, ...]], error: BaseException) -> None:
        self.actor_calls.fail_unsent(address, entries, error)
        self.task_calls.fail_unsent(address, entries, error)

    def _on_results(self, address: str, msg: protocol.Message) -> None:
        items = calls.split_results(msg)
        if self.task_calls.owns(address):
            self.task_calls.on_results(address, items)
        else:
            self.actor_calls.on_results(address, items)

    def _on_refused(self, address: str, msg: protocol.Message) -> None:
        target, refused = calls.split_refusal(msg)
        if self.task_calls.owns(address):
            self.task_calls.on_refused(address, target, refused)
        else:
            self.actor_calls.on_refused(address, target, refused)

    def _on_malformed(self, sock: sockets.Socket, frames: list[Any], reason: BaseException) -> None:
        self.drop(frames[0] if sock in self._servers else sock, reason)

    @property
    def dropped(self) -> int:
        """Malformed messages received, reported to the node by workers."""
        return self.inbound.dropped

    def drop(self, peer: Any, reason: BaseException) -> None:
        """Count a bad message and log it at most once a minute per peer; a worker tells its node."""
        self.inbound.drop(peer, reason, time.monotonic())

    def _on_router(self, via: sockets.Socket, frames: list[Any]) -> None:
        identity = frames[0]
        msg = protocol.decode(frames[1:])
        self.outbox.route.add(identity, via)  # only peers that speak the protocol are remembered
        self.inbound.router.dispatch(identity, msg)

    def _on_peer(self, address: str, frames: list[Any]) -> None:
        self.inbound.peer.dispatch(address, protocol.decode(frames))

    def _on_news(self, msg: protocol.Message) -> None:
        self.inbound.news.dispatch(None, msg)

    def _on_call(self, identity: bytes, msg: protocol.Message) -> None:
        assert self.on_call is not None  # the table's shape check
        self.on_call(identity, msg)

    def _on_log(self, sender: object, msg: protocol.Message) -> None:
        prefix, stream, text = msg.header
        self.on_log(str(prefix), str(stream), str(text))

    def _on_membership(self, sender: None, msg: protocol.Message) -> None:
        feed = self.membership_feed
        if feed is not None:
            feed(tuple(str(x) for x in msg.header))


def _print_log(prefix: str, stream: str, text: str) -> None:
    out = sys.stderr if stream == "stderr" else sys.stdout
    try:
        out.write(f"({prefix}) {text}\n" if not text.endswith("\n") else f"({prefix}) {text}")
        out.flush()
    except (OSError, ValueError):
        pass
