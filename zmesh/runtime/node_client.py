"""Requests to this process's node, their replies, the node's news, and noticing the node is gone."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils import monitor as zmq_monitor

from zmesh.exceptions import (
    ActorAlreadyExistsError,
    ActorDiedError,
    NodeUnavailableError,
    ObjectLostError,
    ObjectStoreFullError,
    ZmeshError,
)
from zmesh.runtime.io_loop import IoLoop
from zmesh.transport import protocol, sockets
from zmesh.transport.security import HANDSHAKE_FAILED, Security, handshake_refusal

logger = logging.getLogger(__name__)

OnReply = Callable[[bool, Any, list[Any]], None]

_NODE_ERRORS: dict[str, type[Exception]] = {
    "NodeUnavailableError": NodeUnavailableError,
    "ConnectionError": NodeUnavailableError,
    "ActorAlreadyExistsError": ActorAlreadyExistsError,
    "ActorDiedError": ActorDiedError,
    "ObjectLostError": ObjectLostError,
    "ObjectStoreFullError": ObjectStoreFullError,
    "ValueError": ValueError,
    "TypeError": TypeError,
}

# The item pushed to the I/O thread for a message to the node.
TO_NODE = b"N"

# Handshakes the node ends, one after another, before we believe it will never let us in: a single one may
# be a node going down; ZeroMQ retries every 50 ms, so two cost about that.
_REFUSALS_TO_GIVE_UP = 2


def node_error(value: Any) -> Exception:
    """The exception for a node's error reply ``(kind, message)``."""
    try:
        kind, message = value
    except (TypeError, ValueError):
        return ZmeshError(f"malformed error from node: {value!r}")
    return _NODE_ERRORS.get(kind, ZmeshError)(message)


class Reply:
    """A reply a user thread waits for."""

    __slots__ = ("event", "ok", "payload", "value")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = False
        self.value: Any = None
        self.payload: list[Any] = []

    def __call__(self, ok: bool, value: Any, payload: list[Any]) -> None:
        self.ok, self.value, self.payload = ok, value, payload
        self.event.set()


