"""The per-process runtime: an I/O thread that owns every socket, and the calls, objects
and actor connections that user threads submit through it.

User threads never touch a shared socket: they hand frames to the I/O thread over a
thread-local inproc PUSH, which keeps each thread's submissions in order.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from zmesh.exceptions import (
    ActorAlreadyExistsError,
    ActorDiedError,
    ActorUnavailableError,
    NodeUnavailableError,
    ObjectLostError,
    TaskError,
    ZmeshError,
)
from zmesh.runtime import objects
from zmesh.runtime.actors import ALIVE, DEAD, PENDING, ActorConn, Call
from zmesh.transport import protocol, serialization, sockets
from zmesh.transport.ids import ActorId, ClientId, ObjectId, new_client_id

logger = logging.getLogger(__name__)

# Commands from user threads to the I/O thread (first frame on the inproc socket).
_TO_PEER = b"P"
_TO_NODE = b"N"
_VIA_ROUTER = b"R"
_WAKE = b"W"
_STOP = b"X"

_NODE_ERRORS: dict[str, type[Exception]] = {
    "ActorAlreadyExistsError": ActorAlreadyExistsError,
    "ActorDiedError": ActorDiedError,
    "ValueError": ValueError,
    "TypeError": TypeError,
}

CallHandler = Callable[[bytes, protocol.Message], None]


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
    ) -> None:
        self.client_id: ClientId = new_client_id()
        self.kind = kind
        self.namespace = namespace
        self.node_address = node_address
        self.request_timeout = 30.0
        self._ctx = zmq.Context()
        self._lock = threading.Lock()
        self.objects = objects.ObjectStore(self._lock)
        self._actors: dict[ActorId, ActorConn] = {}
        self._actor_at: dict[str, ActorConn] = {}
        self._dead_addresses: set[str] = set()
        self._requests: dict[int, Callable[[bool, Any, list[Any]], None]] = {}
        self._req_ids = itertools.count(1)
        self._oid_counter = itertools.count(1)
        self._released: deque[ObjectId] = deque()
        self._local = threading.local()
        self._push_sockets: list[sockets.Socket] = []
        self._sent_classes: set[str] = set()
        self.closed = False
        self.on_call: CallHandler | None = None  # set by a worker to receive CALLs
        self.on_init: Callable[[protocol.Message], None] | None = None
        self.on_log: Callable[[str, str, str], None] = _print_log
        self._inproc = f"inproc://zmesh-io-{self.client_id.hex()}"
        self._pull = sockets.pull(self._ctx, self._inproc)
        self._router, self.address = sockets.router(self._ctx)
        self._node = sockets.dealer(self._ctx, node_address, self.client_id)
        self._peers: dict[str, sockets.Socket] = {}
        self._poller = zmq.Poller()
        for sock in (self._pull, self._router, self._node):
            self._poller.register(sock, zmq.POLLIN)
        self._thread = threading.Thread(target=self._io_loop, name="zmesh-io", daemon=True)
        self._thread.start()
        try:
            self.node_info: dict[str, Any] = self._hello(token, connect_timeout)
        except BaseException:
            self.close(goodbye=False)
            raise

    # ------------------------------------------------------------------ user-thread side

    def _push(self, frames: list[Any]) -> None:
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = sockets.push(self._ctx, self._inproc)
            self._local.push = sock
            with self._lock:
                self._push_sockets.append(sock)
        sock.send_multipart(frames, copy=False)

    def _hello(self, token: str | None, timeout: float) -> dict[str, Any]:
        reply = _Reply()
        req_id = next(self._req_ids)
        with self._lock:
            self._requests[req_id] = reply
        header = (req_id, protocol.PROTOCOL_VERSION, self.client_id, self.kind, os.getpid(), self.address, token)
        self._push([_TO_NODE, *protocol.encode(protocol.HELLO, header)])
        if not reply.event.wait(timeout):
            with self._lock:
                self._requests.pop(req_id, None)
            raise NodeUnavailableError(
                f"no zmesh node answered at {self.node_address} within {timeout:g} s "
                "(start one with `zmesh node`, or call zmesh.init() with no address for a local one)"
            )
        if not reply.ok:
            raise node_error(reply.value)
        info: dict[str, Any] = reply.value
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
        reply = _Reply()
        req_id = next(self._req_ids)
        with self._lock:
            self._requests[req_id] = reply
        self._push([_TO_NODE, *protocol.encode(protocol.REQUEST, (req_id, op, args), payload or [])])
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
        req_id = next(self._req_ids)
        with self._lock:
            self._requests[req_id] = on_reply
        self._push([_TO_NODE, *protocol.encode(protocol.REQUEST, (req_id, op, args), payload)])

    def new_object_id(self) -> ObjectId:
        return ObjectId(self.client_id + next(self._oid_counter).to_bytes(8, "big"))

    # --- objects

    def put(self, value: Any) -> ObjectId:
        frames = serialization.dumps_value(value)
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
                out.append(entry)
        for oid, owner in fetch:
            self._push([_TO_PEER, owner.encode(), *protocol.encode(protocol.GET_OBJECT, (oid,))])
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
        frames = protocol.encode(protocol.CALL, (oids, method, group), args_frames)
        call = Call(oids, frames, retries)
        dest = None
        resolve = False
        failed: BaseException | None = None
        with self._lock:
            for oid in oids:
                self.objects.new_owned_locked(oid)
                self.objects.add_ref_locked(oid)
            conn = self._actors.get(actor_id)
            if conn is None:
                conn = self._actors[actor_id] = ActorConn(actor_id)
            if conn.state is ALIVE and not conn.queue:
                conn.inflight[oids[0]] = call
                dest = conn.address
            elif conn.state is DEAD:
                failed = conn.error
            else:
                conn.queue.append(call)
                if not conn.resolving:
                    conn.resolving = resolve = True
        if dest is not None:
            self._push([_TO_PEER, dest.encode(), *frames])
        elif failed is not None:
            self._fail(oids, failed)
        elif resolve:
            self._resolve(actor_id)
        return list(oids)

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
            self._push([_VIA_ROUTER, *frames])

    def actor_state(self, actor_id: ActorId) -> str:
        with self._lock:
            conn = self._actors.get(actor_id)
            return conn.state if conn is not None else PENDING

    def send_log(self, owner: str, prefix: str, stream: str, text: str) -> None:
        self._push([_TO_PEER, owner.encode(), *protocol.encode(protocol.LOG, (prefix, stream, text))])

    def reply_via_router(self, identity: bytes, frames: list[Any]) -> None:
        self._push([_VIA_ROUTER, identity, *frames])

    def send_to_node(self, frames: list[Any]) -> None:
        self._push([_TO_NODE, *frames])

    # --- shutdown

    def close(self, goodbye: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if goodbye:
                self._push([_TO_NODE, *protocol.encode(protocol.GOODBYE, (self.client_id,))])
            self._push([_STOP])
        except zmq.ZMQError:
            pass
        self._thread.join(timeout=5)
        with self._lock:
            woken = self.objects.fail_all_locked(ZmeshError("zmesh was shut down while this object was pending"))
            requests, self._requests = self._requests, {}
            push_sockets, self._push_sockets = self._push_sockets, []
        for waiters, callbacks in woken:
            objects.wake(waiters, callbacks)
        for callback in requests.values():
            callback(False, ("ZmeshError", "zmesh was shut down"), [])
        for sock in push_sockets:
            sock.close(linger=0)
        self._ctx.destroy(linger=0)

    # ------------------------------------------------------------------ I/O thread side

    def _io_loop(self) -> None:
        handlers: dict[sockets.Socket, Callable[[list[Any]], bool]] = {
            self._pull: self._on_command,
            self._router: self._on_router,
            self._node: self._on_node,
        }
        running = True
        while running:
            try:
                events = self._poller.poll(1000)
                for sock, _ in events:
                    handler = handlers.get(sock)
                    if handler is None:
                        peer = self._peer_address(sock)
                        if peer is None:
                            continue

                        def handler(frames: list[Any], peer: str = peer) -> bool:
                            return self._on_peer(peer, frames)

                    # Drain each ready socket so one poll serves a burst of messages.
                    for _ in range(1000):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if not handler(frames):
                            running = False
                            break
                if self._released:
                    self._drain_released()
            except zmq.ContextTerminated:
                return
            except Exception:
                logger.exception("zmesh I/O thread: unexpected error; continuing")
        for sock in (self._pull, self._router, self._node, *self._peers.values()):
            sock.close(linger=0)

    def _peer_address(self, sock: sockets.Socket) -> str | None:
        for address, peer in self._peers.items():
            if peer is sock:
                return address
        return None

    def _peer(self, address: str) -> sockets.Socket:
        sock = self._peers.get(address)
        if sock is None:
            sock = sockets.dealer(self._ctx, address, self.client_id)
            self._peers[address] = sock
            self._poller.register(sock, zmq.POLLIN)
        return sock

    def _drop_peer(self, address: str) -> None:
        sock = self._peers.pop(address, None)
        if sock is not None:
            self._poller.unregister(sock)
            sock.close(linger=0)

    def _drain_released(self) -> None:
        with self._lock:
            while self._released:
                self.objects.release_locked(self._released.popleft())

    def _on_command(self, frames: list[Any]) -> bool:
        cmd = frames[0]
        if cmd == _TO_PEER:
            address = frames[1].decode()
            if address not in self._dead_addresses:
                self._peer(address).send_multipart(frames[2:], copy=False)
        elif cmd == _TO_NODE:
            self._node.send_multipart(frames[1:], copy=False)
        elif cmd == _VIA_ROUTER:
            self._send_router(frames[1:])
        elif cmd == _STOP:
            return False
        return True

    def _send_router(self, frames: list[Any]) -> None:
        try:
            self._router.send_multipart(frames, copy=False)
        except zmq.ZMQError as exc:  # the peer went away: its answer has nowhere to go
            logger.debug("dropping a reply to a gone peer: %s", exc)

    def _on_router(self, frames: list[Any]) -> bool:
        identity = frames[0]
        try:
            msg = protocol.decode(frames[1:])
        except (protocol.ProtocolError, serialization.DeserializationError) as exc:
            logger.warning("dropping a malformed message from a peer: %s", exc)
            return True
        if msg.type == protocol.CALL and self.on_call is not None:
            self.on_call(identity, msg)
        elif msg.type == protocol.GET_OBJECT:
            self._serve_object(identity, msg.header[0])
        elif msg.type == protocol.LOG:
            prefix, stream, text = msg.header
            self.on_log(prefix, stream, text)
        else:
            logger.warning("dropping an unexpected %r message from a peer", msg.type)
        return True

    def _on_node(self, frames: list[Any]) -> bool:
        try:
            msg = protocol.decode(frames)
        except (protocol.ProtocolError, serialization.DeserializationError) as exc:
            logger.warning("dropping a malformed message from the node: %s", exc)
            return True
        if msg.type == protocol.REPLY:
            req_id, ok, value = msg.header
            with self._lock:
                callback = self._requests.pop(req_id, None)
            if callback is not None:
                callback(ok, value, msg.payload)
        elif msg.type == protocol.ACTOR_STATE:
            self._on_actor_state(*msg.header)
        elif msg.type == protocol.INIT and self.on_init is not None:
            self.on_init(msg)
        return True

    def _on_peer(self, address: str, frames: list[Any]) -> bool:
        try:
            msg = protocol.decode(frames)
        except (protocol.ProtocolError, serialization.DeserializationError) as exc:
            logger.warning("dropping a malformed message from %s: %s", address, exc)
            return True
        if msg.type == protocol.RESULT:
            self._on_result(address, msg)
        elif msg.type == protocol.OBJECT:
            self._on_object(msg)
        return True

    def _on_result(self, address: str, msg: protocol.Message) -> None:
        oids, ok, counts = msg.header
        with self._lock:
            conn = self._actor_at.get(address)
            if conn is None or conn.inflight.pop(oids[0], None) is None:
                return  # a late answer from a worker already declared dead
        results: list[tuple[ObjectId, list[Any] | None, bool, BaseException | None]] = []
        pos = 0
        for oid, count in zip(oids, counts, strict=True):
            results.append((oid, msg.payload[pos : pos + count], ok, None))
            pos += count
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

    def _on_object(self, msg: protocol.Message) -> None:
        oid, ok = msg.header
        self._complete([(oid, list(msg.payload), ok, None)])

    def _on_actor_state(self, actor_id: ActorId, state: str, incarnation: int, address: str | None, error: str | None) -> None:
        """Apply the node's news about an actor: flush, fail or retry calls accordingly."""
        to_send: list[Call] = []
        to_fail: list[tuple[tuple[ObjectId, ...], BaseException]] = []
        with self._lock:
            conn = self._actors.get(actor_id)
            if conn is None or conn.state is DEAD or incarnation < conn.incarnation:
                return
            old = conn.address
            if old is not None and (state != ALIVE or address != old):
                # The worker at ``old`` is gone: what it had in flight is lost.
                self._dead_addresses.add(old)
                self._actor_at.pop(old, None)
                lost_error: BaseException
                if state == DEAD:
                    lost_error = ActorDiedError(error or f"actor {actor_id} is dead")
                else:
                    lost_error = ActorUnavailableError(
                        f"actor {actor_id} became unavailable while this call was in flight: its worker died and is restarting"
                    )
                retry = []
                for c in conn.take_inflight():
                    if c.retries_left == 0 or state == DEAD:
                        to_fail.append((c.oids, lost_error))
                    else:
                        c.retries_left -= 1 if c.retries_left > 0 else 0
                        retry.append(c)
                conn.queue.extendleft(reversed(retry))
                conn.address = None
            conn.incarnation = max(conn.incarnation, incarnation)
            if state == ALIVE and address is not None:
                conn.state = ALIVE
                conn.address = address
                self._actor_at[address] = conn
                while conn.queue:
                    call = conn.queue.popleft()
                    conn.inflight[call.oids[0]] = call
                    to_send.append(call)
            elif state == DEAD:
                conn.state = DEAD
                conn.error = ActorDiedError(error or f"actor {actor_id} is dead")
                to_fail.extend((c.oids, conn.error) for c in conn.queue)
                to_fail.extend((c.oids, conn.error) for c in conn.take_inflight())
                conn.queue.clear()
            else:
                conn.state = PENDING
            if to_send and address is not None:
                # Send while holding the lock, so calls submitted later cannot overtake these.
                if threading.current_thread() is self._thread:
                    sock = self._peer(address)
                    for call in to_send:
                        sock.send_multipart(call.frames, copy=False)
                else:
                    for call in to_send:
                        self._push([_TO_PEER, address.encode(), *call.frames])
        for oids, err in to_fail:
            self._fail(oids, err)
        if old is not None and old in self._dead_addresses and threading.current_thread() is self._thread:
            self._drop_peer(old)


def _print_log(prefix: str, stream: str, text: str) -> None:
    out = sys.stderr if stream == "stderr" else sys.stdout
    try:
        out.write(f"({prefix}) {text}\n" if not text.endswith("\n") else f"({prefix}) {text}")
        out.flush()
    except (OSError, ValueError):
        pass
