"""The per-process runtime: a thin facade over the I/O loop, the node client, the call pipeline and the objects.

Every zmesh process (driver, worker) has one. User threads submit calls and wait
for values; the I/O thread (``io_loop``) owns the sockets. Rule: no thread sends
on a socket while holding ``_lock``, the lock user threads take to submit or get.
"""

from __future__ import annotations

import copy
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

import zmq

from zmesh.exceptions import NodeUnavailableError, ObjectLostError, TaskError, ZmeshError
from zmesh.runtime import calls, objects, ownership
from zmesh.runtime.actors import ALIVE, DEAD, ActorConn, Call, Recent, apply_state, refuse
from zmesh.runtime.io_loop import IoLoop
from zmesh.runtime.node_client import TO_NODE, NodeClient, node_error
from zmesh.runtime.peers import ConnectFailed, Peers
from zmesh.runtime.spin import SpinPolicy, default_limit_ns
from zmesh.transport import protocol, rundir, serialization, sockets
from zmesh.transport.ids import FINAL_INCARNATION, ActorId, ClientId, ObjectId, new_client_id
from zmesh.transport.security import Security, ZapHandler

logger = logging.getLogger(__name__)

__all__ = ["ConnectFailed", "Runtime", "node_error"]

# What the I/O thread is handed (first item of each outbox entry).
_TO_PEER = b"P"
_VIA_ROUTER = b"R"
_RUN = b"F"
_STOP = b"X"
_CALL = calls.CALL
_RESULT = calls.RESULT
# What decoding a peer's bad message raises: the message is dropped and counted, the process goes on.
_MALFORMED = (protocol.ProtocolError, serialization.DeserializationError)
_REMEMBER_DEAD = 10_000
_REMEMBER_ROUTES = 100_000
_COUNTING = (protocol.BORROW, protocol.UNBORROW)
_PEER_CHECK_S = 1.0
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
        self._actors: dict[ActorId, ActorConn] = {}
        # The actors believed to live at each address: one, unless a stale view shares it with the actor there now.
        self._actor_at: dict[str, list[ActorConn]] = {}
        # Dead actors remembered for late calls; bounded, so a long-lived driver stays small.
        self._dead_actors: Recent[ActorId, BaseException] = Recent(_REMEMBER_DEAD)
        self._oid_counter = itertools.count(1)
        self._released: deque[ObjectId] = deque()
        self._sent_classes: set[str] = set()
        self._fetching: dict[str, set[ObjectId]] = {}  # owner address -> objects asked of it
        self._peers_checked = 0.0
        # The last call sent from a user thread, and its socket: a get of its result polls that socket (spin.py).
        self._sync_call: tuple[ObjectId, sockets.Socket] | None = None
        self._spin = SpinPolicy(default_limit_ns())
        # Reference counting across processes (see ownership.py), guarded by _lock.
        self.borrows = ownership.Borrows("")  # told our address once the servers are bound
        self._settled = threading.Condition(self._lock)
        self._lent: dict[bytes, dict[ObjectId, list[Any]]] = {}  # caller -> result -> refs kept for it
        self.dropped = 0  # malformed messages received, reported to the node by workers
        self._dropped_reported = 0
        self._drop_logged: dict[Any, float] = {}
        self.on_call: CallHandler | None = None  # set by a worker to receive CALLs
        self.on_log: Callable[[str, str, str], None] = _print_log

        self._loop = IoLoop(self._process_outbox, self._after_round, self._on_malformed, _MALFORMED)
        self._batcher = calls.Batcher(self._send_batch)
        self.peers = Peers(self._ctx, self.security, self.client_id, self._loop, self._on_peer)
        self.node = NodeClient(self._ctx, self.security, node_address, self.client_id, self._loop, self._on_news, self._on_node_lost)
        # Bound before any CURVE socket, so no handshake ever goes unchecked.
        self._zap = ZapHandler(self._ctx, self.security) if not self.security.insecure else None
        if self._zap is not None:
            self._loop.watch_ready(self._zap.socket, self._zap.handle)
        self.listen_host = listen_host or sockets.local_address_towards(node_address)
        self.socket_dir = rundir.socket_dir()
        self._servers, self.address = sockets.servers(self._ctx, self.security, self.listen_host, self.socket_dir)
        self.borrows.me = self.address
        # Called on the I/O thread with (node_id, address, state) once subscribed (zmesh.on_membership).
        self.membership_feed: Callable[[tuple[str, ...]], None] | None = None
        # Set in a worker: the actor it hosts (get_runtime_context().get_actor_id()).
        self.actor_id: str | None = None
        self.actor_name: str | None = None
        self.actor_incarnation = 0
        self.actor_handle_parts: tuple[str, str, bytes] | None = None  # (actor id, class name, meta) for current_actor
        self.on_close_hooks: list[Callable[[], None]] = []
        # Which of our ROUTERs each peer reached us on: its answers must leave by the same one. Bounded: a
        # long-lived process hears from many short-lived workers; the most recent 100,000 are remembered.
        self._route: Recent[bytes, sockets.Socket] = Recent(_REMEMBER_ROUTES)
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

    # ------------------------------------------------------------------ the node

    @property
    def node_lost(self) -> str | None:
        return self.node.lost

    @property
    def request_timeout(self) -> float:
        return self.node.timeout

    @request_timeout.setter
    def request_timeout(self, seconds: float) -> None:
        self.node.timeout = seconds

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

    def request_nowait(self, op: str, args: tuple[Any, ...], payload: list[Any], on_reply: Callable[[bool, Any, list[Any]], None]) -> None:
        """Send a request whose reply is handled on the I/O thread."""
        self.node.request_nowait(op, args, payload, on_reply)

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

    # ------------------------------------------------------------------ objects

    def put(self, value: Any) -> ObjectId:
        with ownership.collect() as refs:
            frames = serialization.dumps_value(value)
        self.check_size(frames, "zmesh.put() values")  # no other process could ever fetch it
        oid = self.new_object_id()
        with self._lock:
            entry = self.objects.new_owned_locked(oid)
            entry.frames, entry.done = frames, True
            entry.contained = refs or None
            self.objects.add_ref_locked(oid)
        return oid

    def add_ref(self, oid: ObjectId, owner: str) -> None:
        with self._lock:
            if self.objects.add_ref_locked(oid) == 1 and owner != self.address:
                self.borrows.held(oid, owner)

    def release(self, oid: ObjectId) -> None:
        """An ObjectRef was dropped (called from ``__del__``, in any thread, at any moment).

        Counted at once when the lock is free, so a loop of ``get(put(v))`` holds one value,
        not a second's worth; a thread that holds the lock already (a collection inside a
        locked section) leaves it to the I/O thread's next round. Messages it causes are
        always sent by the I/O thread: ``__del__`` may run in the middle of another send.
        """
        self._released.append(oid)
        if self._lock.acquire(blocking=False):
            try:
                out = self._release_locked()
            finally:
                self._lock.release()
            for message in out:
                self._loop.push((_TO_PEER, message.address, message.frames))

    def settle_borrows(self, timeout: float = 30.0) -> None:
        """Register with their owners the foreign refs this process holds, and wait for their answers.

        A worker calls this before it sends a result: once the caller has the result it may
        drop the refs it kept for the call, and our own must be counted by then.
        """
        borrows = self.borrows
        if borrows.settled:
            return
        with self._lock:
            out = borrows.register()
            # What we rely on: ours, and those another thread registered before us (we may hold them too).
            mine = list(borrows.awaiting)
        for message in out:
            self._loop.push((_TO_PEER, message.address, message.frames))
        awaiting = borrows.awaiting
        with self._settled:
            if not self._settled.wait_for(lambda: self.closed or not any(oid in awaiting for oid in mine), timeout):
                logger.warning("owners did not acknowledge %d borrowed reference(s) within %g s", len(mine), timeout)

    def release_lent(self, caller: bytes, oid: ObjectId) -> None:
        """``caller`` is done with result ``oid``: the refs lent with it are ours to drop."""
        with self._lock:
            lent = self._lent.get(caller)
            refs = lent.pop(oid, None) if lent is not None else None
            if lent is not None and not lent:
                del self._lent[caller]
        del refs  # dropped outside the lock: their release is counted on the I/O thread's next round

    def lend(self, caller: bytes, oid: ObjectId, refs: list[Any]) -> None:
        """Keep ``refs`` (pickled into the result ``oid`` for ``caller``) until the caller releases that result."""
        with self._lock:
            self._lent.setdefault(caller, {})[oid] = refs

    def entries_for(self, refs: list[tuple[ObjectId, str]]) -> list[objects.Entry]:
        """The entries behind ``(oid, owner address)`` pairs, fetching foreign ones from their owners."""
        out = []
        fetch: list[tuple[ObjectId, str]] = []
        with self._lock:
            for oid, owner in refs:
                entry = self.objects.get_locked(oid)
                if entry is None and owner == self.address:
                    entry = objects.Entry(owned=True)
                    entry.done, entry.ok = True, False
                    entry.error = ObjectLostError(f"object {oid.hex()} was freed: no reference to it was kept")
                elif entry is None or not entry.owned:
                    entry, need_fetch = self.objects.fetch_locked(oid)
                    if need_fetch:
                        fetch.append((oid, owner))
                        self._fetching.setdefault(owner, set()).add(oid)
                out.append(entry)
        for oid, owner in fetch:
            self._loop.push((_TO_PEER, owner, protocol.encode(protocol.GET_OBJECT, (oid,))))
        return out

    def get(self, refs: list[tuple[ObjectId, str]], timeout: float | None = None) -> list[Any]:
        """The values behind ``(oid, owner)`` pairs, blocking until all are there."""
        entries = self.entries_for(refs)
        if len(entries) == 1 and not entries[0].done:
            self._spin_for(refs[0][0], entries[0])
        ready = self.objects.wait_done(entries, len(entries), timeout)
        if ready < len(entries):
            raise objects.timeout_error(timeout, len(entries) - ready)
        return [self.value_of(e) for e in entries]

    def _spin_for(self, oid: ObjectId, entry: objects.Entry) -> None:
        """Poll for the answer to the synchronous call just sent, instead of sleeping until the I/O thread has it."""
        sync = self._sync_call
        if sync is None or sync[0] != oid:
            return
        self._sync_call = None
        budget = self._spin.budget()
        if budget:
            self._spin.record(self._loop.serve_until(sync[1], lambda: entry.done, budget))

    def value_of(self, entry: objects.Entry) -> Any:
        if entry.error is not None:
            # A fresh copy each time: raising the stored one would hang this call's traceback (and
            # through its frames the caller's ObjectRefs) on an error many entries share, for ever.
            raise copy.copy(entry.error)
        assert entry.frames is not None
        try:
            value = serialization.loads_value(entry.frames)
        except serialization.DeserializationError as exc:
            raise TaskError(f"could not deserialize the result: {exc}") from None
        if not entry.ok:
            try:
                raise value
            finally:
                # The frame must not keep the error: error -> traceback -> this frame -> error is a cycle
                # only the garbage collector breaks, and until it runs (an idle worker may never allocate
                # enough) every frame on that traceback keeps its locals, the caller's ObjectRefs among them.
                del value
        return value

    # ------------------------------------------------------------------ actors

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
        with self._lock:
            conn = self._actors.get(actor_id)
            if conn is None:
                conn = self._actors[actor_id] = ActorConn(actor_id)
            conn.resolving = True
            conn.keep_args = keep or None
            send_class = class_key not in self._sent_classes
            self._sent_classes.add(class_key)
        payload = [class_blob if send_class else b"", meta_blob, *args_frames]
        args = (spec, class_key)
        if wait:
            try:
                return self.request("create", args, payload)
            except Exception as exc:
                if isinstance(exc, NodeUnavailableError):
                    with self._lock:
                        self._sent_classes.discard(class_key)
                self._on_actor_state(actor_id, DEAD, FINAL_INCARNATION, None, str(exc))
                raise

        def on_reply(ok: bool, value: Any, payload: list[Any]) -> None:
            if not ok:
                self._on_actor_state(actor_id, DEAD, FINAL_INCARNATION, None, str(node_error(value)))

        self.request_nowait("create", args, payload, on_reply)
        return None

    def submit_call(
        self,
        actor_id: ActorId,
        method: str,
        args_frames: list[Any],
        num_returns: int,
        group: str | None,
        retries: int,
        keep: list[Any] | None = None,
    ) -> list[ObjectId]:
        """Send a call; ``keep``: the refs pickled into its arguments, kept alive until its result arrives."""
        oids = (self.new_object_id(),) if num_returns == 1 else tuple(self.new_object_id() for _ in range(num_returns))
        self.check_size(args_frames, f"the arguments of {method}()")
        header, frames = calls.call_entry(oids, method, group, args_frames)
        call = Call(oids, header, frames, retries, keep or None)
        dest = None
        resolve = False
        alone = False
        failed: BaseException | None = None
        with self._lock:
            for oid in oids:
                self.objects.new_owned_locked(oid)
                self.objects.add_ref_locked(oid)
            conn = self._actors.get(actor_id)
            if conn is None:
                conn = self._actors[actor_id] = ActorConn(actor_id)
                dead = self._dead_actors.get(actor_id)
                if dead is not None:
                    conn.state, conn.error = DEAD, dead
            if conn.state is ALIVE and not conn.queue:
                alone = not conn.inflight
                conn.send(call)
                dest = conn.address
            elif conn.state is DEAD:
                failed = conn.error
            else:
                conn.queue.append(call)
                if not conn.resolving:
                    conn.resolving = resolve = True
        if dest is not None:
            # A call with nothing else in flight to its actor (the synchronous pattern) goes out
            # from this thread when it can; a stream of calls goes through the I/O thread, in batches.
            if not (alone and self._send_now(dest, call)):
                self._loop.push((_CALL, dest, call))
        elif failed is not None:
            self._fail(oids, failed)
        elif resolve:
            self._resolve(actor_id)
        return list(oids)

    def _send_now(self, dest: str, call: Call) -> bool:
        """Send ``call`` from this thread if the I/O thread sleeps and nothing is queued before it."""
        loop = self._loop
        if not loop.lock.acquire(blocking=False):
            return False
        try:
            if loop.outbox or dest in self.peers.gone or self.closed:
                return False
            try:
                sock = self.peers.get(dest)
            except ConnectFailed:
                return False  # the I/O thread fails the call with the reason
            sockets.send(sock, calls.message(_CALL, [call.header], call.frames, call.target))
            self._sync_call = (call.oids[0], sock)
            # Sending may have consumed the signal of an answer already waiting on this socket.
            if sockets.readable(sock):
                loop.touched(sock)
                loop.wake()
            return True
        finally:
            loop.lock.release()

    def _resolve(self, actor_id: ActorId) -> None:
        def on_reply(ok: bool, value: Any, payload: list[Any]) -> None:
            if ok:
                self._on_actor_state(actor_id, *value)
            else:
                self._on_actor_state(actor_id, DEAD, FINAL_INCARNATION, None, str(node_error(value)))

        self.request_nowait("resolve", (actor_id,), [], on_reply)

    def _fail(self, oids: tuple[ObjectId, ...], error: BaseException) -> None:
        self._complete([(oid, None, False, error) for oid in oids])

    def _complete(self, results: list[tuple[ObjectId, list[Any] | None, bool, BaseException | None]]) -> None:
        """Record values, wake local waiters and answer peers that asked for them meanwhile."""
        woken = []
        serve = []
        with self._lock:
            for oid, frames, ok, error in results:
                entry, waiters, callbacks, remote = self.objects.complete_locked(oid, frames, ok, error)
                woken.append((waiters, callbacks))
                if entry is not None and remote:
                    serve.append((oid, entry, remote))
        for waiters, callbacks in woken:
            objects.wake(waiters, callbacks)
        for oid, entry, idents in serve:
            frames = self._object_frames(oid, entry)
            for identity in idents:
                self._send_or_push_router([identity, *frames])

    def _send_or_push_router(self, frames: list[Any]) -> None:
        if self._loop.on_io_thread:
            self._send_router(frames)
        else:
            self._loop.push((_VIA_ROUTER, frames[0], frames[1:]))

    def send_log(self, owner: str, prefix: str, stream: str, text: str) -> bool:
        """Send a printed line to ``owner``; False once it is known to be gone (nobody would read it)."""
        if owner in self.peers.gone:
            return False
        self._loop.push((_TO_PEER, owner, protocol.encode(protocol.LOG, (prefix, stream, text))))
        return True

    def send_to_caller(self, identity: bytes, frames: list[Any]) -> None:
        """Send ``frames`` at once to the peer ``identity``, on the ROUTER it reached us by (any thread)."""
        self._send_or_push_router([identity, *frames])

    def send_result(self, identity: bytes, header: tuple[Any, ...], frames: list[Any]) -> None:
        """Queue one call's result for its caller; ``header`` is a ``calls.result_entry``."""
        self._loop.push((_RESULT, identity, (header, frames)))

    # ------------------------------------------------------------------ shutdown

    def abandon_after_fork(self) -> None:
        """In a forked child: this runtime's thread and sockets belong to the parent; never touch them."""
        self.closed = True
        self.node.lost = "this process was forked from the one that called zmesh.init(); call zmesh.init() here"

    def close(self, goodbye: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        for hook in self.on_close_hooks:
            hook()
        if goodbye:
            self.node.send(protocol.encode(protocol.GOODBYE, (self.client_id,)))
        self._loop.stop((_STOP, None, None))
        with self._lock:
            woken = self.objects.fail_all_locked(ZmeshError("zmesh was shut down while this object was pending"))
        for waiters, callbacks in woken:
            objects.wake(waiters, callbacks)
        self.node.fail_pending("ZmeshError", "zmesh was shut down")
        self._ctx.destroy(linger=0)
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
        """Send what user threads queued, in order; consecutive calls or results for one peer as one batch."""
        batcher = self._batcher
        try:
            while outbox:
                command, dest, body = outbox.popleft()
                if command is _CALL:
                    batcher.add(_CALL, dest, body.header, body.frames, body.target)
                    continue
                if command is _RESULT:
                    batcher.add(_RESULT, dest, body[0], body[1])
                    continue
                batcher.flush()
                if command is _TO_PEER:
                    if dest not in self.peers.gone:
                        self._send_to_peer(dest, body)
                elif command is _VIA_ROUTER:
                    self._send_router([dest, *body])
                elif command is TO_NODE:
                    self.node.send_now(body)
                elif command is _RUN:
                    body()
                elif command is _STOP:
                    return False
        finally:
            batcher.flush()
        return True

    def _after_round(self) -> None:
        if self._released or self.objects.freed_lent:
            self._release_refs()
        if self.kind == "worker" and self.dropped != self._dropped_reported and self.node.lost is None:
            self._dropped_reported = self.dropped
            self.node.send_now(protocol.encode(protocol.REQUEST, (0, "dropped", (self.dropped,))))
        if self._fetching or self._lent or self.objects.borrowers():
            self._check_peers()

    def _release_refs(self) -> None:
        with self._lock:
            out = self._release_locked()
        self._send_all(out)

    def _release_locked(self) -> list[ownership.Outgoing]:
        """Count the dropped ObjectRefs; what to tell owners and lenders about what we no longer hold."""
        out: list[ownership.Outgoing] = []
        borrows = self.borrows
        released = self._released
        while released:
            try:
                oid = released.popleft()
            except IndexError:
                break  # another thread took the last one
            if self.objects.release_locked(oid) == 0:
                out.extend(borrows.dropped(oid))
        while self.objects.freed_lent:
            oid, lender = self.objects.freed_lent.pop()
            out.extend(borrows.letting_go(ownership.Outgoing(lender, protocol.encode(protocol.RELEASE_LENT, (oid,)))))
        return out

    def _send_all(self, messages: list[ownership.Outgoing]) -> None:
        for message in messages:
            if message.address not in self.peers.gone:
                self._send_to_peer(message.address, message.frames)

    def _send_batch(
        self, kind: bytes, dest: Any, target: calls.CallTarget | None, entries: list[tuple[Any, ...]], payload: list[Any]
    ) -> None:
        frames = calls.message(kind, entries, payload, target)
        if kind is _RESULT:
            self._send_router([dest, *frames])
            return
        if dest in self.peers.gone:
            return
        try:
            sock = self.peers.get(dest)
        except ConnectFailed as exc:
            self._fail_unsent(dest, entries, exc)
            return
        sockets.send(sock, frames)
        self._loop.touched(sock)

    def _fail_unsent(self, address: str, entries: list[tuple[Any, ...]], error: BaseException) -> None:
        """Calls that could not be sent fail with the reason; they leave the in-flight table."""
        with self._lock:
            for conn in self._actor_at.get(address, ()):
                for entry in entries:
                    conn.inflight.pop(entry[0][0], None)
        for entry in entries:
            self._fail(entry[0], error)

    def _send_to_peer(self, address: str, frames: list[Any]) -> None:
        try:
            sock = self.peers.get(address)
        except ConnectFailed as exc:
            logger.error("%s", exc)
            msg = protocol.decode(frames)
            if msg.type == protocol.GET_OBJECT:  # the fetch can never be answered
                with self._lock:
                    self._fetching.get(address, set()).discard(msg.header[0])
                self._fail(msg.header[:1], exc)
            return
        sockets.send(sock, frames)
        self._loop.touched(sock)

    def _send_router(self, frames: list[Any]) -> None:
        sock = self._route.get(frames[0]) or self._servers[0]
        try:
            sockets.send(sock, frames)
        except zmq.ZMQError as exc:  # the peer went away: its answer has nowhere to go
            logger.debug("dropping a reply to a gone peer: %s", exc)
            return
        self._loop.touched(sock)

    def _on_malformed(self, sock: sockets.Socket, frames: list[Any], reason: BaseException) -> None:
        self.drop(frames[0] if sock in self._servers else sock, reason)

    def drop(self, peer: Any, reason: BaseException) -> None:
        """Count a bad message and log it at most once a minute per peer; a worker tells its node."""
        self.dropped += 1
        now = time.monotonic()
        key = peer if isinstance(peer, bytes) else id(peer)
        if now - self._drop_logged.get(key, -1e9) >= 60:
            if len(self._drop_logged) > 10_000:
                self._drop_logged.clear()  # many distinct peers sending garbage must not grow memory
            self._drop_logged[key] = now
            logger.warning("dropped a malformed message from a peer: %s", reason)

    def _check_peers(self) -> None:
        """Ask the node, once a second, which of the processes we depend on have exited.

        Owners we fetch from (their fetches fail), borrowers of our objects (their references
        no longer count) and callers we lent refs to (we keep them no longer). Per-peer socket
        monitors would tell at once, but wedged sockets under load; once a second is enough.
        """
        now = time.monotonic()
        if now - self._peers_checked < _PEER_CHECK_S or self.node.lost is not None:
            return
        self._peers_checked = now
        with self._lock:
            ask = sorted({*self._fetching, *self.objects.borrowers()}) + [caller.hex() for caller in self._lent]

        def on_reply(ok: bool, value: Any, payload: list[Any]) -> None:
            if ok:
                for peer in value:
                    if isinstance(peer, str) and "://" in peer:
                        self._peer_gone(peer)
                    elif isinstance(peer, str):
                        with self._lock:
                            self._lent.pop(bytes.fromhex(peer), None)

        self.node.request_nowait("gone", (ask,), [], on_reply)

    def _peer_gone(self, address: str) -> None:
        """A process we fetch from, print to or lend to has exited: fail what it owed us, free what we kept for it."""
        with self._lock:
            lost = self._fetching.pop(address, set())
            self.objects.borrower_gone_locked(address)
            out = self.borrows.owner_gone(address)
            self._settled.notify_all()
        self._send_all(out)
        self.peers.mark_gone(address)
        self.peers.drop(address)
        self._complete([(oid, None, False, ObjectLostError(f"object {oid.hex()} is lost: its owner at {address} is gone")) for oid in lost])

    def _on_router(self, via: sockets.Socket, frames: list[Any]) -> None:
        identity = frames[0]
        msg = protocol.decode(frames[1:])
        self._route.add(identity, via)  # only peers that speak the protocol are remembered
        if msg.type == protocol.CALL and self.on_call is not None:
            self.on_call(identity, msg)
        elif msg.type == protocol.GET_OBJECT and len(msg.header) == 1 and isinstance(msg.header[0], bytes):
            self._serve_object(identity, ObjectId(msg.header[0]))
        elif msg.type == protocol.LOG and len(msg.header) == 3:
            prefix, stream, text = msg.header
            self.on_log(str(prefix), str(stream), str(text))
        elif msg.type in _COUNTING and len(msg.header) == 2 and isinstance(msg.header[1], str):
            oid, borrower = ObjectId(msg.header[0]), msg.header[1]
            with self._lock:
                if msg.type == protocol.UNBORROW:
                    self.objects.unborrow_locked(oid, borrower)
                    return
                ok = self.objects.borrow_locked(oid, borrower)
            self._send_router([identity, *protocol.encode(protocol.BORROWED, (oid, ok))])
        elif msg.type == protocol.RELEASE_LENT and len(msg.header) == 1:
            self.release_lent(identity, msg.header[0])
        else:
            raise protocol.ProtocolError(f"unexpected {msg.type!r} message")

    def _on_news(self, msg: protocol.Message) -> None:
        if msg.type == protocol.ACTOR_STATE and len(msg.header) == 5:
            self._on_actor_state(*msg.header)
        elif msg.type == protocol.PEER_GONE and len(msg.header) == 1:
            self._peer_gone(str(msg.header[0]))
        elif msg.type == protocol.MEMBERSHIP and len(msg.header) == 3:
            feed = self.membership_feed
            if feed is not None:
                feed(tuple(str(x) for x in msg.header))
        else:
            raise protocol.ProtocolError(f"unexpected {msg.type!r} message from the node")

    def _on_peer(self, address: str, frames: list[Any]) -> None:
        msg = protocol.decode(frames)
        if msg.type == protocol.RESULT:
            self._on_results(address, calls.split_results(msg))
        elif msg.type == protocol.REFUSED:
            self._on_refused(address, *calls.split_refusal(msg))
        elif msg.type == protocol.OBJECT and len(msg.header) == 2:
            oid, ok = msg.header
            with self._lock:
                self._fetching.get(address, set()).discard(oid)
            self._complete([(oid, list(msg.payload), bool(ok), None)])
        elif msg.type == protocol.LOG and len(msg.header) == 3:  # printed during one of our calls, ahead of its result
            prefix, stream, text = msg.header
            self.on_log(str(prefix), str(stream), str(text))
        elif msg.type == protocol.BORROWED and len(msg.header) == 2:
            with self._lock:
                out = self.borrows.answered(ObjectId(msg.header[0]), bool(msg.header[1]))
                self._settled.notify_all()
            self._send_all(out)
        else:
            raise protocol.ProtocolError(f"unexpected {msg.type!r} message from a peer")

    def _on_results(self, address: str, items: list[calls.ResultItem]) -> None:
        results: list[tuple[ObjectId, list[Any] | None, bool, BaseException | None]] = []
        finished = []  # dropped after the lock: the refs they kept are released then
        with self._lock:
            at = self._actor_at.get(address, ())
            for oids, ok, parts, lent in items:
                call = None
                for conn in at:
                    call = conn.inflight.pop(ObjectId(oids[0]), None)
                    if call is not None:
                        break
                if call is None:
                    continue  # a late answer from a worker already declared dead
                finished.append(call)
                if lent:
                    for oid in oids:
                        entry = self.objects.get_locked(ObjectId(oid))
                        if entry is not None:
                            entry.lender = address
                results.extend((ObjectId(oid), part, ok, None) for oid, part in zip(oids, parts, strict=True))
        self._complete(results)
        del finished

    def _on_refused(self, address: str, target: calls.CallTarget, refused: list[tuple[bytes, ...]]) -> None:
        """The worker at ``address`` is not ``target``: the calls did not run; the node says what became of the actor."""
        actor_id = ActorId(target[0])
        with self._lock:
            conn = self._actors.get(actor_id)
            ask = conn is not None and refuse(conn, address, target[1], [ObjectId(oids[0]) for oids in refused])
        if ask:
            logger.info("the worker at %s refused calls for actor %s incarnation %d; asking the node", address, *target)
            self._resolve(actor_id)

    def _serve_object(self, identity: bytes, oid: ObjectId) -> None:
        with self._lock:
            entry = self.objects.get_locked(oid)
            if entry is not None and not entry.done:
                entry.remote_waiters.append(identity)
                return
        self._send_router([identity, *self._object_frames(oid, entry)])

    def _object_frames(self, oid: ObjectId, entry: objects.Entry | None) -> list[Any]:
        if entry is None or not entry.owned:
            error = ObjectLostError(f"object {oid.hex()} is not held by its owner any more (freed or owner restarted)")
            return protocol.encode(protocol.OBJECT, (oid, False), serialization.dumps_value(error))
        if entry.error is not None:
            return protocol.encode(protocol.OBJECT, (oid, False), serialization.dumps_value(entry.error))
        return protocol.encode(protocol.OBJECT, (oid, entry.ok), entry.frames or [])

    def _on_node_lost(self, why: str) -> None:
        """Every actor the node hosted is lost with it."""
        with self._lock:
            actor_ids = [a for a, conn in self._actors.items() if conn.state is not DEAD]
        for actor_id in actor_ids:
            self._on_actor_state(actor_id, DEAD, FINAL_INCARNATION, None, f"actor {actor_id} is lost: {why}")

    def _on_actor_state(self, actor_id: ActorId, state: str, incarnation: int, address: str | None, error: str | None) -> None:
        """Apply the node's news about an actor: flush, fail or retry calls accordingly."""
        on_io_thread = self._loop.on_io_thread
        with self._lock:
            conn = self._actors.get(actor_id)
            step = apply_state(conn, state, incarnation, address, error) if conn is not None else None
            if step is None or conn is None:
                return
            for left in (step.gone, step.detach):
                at = self._actor_at.get(left or "")
                if left is not None and at is not None and conn in at:
                    at.remove(conn)
                    if not at:
                        del self._actor_at[left]
            if step.gone is not None and step.gone in self._actor_at:
                step.gone = None  # another actor's worker took that address since: its connection stays
            if step.gone is not None:
                self.peers.mark_gone(step.gone)
            if conn.state is ALIVE and conn.address is not None:
                at = self._actor_at.setdefault(conn.address, [])
                if conn not in at:
                    at.append(conn)
                self.peers.gone.discard(conn.address)  # a new worker may bind the address of a dead one
            elif conn.state is DEAD and conn.error is not None:
                # Nothing is queued or in flight any more: keep only the error, for late calls.
                del self._actors[actor_id]
                self._dead_actors.add(actor_id, conn.error)
            if step.send and address is not None and not on_io_thread:
                # Queued under the lock, so calls submitted later cannot overtake these.
                for call in step.send:
                    self._loop.push((_CALL, address, call))
        if step.send and address is not None and on_io_thread:
            # The I/O thread holds the I/O lock: later calls can only queue behind these, never overtake them.
            for call in step.send:
                self._batcher.add(_CALL, address, call.header, call.frames, call.target)
            self._batcher.flush()
        for oids, err in step.fail:
            self._fail(oids, err)
        if step.gone is not None:
            gone = step.gone
            if on_io_thread:
                self.peers.drop(gone)
            else:
                self._loop.push((_RUN, None, lambda: self.peers.drop(gone)))


def _print_log(prefix: str, stream: str, text: str) -> None:
    out = sys.stderr if stream == "stderr" else sys.stdout
    try:
        out.write(f"({prefix}) {text}\n" if not text.endswith("\n") else f"({prefix}) {text}")
        out.flush()
    except (OSError, ValueError):
        pass