class NodeClient:
    """The DEALER to the node and everything that travels on it.

    ``on_news`` receives the node's unrequested messages (actor states, gone peers);
    ``on_lost`` runs once when the node is found gone, after every pending request failed.
    """

    def __init__(
        self,
        ctx: sockets.Context,
        security: Security,
        address: str,
        identity: bytes,
        loop: IoLoop,
        on_news: Callable[[protocol.Message], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self.address = address
        self.timeout = 30.0
        self.lost: str | None = None
        self._loop = loop
        self._on_news = on_news
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._requests: dict[int, OnReply] = {}
        self._ids = itertools.count(1)
        self._welcome = Reply()
        self._security = security
        # Whether a handshake with the node ever succeeded: only then can it go away.
        self._connected = False
        self._refusals = 0
        self._refused: str | None = None
        # The kernel tells us at once when a same-host node dies, and the node's handshake tells us at once
        # that it will not let us in; we learn both from the monitor.
        events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED
        if address.startswith("ipc://"):
            # A worker reaches its node through the node's door in the private run directory: no CURVE there.
            security = Security(None, security.max_message_bytes)
        self.socket, monitor = sockets.dealer(ctx, security, address, identity, monitor=events)
        assert monitor is not None
        self._monitor = monitor
        loop.watch(self.socket, self._on_message)
        loop.watch_ready(monitor, self._on_monitor)
        loop.on_close(self._close)

    def _close(self) -> None:
        # The socket first, its monitor after: the monitor must outlive what it watches.
        for sock in (self.socket, self._monitor):
            self._loop.unwatch(sock)
            sock.close(linger=0)

    # --- any thread

    def hello(self, fields: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Introduce this process; both sides check they can understand each other. Returns the node's welcome."""
        self._welcome = Reply()
        if self._refused is not None:  # found before this Reply existed (the I/O thread sets it first)
            self._welcome(False, self._refused, [])
        self._loop.push((TO_NODE, None, protocol.encode_json(protocol.HELLO_TAG, fields)))
        if not self._welcome.event.wait(timeout):
            if self.lost is not None:
                raise NodeUnavailableError(self.lost)
            raise NodeUnavailableError(
                f"no zmesh node answered at {self.address} within {timeout:g} s (start one with `zmesh node`, or call "
                "zmesh.init() with no address for a local one; a node of another cluster key cannot answer)"
            )
        kind = fields.get("kind")
        if self.lost is not None:
            raise NodeUnavailableError(self.lost)
        if not self._welcome.ok:
            logger.error("the zmesh node at %s refused this %s: %s", self.address, kind, self._welcome.value)
            raise NodeUnavailableError(f"the zmesh node at {self.address} refused this {kind}: {self._welcome.value}")
        info: dict[str, Any] = self._welcome.value
        problem = protocol.incompatibility(info)
        if problem is not None:
            logger.error("refusing the zmesh node at %s: %s", self.address, problem)
            raise NodeUnavailableError(f"cannot use the zmesh node at {self.address}: {problem}")
        return info

    def request(
        self,
        op: str,
        args: tuple[Any, ...] = (),
        payload: list[Any] | None = None,
        timeout: float | None = None,
        with_payload: bool = False,
    ) -> Any:
        """Ask the node something and wait for its answer; NodeUnavailableError after ``timeout``."""
        reply = Reply()
        req_id = self.request_nowait(op, args, payload or [], reply)
        limit = self.timeout if timeout is None else timeout
        if not reply.event.wait(limit):
            with self._lock:
                self._requests.pop(req_id, None)
            raise NodeUnavailableError(f"the zmesh node at {self.address} did not answer {op!r} within {limit:g} s")
        if not reply.ok:
            raise node_error(reply.value)
        if with_payload:
            return reply.value, reply.payload
        return reply.value

    def request_nowait(self, op: str, args: tuple[Any, ...], payload: list[Any], on_reply: OnReply) -> int:
        """Send a request whose reply ``on_reply`` handles on the I/O thread; returns its id."""
        if self.lost is not None:
            raise NodeUnavailableError(self.lost)
        req_id = next(self._ids)
        with self._lock:
            self._requests[req_id] = on_reply
        self.send(protocol.encode(protocol.REQUEST, (req_id, op, args), payload))
        return req_id

    def send(self, frames: list[Any]) -> None:
        """Send ``frames`` to the node, in order with everything else this process sends."""
        if self._loop.on_io_thread:
            self.send_now(frames)
        else:
            self._loop.push((TO_NODE, None, frames))

    def fail_pending(self, kind: str, why: str) -> None:
        with self._lock:
            requests, self._requests = self._requests, {}
        for callback in requests.values():
            callback(False, (kind, why), [])

    # --- the I/O thread

    def send_now(self, frames: list[Any]) -> None:
        try:
            # Never blocks while ZeroMQ keeps a queue to the node (unbounded, even before it connects): only
            # when it gave the node up for good, after a protocol error in the handshake. Blocking then
            # would hang this thread for ever.
            sockets.send(self.socket, frames, zmq.NOBLOCK)
        except zmq.Again:
            if self._connected and self.lost is None:
                self._lose(f"the zmesh node at {self.address} broke the connection (a protocol error)")
            return  # not connected yet: the monitor says why, and hello() fails with it
        self._loop.touched(self.socket)

    def _on_message(self, frames: list[Any]) -> None:
        for tag, ok in ((protocol.WELCOME_TAG, True), (protocol.REFUSED_TAG, False)):
            fields = protocol.decode_json(frames, tag)
            if fields is not None:
                self._welcome(ok, fields if ok else fields.get("reason", "no reason given"), [])
                return
        msg = protocol.decode(frames)
        if msg.type == protocol.REPLY:
            if len(msg.header) != 3:
                raise protocol.ProtocolError("a reply is not (id, ok, value)")
            req_id, ok, value = msg.header
            with self._lock:
                callback = self._requests.pop(req_id, None)
            if callback is not None:
                callback(ok, value, msg.payload)
        else:
            self._on_news(msg)

    def _on_monitor(self) -> None:
        while True:
            try:
                event = zmq_monitor.recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected = True
                self._refusals = 0
            elif kind & HANDSHAKE_FAILED and not self._connected and self._refused is None:
                self._refusals += 1
                if self._refusals >= _REFUSALS_TO_GIVE_UP or kind != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                    self._refused = handshake_refusal(kind, self._security.key)
                    self._welcome(False, self._refused, [])
            elif kind == zmq.EVENT_DISCONNECTED and self._connected and self.lost is None:
                self._lose(f"the zmesh node at {self.address} went away")

    def _lose(self, why: str) -> None:
        """Nothing the node owed us will come."""
        logger.error("%s; actors on it are lost", why)
        self.lost = why
        if not self._welcome.event.is_set():  # a hello still waiting has its answer: none will come
            self._welcome(False, why, [])
        self.fail_pending("NodeUnavailableError", why)
        self._on_lost(why)
