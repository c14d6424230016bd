"""Inbound dispatch: per channel, a table from message type to the component's handler for it.

Three channels reach a runtime: its ROUTERs (peers that connected to us: calls, fetches,
borrows), its DEALERs (answers from the peers we connected to) and the node's news. Each
component registers the types it serves; a type nobody registered, or a message whose
header has the wrong shape, raises ``protocol.ProtocolError``, which the I/O loop counts
as a malformed message and drops (``Inbound.drop``). Every handler runs on the I/O thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from zmesh.transport import protocol

logger = logging.getLogger(__name__)

S = TypeVar("S")

# Whether a message's header has the shape its handler expects; checked before the handler runs.
Shape = Callable[[protocol.Message], bool]


def header_len(n: int) -> Shape:
    """The shape of a message whose header has ``n`` items."""
    return lambda msg: len(msg.header) == n


class Table(Generic[S]):
    """The handlers of one channel; ``S`` is what names the sender there (an identity, an address, or nothing)."""

    def __init__(self, where: str) -> None:
        self._where = where  # how the error names the channel: "", " from the node", " from a peer"
        self._handlers: dict[bytes, tuple[Callable[[S, protocol.Message], None], Shape | None]] = {}

    def register(self, kind: bytes, handler: Callable[[S, protocol.Message], None], shape: Shape | None = None) -> None:
        if kind in self._handlers:
            raise ValueError(f"{kind!r} messages have a handler already")
        self._handlers[kind] = (handler, shape)

    def dispatch(self, sender: S, msg: protocol.Message) -> None:
        found = self._handlers.get(msg.type)
        if found is None or (found[1] is not None and not found[1](msg)):
            raise protocol.ProtocolError(f"unexpected {msg.type!r} message{self._where}")
        found[0](sender, msg)


class Inbound:
    """The three channels' tables, and the count of messages none of them could take."""

    def __init__(self) -> None:
        self.router: Table[bytes] = Table("")  # sender: the peer's identity on our ROUTER
        self.peer: Table[str] = Table(" from a peer")  # sender: the address of the peer we connected to
        self.news: Table[None] = Table(" from the node")
        self.dropped = 0  # malformed messages received, reported to the node by workers
        self._drop_logged: dict[Any, float] = {}

    def drop(self, peer: Any, reason: BaseException, now: float) -> None:
        """Count a bad message and log it at most once a minute per peer."""
        self.dropped += 1
        key = peer if isinstance(peer, bytes) else id(peer)
        if now - self._drop_logged.get(key, -1e9) >= 60:
            if len(self._drop_logged) > 10_000:
                self._drop_logged.clear()  # many distinct peers sending garbage must not grow memory
            self._drop_logged[key] = now
            logger.warning("dropped a malformed message from a peer: %s", reason)
