"""The per-process runtime: an I/O thread that owns every socket, and the calls, objects
and actor connections that user threads submit through it.

User threads never touch a shared socket: they hand frames to the I/O thread over a
thread-local inproc PUSH, which keeps each thread's submissions in order.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils import monitor as zmq_monitor

from zmesh.exceptions import (
    ActorAlreadyExistsError,
    ActorDiedError,
    NodeUnavailableError,
    ObjectLostError,
    TaskError,
    ZmeshError,
)
from zmesh.runtime import objects
from zmesh.runtime.actors import ALIVE, DEAD, ActorConn, Call, Recent, apply_state
from zmesh.transport import protocol, serialization, sockets
from zmesh.transport.ids import ActorId, ClientId, ObjectId, new_client_id
from zmesh.transport.security import Security, ZapHandler

logger = logging.getLogger(__name__)

# Commands from user threads to the I/O thread (first frame on the inproc socket).
_TO_PEER = b"P"
_TO_NODE = b"N"
_VIA_ROUTER = b"R"
# Calls and results are batched: consecutive ones for one peer leave as one message.
_CALL = protocol.CALL
_RESULT = protocol.RESULT
_MAX_BATCH = 512
# What decoding a peer's bad message can raise; the message is dropped, the process goes on.
_MALFORMED = (protocol.ProtocolError, serialization.DeserializationError, ValueError, TypeError, LookupError, AttributeError)
_STOP = b"X"
_REMEMBER_DEAD = 10_000

_NODE_ERRORS: dict[str, type[Exception]] = {
    "NodeUnavailableError": NodeUnavailableError,
    "ConnectionError": NodeUnavailableError,
    "ActorAlreadyExistsError": ActorAlreadyExistsError,
    "ActorDiedError": ActorDiedError,
    "ValueError": ValueError,
    "TypeError": TypeError,
}

CallHandler = Callable[[bytes, protocol.Message], None]


class ConnectFailed(ZmeshError):
    """No socket to a peer could be opened (out of file descriptors, most likely)."""


class _Reply:
    __slots__ = ("event", "ok", "payload", "value")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = False
        self.value: Any = None
        self.payload: list[Any] = []

    def __call__(self, ok: bool, value: Any, payload: list[Any]) -> None:
        self.ok, self.value, self.payload = ok, value, payload
        self.event.set()


def node_error(value: Any) -> Exception:
    """The exception for a node's error reply ``(kind, message)``."""
    try:
        kind, message = value
    except (TypeError, ValueError):
        return ZmeshError(f"malformed error from node: {value!r}")
    return _NODE_ERRORS.get(kind, ZmeshError)(message)


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
        self.request_timeout = 30.0
        self._ctx = sockets.new_context()
        self._lock = threading.Lock()
        self.objects = objects.ObjectStore(self._lock)
        self._actors: dict[ActorId, ActorConn] = {}
        self._actor_at: dict[str, ActorConn] = {}
        # Dead actors and gone peers, remembered for late calls; bounded, so a long-lived driver stays small.
        self._dead_addresses: Recent[str, None] = Recent(_REMEMBER_DEAD)
        self._dead_actors: Recent[ActorId, BaseException] = Recent(_REMEMBER_DEAD)
        self._requests: dict[int, Callable[[bool, Any, list[Any]], None]] = {}
        self._req_ids = itertools.count(1)
        self._oid_counter = itertools.count(1)
        self._released: deque[ObjectId] = deque()
        # Work for the I/O thread: (command, destination, frames), in submission order.
        self._outbox: deque[tuple[bytes, Any, Any]] = deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._io_sleeping = False
        self._sent_classes: set[str] = set()
        self.closed = False
        self._welcome = _Reply()
        self.dropped = 0  # malformed messages received, reported to the node by workers
        self._dropped_reported = 0
        self._drop_logged: dict[Any, float] = {}
        self.on_call: CallHandler | None = None  # set by a worker to receive CALLs
        self.on_log: Callable[[str, str, str], None] = _print_log
        self.security = security if security is not None else Security(None)
        # Bound before any CURVE socket, so no handshake ever goes unchecked.
        self._zap = ZapHandler(self._ctx, self.security) if not self.security.insecure else None
        self.listen_host = listen_host or sockets.local_address_towards(node_address)
        self._servers, self.address = sockets.servers(self._ctx, self.security, self.listen_host)
        self._router = self._servers[0]
        # Which of our ROUTERs each peer reached us on: its answers must leave by the same one.
        self._route: dict[bytes, sockets.Socket] = {}
        # The kernel tells us at once when a same-host node dies; we learn it from the monitor.
        self._node, node_monitor = sockets.dealer(
            self._ctx, self.security, node_address, self.client_id, monitor=zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
        )
        assert node_monitor is not None
        self._node_monitor = node_monitor
        self._peers: dict[str, sockets.Socket] = {}
        self._peer_by_socket: dict[sockets.Socket, str] = {}
        self._owners_checked = 0.0
        self._fetching: dict[str, set[ObjectId]] = {}  # owner address -> objects asked of it
        # Whoever holds _io_lock may use the sockets: the I/O thread, except while it sleeps in
        # epoll on the sockets' file descriptors (which touches no socket), when a user thread
        # may take it to send a call itself instead of waking the I/O thread to do it.
        self._io_lock = threading.Lock()
        self._epoll = select.epoll()
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._by_fd: dict[int, sockets.Socket] = {}
        self._touched: set[sockets.Socket] = set()
        for sock in (*self._servers, self._node, self._node_monitor):
            self._watch(sock)
        if self._zap is not None:
            self._watch(self._zap.socket)
        self._node_connected = False
        self.node_lost: str | None = None
        self._thread = threading.Thread(target=self._io_loop, name="zmesh-io", daemon=True)
        self._thread.start()
        try:
            self.node_info: dict[str, Any] = self._hello(token, connect_timeout)
        except BaseException:
            self.close(goodbye=False)
            raise

    # ------------------------------------------------------------------ user-thread side

    def _push(self, command: bytes, dest: Any, body: Any) -> None:
        """Hand work to the I/O thread; wakes it only when it is asleep in poll."""
        self._outbox.append((command, dest, body))
        if self._io_sleeping:
            try:
                os.eventfd_write(self._wake_fd, 1)
            except OSError:
                pass  # closed during shutdown

    def _hello(self, token: str | None, timeout: float) -> dict[str, Any]:
        """Introduce this process to its node; both sides check they can understand each other."""
        self._welcome = _Reply()
        fields = {
            **protocol.identity(),
            "client_id": self.client_id.hex(),
            "kind": self.kind,
            "pid": os.getpid(),
            "address": self.address,
            "token": token,
            "cluster": self.security.key.fingerprint if self.security.key is not None else None,
        }
        self._push(_TO_NODE, None, protocol.encode_json(protocol.HELLO_TAG, fields))
        if not self._welcome.event.wait(timeout):
            raise NodeUnavailableError(
                f"no zmesh node answered at {self.node_address} within {timeout:g} s (start one with `zmesh node`, or call "
                "zmesh.init() with no address for a local one; a node of another cluster key cannot answer)"
            )
        if not self._welcome.ok:
            logger.error("the zmesh node at %s refused this %s: %s", self.node_address, self.kind, self._welcome.value)
            raise NodeUnavailableError(f"the zmesh node at {self.node_address} refused this {self.kind}: {self._welcome.value}")
        info: dict[str, Any] = self._welcome.value
        problem = protocol.incompatibility(info)
        if problem is not None:
            logger.error("refusing the zmesh node at %s: %s", self.node_address, problem)
            raise NodeUnavailableError(f"cannot use the zmesh node at {self.node_address}: {problem}")
        return info

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
        if self.node_lost is not None:
            raise NodeUnavailableError(self.node_lost)
        reply = _Reply()
        req_id = next(self._req_ids)
        with self._lock:
            self._requests[req_id] = reply
        self._push(_TO_NODE, None, protocol.encode(protocol.REQUEST, (req_id, op, args), payload or []))
        limit = self.request_timeout if timeout is None else timeout
        if not reply.event.wait(limit):
            with self._lock:
                self._requests.pop(req_id, None)
            raise NodeUnavailableError(f"the zmesh node at {self.node_address} did not answer {op!r} within {limit:g} s")
        if not reply.ok:
            raise node_error(reply.value)
        if with_payload:
            return reply.value, reply.payload
        return reply.value

    def request_nowait(self, op: str, args: tuple[Any, ...], payload: list[Any], on_reply: Callable[[bool, Any, list[Any]], None]) -> None:
        """Send a request whose reply is handled on the I/O thread."""
        if self.node_lost is not None:
            raise NodeUnavailableError(self.node_lost)
        req_id = next(self._req_ids)
        with self._lock:
            self._requests[req_id] = on_reply
        self._push(_TO_NODE, None, protocol.encode(protocol.REQUEST, (req_id, op, args), payload))

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

    # --- objects

    def put(self, value: Any) -> ObjectId:
        frames = serialization.dumps_value(value)
        self.check_size(frames, "zmesh.put() values")  # no other process could ever fetch it
        oid = self.new_object_id()
        with self._lock:
            entry = self.objects.new_owned_locked(oid)
            entry.frames, entry.done = frames, True
            self.objects.add_ref_locked(oid)
        return oid

    def add_ref(self, oid: ObjectId) -> None:
        with self._lock:
            self.objects.add_ref_locked(oid)

    def release(self, oid: ObjectId) -> None:
        # Called from __del__, possibly while this thread holds the lock: defer to the I/O thread.
        self._released.append(oid)

    def pin(self, oid: ObjectId) -> None:
        with self._lock:
            self.objects.pin_locked(oid)

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
                    entry, need_fetch = self.objects.borrow_locked(oid)
                    if need_fetch:
                        fetch.append((oid, owner))
                        self._fetching.setdefault(owner, set()).add(oid)
                out.append(entry)
        for oid, owner in fetch:
            self._push(_TO_PEER, owner, protocol.encode(protocol.GET_OBJECT, (oid,)))
        return out

    def get(self, refs: list[tuple[ObjectId, str]], timeout: float | None = None) -> list[Any]:
        """The values behind ``(oid, owner)`` pairs, blocking until all are there."""
        entries = self.entries_for(refs)
        ready = self.objects.wait_done(entries, len(entries), timeout)
        if ready < len(entries):
            raise objects.timeout_error(timeout, len(entries) - ready)
        return [self.value_of(e) for e in entries]

    def value_of(self, entry: objects.Entry) -> Any:
        if entry.error is not None:
            raise entry.error
        assert entry.frames is not None
        try:
            value = serialization.loads_value(entry.frames)
        except serialization.DeserializationError as exc:
            raise TaskError(f"could not deserialize the result: {exc}") from None
        if not entry.ok:
            raise value
        return value

    # --- actors

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
    ) -> Any:
        """Ask the node to create an actor; the conn queues calls until it is alive."""
        self.check_size(args_frames, f"the arguments of {spec['class_name']}()")
        with self._lock:
            conn = self._actors.get(actor_id)
            if conn is None:
                conn = self._actors[actor_id] = ActorConn(actor_id)
            conn.resolving = True
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
                self._on_actor_state(actor_id, DEAD, 1 << 30, None, str(exc))
                raise

        def on_reply(ok: bool, value: Any, payload: list[Any]) -> None:
            if not ok:
                self._on_actor_state(actor_id, DEAD, 1 << 30, None, str(node_error(value)))

        self.request_nowait("create", args, payload, on_reply)
        return None

    def submit_call(
        self, actor_id: ActorId, method: str, args_frames: list[Any], num_returns: int, group: str | None, retries: int
    ) -> list[ObjectId]:
        oids = tuple(self.new_object_id() for _ in range(num_returns))
        self.check_size(args_frames, f"the arguments of {method}()")
        slot, frames = protocol.pack(args_frames)
        call = Call(oids, (oids, method, group, slot), frames, retries)
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
                conn.inflight[oids[0]] = call
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
                self._push(_CALL, dest, call)
        elif failed is not None:
            self._fail(oids, failed)
        elif resolve:
            self._resolve(actor_id)
        return list(oids)

    def _send_now(self, dest: str, call: Call) -> bool:
        """Send ``call`` from this thread if the I/O thread is asleep and nothing is queued before it."""
        lock = self._io_lock
        if not lock.acquire(blocking=False):
            return False
        try:
            if self._outbox or dest in self._dead_addresses or self.closed:
                return False
            try:
                sock = self._peer(dest)
            except ConnectFailed:
                return False  # the I/O thread fails the call with the reason
            sockets.send(sock, [protocol.header_frame(_CALL, (call.header,)), *call.frames])
            # Sending may have consumed the signal of an answer already waiting on this socket.
            if sockets.readable(sock):
                self._touched.add(sock)
                os.eventfd_write(self._wake_fd, 1)
            return True
        finally:
            lock.release()

    def _resolve(self, actor_id: ActorId) -> None:
        def on_reply(ok: bool, value: Any, payload: list[Any]) -> None:
            if ok:
                self._on_actor_state(actor_id, *value)
            else:
                self._on_actor_state(actor_id, DEAD, 1 << 30, None, str(node_error(value)))

        self.request_nowait("resolve", (actor_id,), [], on_reply)

    def _fail(self, oids: tuple[ObjectId, ...], error: BaseException) -> None:
        self._complete([(oid, None, False, error) for oid in oids])

    def _complete(self, results: list[tuple[ObjectId, list[Any] | None, bool, BaseException | None]]) -> None:
        """Record values, wake local waiters and answer peers that asked for them meanwhile."""
        woken = []
        serve = []
        with self._lock:
            for oid, frames, ok, error in results:
                entry, waiters, callbacks = self.objects.complete_locked(oid, frames, ok, error)
                woken.append((waiters, callbacks))
                if entry is not None and entry.remote_waiters:
                    serve.append((oid, entry, entry.remote_waiters))
                    entry.remote_waiters = []
        for waiters, callbacks in woken:
            objects.wake(waiters, callbacks)
        for oid, entry, idents in serve:
            frames = self._object_frames(oid, entry)
            for identity in idents:
                self._push_or_send_router([identity, *frames])

    def _push_or_send_router(self, frames: list[Any]) -> None:
        if threading.current_thread() is self._thread:
            self._send_router(frames)
        else:
            self._push(_VIA_ROUTER, frames[0], frames[1:])

    def send_log(self, owner: str, prefix: str, stream: str, text: str) -> bool:
        """Send a printed line to ``owner``; False once it is known to be gone (nobody would read it)."""
        if owner in self._dead_addresses:
            return False
        self._push(_TO_PEER, owner, protocol.encode(protocol.LOG, (prefix, stream, text)))
        return True

    def send_result(self, identity: bytes, header: tuple[Any, ...], frames: list[Any]) -> None:
        """Queue one call's result for its caller; ``header`` is ``(oids, ok, counts, packed frames)``."""
        self._push(_RESULT, identity, (header, frames))

    # --- shutdown

    def abandon_after_fork(self) -> None:
        """In a forked child: this runtime's thread and sockets belong to the parent; never touch them."""
        self.closed = True
        self.node_lost = "this process was forked from the one that called zmesh.init(); call zmesh.init() here"

    def close(self, goodbye: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if goodbye:
            self._push(_TO_NODE, None, protocol.encode(protocol.GOODBYE, (self.client_id,)))
        self._push(_STOP, None, [])
        self._thread.join(timeout=5)
        with self._lock:
            woken = self.objects.fail_all_locked(ZmeshError("zmesh was shut down while this object was pending"))
            requests, self._requests = self._requests, {}
        for waiters, callbacks in woken:
            objects.wake(waiters, callbacks)
        for callback in requests.values():
            callback(False, ("ZmeshError", "zmesh was shut down"), [])
        os.close(self._wake_fd)
        self._ctx.destroy(linger=0)
        sockets.remove_ipc(self.address)

    # ------------------------------------------------------------------ I/O thread side

    def _watch(self, sock: sockets.Socket) -> None:
        fd = sockets.fileno(sock)
        self._by_fd[fd] = sock
        self._epoll.register(fd, select.EPOLLIN)
        self._touched.add(sock)

    def _unwatch(self, sock: sockets.Socket) -> None:
        fd = sockets.fileno(sock)
        self._by_fd.pop(fd, None)
        self._epoll.unregister(fd)
        self._touched.discard(sock)

    def _io_loop(self) -> None:
        lock = self._io_lock
        lock.acquire()
        running = True
        while running:
            try:
                running = self._serve_ready()
            except zmq.ContextTerminated:
                break
            except Exception:
                logger.exception("zmesh I/O thread: unexpected error; continuing")
            if not running:
                break
            # Announce the nap first, then look again: a submission between the two sees the flag.
            self._io_sleeping = True
            if self._outbox:
                self._io_sleeping = False
                continue
            lock.release()
            try:
                events = self._epoll.poll(1.0)
            finally:
                self._io_sleeping = False
                lock.acquire()
            for fd, _ in events:
                sock = self._by_fd.get(fd)
                if sock is not None:
                    self._touched.add(sock)
                elif fd == self._wake_fd:
                    try:
                        os.eventfd_read(self._wake_fd)
                    except BlockingIOError:
                        pass
        # Monitored sockets first, their monitors after (see _drop_peer).
        for sock in (*self._servers, self._node, *self._peers.values(), self._node_monitor):
            sock.close(linger=0)
        if self._zap is not None:
            self._zap.close()
        self._epoll.close()
        lock.release()

    def _serve_ready(self) -> bool:
        """Serve sockets that may have input and the submitted work, until neither is left. False means stop."""
        outbox = self._outbox
        while True:
            touched, self._touched = self._touched, set()
            for sock in touched:
                self._drain(sock)
            if outbox and not self._drain_outbox():
                return False
            if not self._touched and not outbox:
                break
        if self._released:
            self._drain_released()
        if self.dropped != self._dropped_reported:
            self._report_drops()
        if self._fetching and time.monotonic() - self._owners_checked >= 1.0:
            self._check_owners()
        return True

    def _drain(self, sock: sockets.Socket) -> None:
        """Receive what ``sock`` holds; a send may swallow its fd's signal, so always ask it directly."""
        if sock is self._node_monitor:
            self._on_node_monitor()
            return
        if self._zap is not None and sock is self._zap.socket:
            self._zap.handle()
            return
        if sock in self._servers:
            handler: Callable[[list[Any]], None] = functools.partial(self._on_router, sock)
        elif sock is self._node:
            handler = self._on_node
        else:
            address = self._peer_by_socket.get(sock)
            if address is None:
                return
            handler = functools.partial(self._on_peer, address)
        for _ in range(1000):
            if not sockets.readable(sock):
                return
            frames = sockets.recv(sock)
            try:
                handler(frames)
            except _MALFORMED as exc:
                self.drop(frames[0] if sock in self._servers else sock, exc)
        self._touched.add(sock)  # more left: come back after the others had their turn

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

    def _report_drops(self) -> None:
        if self.kind == "worker" and self.dropped != self._dropped_reported and self.node_lost is None:
            self._dropped_reported = self.dropped
            self._send(self._node, protocol.encode(protocol.REQUEST, (0, "dropped", (self.dropped,))))

    def _drain_outbox(self) -> bool:
        outbox = self._outbox
        batch_kind: bytes | None = None
        batch_dest: Any = None
        headers: list[tuple[Any, ...]] = []
        payload: list[Any] = []
        while outbox:
            command, dest, body = outbox.popleft()
            if command is _CALL or command is _RESULT:
                if command is not batch_kind or dest != batch_dest or len(headers) >= _MAX_BATCH:
                    self._send_batch(batch_kind, batch_dest, headers, payload)
                    batch_kind, batch_dest, headers, payload = command, dest, [], []
                if command is _CALL:
                    headers.append(body.header)
                    payload.extend(body.frames)
                else:
                    headers.append(body[0])
                    payload.extend(body[1])
                continue
            self._send_batch(batch_kind, batch_dest, headers, payload)
            batch_kind, headers, payload = None, [], []
            if command is _TO_PEER:
                if dest not in self._dead_addresses:
                    self._send_to_peer(dest, body)
            elif command is _VIA_ROUTER:
                self._send_router([dest, *body])
            elif command is _TO_NODE:
                self._send(self._node, body)
            elif command is _STOP:
                return False
        self._send_batch(batch_kind, batch_dest, headers, payload)
        return True

    def _send_to_peer(self, address: str, frames: list[Any]) -> None:
        try:
            sock = self._peer(address)
        except ConnectFailed as exc:
            logger.error("%s", exc)
            msg = protocol.decode(frames)
            if msg.type == protocol.GET_OBJECT:  # the fetch can never be answered
                with self._lock:
                    self._fetching.get(address, set()).discard(msg.header[0])
                self._fail(msg.header[:1], exc)
            return
        self._send(sock, frames)

    def _send(self, sock: sockets.Socket, frames: list[Any]) -> None:
        sockets.send(sock, frames)
        self._touched.add(sock)

    def _peer(self, address: str) -> sockets.Socket:
        """The DEALER to ``address``; ConnectFailed (naming why) when no socket can be opened."""
        sock = self._peers.get(address)
        if sock is None:
            try:
                if not sockets.room_for_peer(len(self._peers)):
                    raise OSError(errno.EMFILE, "Too many open files")
                sock = sockets.connect(self._ctx, self.security, address, self.client_id)
            except (zmq.ZMQError, OSError) as exc:
                raise ConnectFailed(
                    f"cannot open a connection to {address}: {exc} (this process may have {sockets.open_file_limit()} files open; "
                    "raise the limit with `ulimit -n`, or use fewer actors per process)"
                ) from None
            self._peers[address] = sock
            self._peer_by_socket[sock] = address
            self._watch(sock)
        return sock

    def _drop_peer(self, address: str) -> None:
        sock = self._peers.pop(address, None)
        if sock is not None:
            del self._peer_by_socket[sock]
            self._unwatch(sock)
            sock.close(linger=0)

    def _check_owners(self) -> None:
        """Ask the node whether the owners we are fetching from still live; fail what a dead one owed us.

        (Per-peer socket monitors would tell at once, but wedged sockets under load; once a
        second is enough for a fetch that can never complete.)"""
        self._owners_checked = time.monotonic()
        owners = list(self._fetching)
        if not owners or self.node_lost is not None:
            return

        def on_reply(ok: bool, value: Any, payload: list[Any]) -> None:
            if ok:
                for owner in value:
                    self._peer_gone(owner)

        self.request_nowait("gone", (owners,), [], on_reply)

    def _peer_gone(self, address: str) -> None:
        """A process we fetch from or print to has exited: fail what it owed us and free what was queued for it."""
        with self._lock:
            lost = self._fetching.pop(address, set())
            self._dead_addresses.add(address, None)
        self._drop_peer(address)
        self._complete([(oid, None, False, ObjectLostError(f"object {oid.hex()} is lost: its owner at {address} is gone")) for oid in lost])

    def _drain_released(self) -> None:
        with self._lock:
            while self._released:
                self.objects.release_locked(self._released.popleft())

    def _on_node_monitor(self) -> None:
        while True:
            try:
                event = zmq_monitor.recv_monitor_message(self._node_monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_CONNECTED:
                self._node_connected = True
            elif event["event"] == zmq.EVENT_DISCONNECTED and self._node_connected and self.node_lost is None:
                self._on_node_lost(f"the zmesh node at {self.node_address} went away")

    def _on_node_lost(self, why: str) -> None:
        """Nothing the node owed us will come: fail pending requests and every actor it hosted."""
        logger.error("%s; actors on it are lost", why)
        self.node_lost = why
        with self._lock:
            requests, self._requests = self._requests, {}
            actor_ids = [a for a, conn in self._actors.items() if conn.state is not DEAD]
        for callback in requests.values():
            callback(False, ("NodeUnavailableError", why), [])
        for actor_id in actor_ids:
            self._on_actor_state(actor_id, DEAD, 1 << 30, None, f"actor {actor_id} is lost: {why}")

    def _send_batch(self, kind: bytes | None, dest: Any, headers: list[tuple[Any, ...]], payload: list[Any]) -> None:
        if kind is None or not headers:
            return
        frames = [protocol.header_frame(kind, tuple(headers)), *payload]
        if kind is _RESULT:
            self._send_router([dest, *frames])
        elif dest not in self._dead_addresses:
            try:
                sock = self._peer(dest)
            except ConnectFailed as exc:
                self._fail_unsent(dest, headers, exc)
                return
            self._send(sock, frames)

    def _fail_unsent(self, address: str, headers: list[tuple[Any, ...]], error: BaseException) -> None:
        """Calls that could not be sent fail with the reason; they leave the in-flight table."""
        with self._lock:
            conn = self._actor_at.get(address)
            if conn is not None:
                for header in headers:
                    conn.inflight.pop(header[0][0], None)
        for header in headers:
            self._fail(header[0], error)

    def _send_router(self, frames: list[Any]) -> None:
        try:
            self._send(self._route.get(frames[0], self._router), frames)
        except zmq.ZMQError as exc:  # the peer went away: its answer has nowhere to go
            logger.debug("dropping a reply to a gone peer: %s", exc)

    def _on_router(self, via: sockets.Socket, frames: list[Any]) -> None:
        identity = frames[0]
        msg = protocol.decode(frames[1:])
        self._route[identity] = via  # only peers that speak the protocol are remembered
        if msg.type == protocol.CALL and self.on_call is not None:
            self.on_call(identity, msg)
        elif msg.type == protocol.GET_OBJECT:
            self._serve_object(identity, msg.header[0])
        elif msg.type == protocol.LOG:
            prefix, stream, text = msg.header
            self.on_log(prefix, stream, text)
        else:
            raise protocol.ProtocolError(f"unexpected {msg.type!r} message")

    def _on_node(self, frames: list[Any]) -> None:
        for tag, ok in ((protocol.WELCOME_TAG, True), (protocol.REFUSED_TAG, False)):
            fields = protocol.decode_json(frames, tag)
            if fields is not None:
                self._welcome(ok, fields if ok else fields.get("reason", "no reason given"), [])
                return
        msg = protocol.decode(frames)
        if msg.type == protocol.REPLY:
            req_id, ok, value = msg.header
            with self._lock:
                callback = self._requests.pop(req_id, None)
            if callback is not None:
                callback(ok, value, msg.payload)
        elif msg.type == protocol.ACTOR_STATE:
            self._on_actor_state(*msg.header)
        elif msg.type == protocol.PEER_GONE:
            self._peer_gone(str(msg.header[0]))

    def _on_peer(self, address: str, frames: list[Any]) -> None:
        msg = protocol.decode(frames)
        if msg.type == protocol.RESULT:
            self._on_result(address, msg)
        elif msg.type == protocol.OBJECT:
            self._on_object(address, msg)
        elif msg.type == protocol.LOG:  # a line printed during one of our calls, ahead of its result
            prefix, stream, text = msg.header
            self.on_log(prefix, stream, text)

    def _on_result(self, address: str, msg: protocol.Message) -> None:
        results: list[tuple[ObjectId, list[Any] | None, bool, BaseException | None]] = []
        payload = msg.payload
        pos = 0
        with self._lock:
            conn = self._actor_at.get(address)
            for oids, ok, counts, slot in msg.header:
                frames, pos = protocol.unpack(slot, payload, pos)
                if conn is None or conn.inflight.pop(oids[0], None) is None:
                    continue  # a late answer from a worker already declared dead
                start = 0
                for oid, count in zip(oids, counts, strict=True):
                    results.append((oid, frames[start : start + count], ok, None))
                    start += count
        self._complete(results)

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

    def _on_object(self, address: str, msg: protocol.Message) -> None:
        oid, ok = msg.header
        with self._lock:
            self._fetching.get(address, set()).discard(oid)
        self._complete([(oid, list(msg.payload), ok, None)])

    def _on_actor_state(self, actor_id: ActorId, state: str, incarnation: int, address: str | None, error: str | None) -> None:
        """Apply the node's news about an actor: flush, fail or retry calls accordingly."""
        on_io_thread = threading.current_thread() is self._thread
        with self._lock:
            conn = self._actors.get(actor_id)
            step = apply_state(conn, state, incarnation, address, error) if conn is not None else None
            if step is None:
                return
            if step.gone is not None:
                self._dead_addresses.add(step.gone, None)
                self._actor_at.pop(step.gone, None)
            if conn is not None and conn.state is ALIVE and conn.address is not None:
                self._actor_at[conn.address] = conn
            elif conn is not None and conn.state is DEAD and conn.error is not None:
                # Nothing is queued or in flight any more: keep only the error, for late calls.
                del self._actors[actor_id]
                self._dead_actors.add(actor_id, conn.error)
            if step.send and address is not None and not on_io_thread:
                # Queued under the lock, so calls submitted later cannot overtake these.
                for call in step.send:
                    self._push(_CALL, address, call)
        if step.send and address is not None and on_io_thread:
            # The I/O thread holds _io_lock: later calls can only queue behind these, never overtake them.
            for i in range(0, len(step.send), _MAX_BATCH):
                chunk = step.send[i : i + _MAX_BATCH]
                self._send_batch(_CALL, address, [c.header for c in chunk], [f for c in chunk for f in c.frames])
        for oids, err in step.fail:
            self._fail(oids, err)
        if step.gone is not None and threading.current_thread() is self._thread:
            self._drop_peer(step.gone)


def _print_log(prefix: str, stream: str, text: str) -> None:
    out = sys.stderr if stream == "stderr" else sys.stdout
    try:
        out.write(f"({prefix}) {text}\n" if not text.endswith("\n") else f"({prefix}) {text}")
        out.flush()
    except (OSError, ValueError):
        pass
