"""The I/O thread's sending side: drains what user threads queued, batches calls and results, routes replies.

User threads hand work over with ``IoLoop.push`` as ``(command, destination, body)``
tuples tagged by the constants below; only the I/O thread (or whoever holds the I/O
lock) runs the methods here, since they touch sockets. Sends that cannot happen (no
socket to the peer) fail what they carried through hooks the facade wires at start.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from zmesh.runtime import calls
from zmesh.runtime.actors import Call, Recent
from zmesh.runtime.io_loop import IoLoop
from zmesh.runtime.node_client import TO_NODE, NodeClient
from zmesh.runtime.peers import ConnectFailed, Peers
from zmesh.transport import protocol, sockets

logger = logging.getLogger(__name__)

# What the I/O thread is handed (first item of each outbox entry).
TO_PEER = b"P"
VIA_ROUTER = b"R"
RUN = b"F"
STOP = b"X"
CALL = calls.CALL
RESULT = calls.RESULT
_REMEMBER_ROUTES = 100_000

# (address, call entries, why) and (address, the message, why): what could not be sent, to fail.
UnsentCalls = Callable[[str, list[tuple[Any, ...]], BaseException], None]
UnsentMessage = Callable[[str, protocol.Message, BaseException], None]


def _unwired(*args: Any) -> None:
    raise AssertionError("the runtime did not wire the outbox's failure hooks")


class Outbox:
    """Sends on the I/O thread: batches of calls and results, messages to peers, replies on our ROUTERs."""

    def __init__(self, loop: IoLoop, peers: Peers, node: NodeClient, servers: list[sockets.Socket]) -> None:
        self._loop = loop
        self._peers = peers
        self._node = node
        self._servers = servers
        self._batcher = calls.Batcher(self._send_batch)
        # Which of our ROUTERs each peer reached us on: its answers must leave by the same one. Bounded: a
        # long-lived process hears from many short-lived workers; the most recent 100,000 are remembered.
        self.route: Recent[bytes, sockets.Socket] = Recent(_REMEMBER_ROUTES)
        # Set by the facade once the components that own what was sent exist.
        self.on_unsent_calls: UnsentCalls = _unwired
        self.on_unsent_message: UnsentMessage = _unwired

    def process(self, outbox: deque[Any]) -> bool:
        """Send what user threads queued, in order; consecutive calls or results for one peer as one batch."""
        batcher = self._batcher
        try:
            while outbox:
                command, dest, body = outbox.popleft()
                if command is CALL:
                    batcher.add(CALL, dest, body.header, body.frames, body.target)
                    continue
                if command is RESULT:
                    batcher.add(RESULT, dest, body[0], body[1])
                    continue
                batcher.flush()
                if command is TO_PEER:
                    if dest not in self._peers.gone:
                        self.send_to_peer(dest, body)
                elif command is VIA_ROUTER:
                    self.send_router([dest, *body])
                elif command is TO_NODE:
                    self._node.send_now(body)
                elif command is RUN:
                    body()
                elif command is STOP:
                    return False
        finally:
            batcher.flush()
        return True

    def send_calls(self, address: str, queued: list[Call]) -> None:
        """Send ``queued`` to ``address`` now, in order (I/O thread only)."""
        for call in queued:
            self._batcher.add(CALL, address, call.header, call.frames, call.target)
        self._batcher.flush()

    def send_batch(self, kind: bytes, address: str, target: calls.CallTarget, items: list[tuple[tuple[Any, ...], list[Any]]]) -> None:
        """Send ``items`` (entries and their frames) to ``address`` now, as batches for ``target`` (I/O thread only)."""
        for entry, frames in items:
            self._batcher.add(kind, address, entry, frames, target)
        self._batcher.flush()

    def _send_batch(
        self, kind: bytes, dest: Any, target: calls.CallTarget | None, entries: list[tuple[Any, ...]], payload: list[Any]
    ) -> None:
        frames = calls.message(kind, entries, payload, target)
        if kind is RESULT:
            self.send_router([dest, *frames])
            return
        if dest in self._peers.gone:
            return
        try:
            sock = self._peers.get(dest)
        except ConnectFailed as exc:
            self.on_unsent_calls(dest, entries, exc)
            return
        sockets.send(sock, frames)
        self._loop.touched(sock)

    def send_to_peer(self, address: str, frames: list[Any]) -> None:
        try:
            sock = self._peers.get(address)
        except ConnectFailed as exc:
            logger.error("%s", exc)
            self.on_unsent_message(address, protocol.decode(frames), exc)
            return
        sockets.send(sock, frames)
        self._loop.touched(sock)

    def send_router(self, frames: list[Any]) -> None:
        sock = self.route.get(frames[0]) or self._servers[0]
        try:
            sockets.send(sock, frames)
        except zmq.ZMQError as exc:  # the peer went away: its answer has nowhere to go
            logger.debug("dropping a reply to a gone peer: %s", exc)
            return
        self._loop.touched(sock)

    def send_or_push_router(self, frames: list[Any]) -> None:
        if self._loop.on_io_thread:
            self.send_router(frames)
        else:
            self._loop.push((VIA_ROUTER, frames[0], frames[1:]))
