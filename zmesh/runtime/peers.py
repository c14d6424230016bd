"""The DEALERs to the processes this one talks to, one per address, and the addresses known gone."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import zmq

from zmesh.exceptions import ZmeshError
from zmesh.runtime.actors import Recent
from zmesh.runtime.io_loop import IoLoop
from zmesh.transport import sockets
from zmesh.transport.security import Security

# Gone peers remembered, so late messages to them are dropped instead of queued for ever.
_REMEMBER_GONE = 10_000


class ConnectFailed(ZmeshError):
    """No socket to a peer could be opened (out of file descriptors, most likely)."""


class Peers:
    """Outbound connections, used by whoever holds the I/O lock."""

    def __init__(
        self,
        ctx: sockets.Context,
        security: Security,
        identity: bytes,
        loop: IoLoop,
        on_message: Callable[[str, list[Any]], None],
    ) -> None:
        self._ctx = ctx
        self._security = security
        self._identity = identity
        self._loop = loop
        self._on_message = on_message
        self._sockets: dict[str, sockets.Socket] = {}
        self.gone: Recent[str, None] = Recent(_REMEMBER_GONE)
        loop.on_close(self.close_all)

    def get(self, address: str) -> sockets.Socket:
        """The DEALER to ``address``; ConnectFailed (naming why) when no socket can be opened."""
        sock = self._sockets.get(address)
        if sock is not None:
            return sock
        try:
            if not sockets.room_for_peer(len(self._sockets)):
                raise OSError(errno.EMFILE, "Too many open files")
            sock = sockets.connect(self._ctx, self._security, address, self._identity)
        except (zmq.ZMQError, OSError) as exc:
            raise ConnectFailed(
                f"cannot open a connection to {address}: {exc} (this process may have {sockets.open_file_limit()} files open; "
                "raise the limit with `ulimit -n`, or use fewer actors per process)"
            ) from None
        self._sockets[address] = sock
        self._loop.watch(sock, lambda frames: self._on_message(address, frames))
        return sock

    def drop(self, address: str) -> None:
        """Close the connection to ``address``; what was queued on it is discarded."""
        sock = self._sockets.pop(address, None)
        if sock is not None:
            self._loop.unwatch(sock)
            sock.close(linger=0)

    def mark_gone(self, address: str) -> None:
        self.gone.add(address, None)

    def close_all(self) -> None:
        for address in list(self._sockets):
            self.drop(address)

    def __len__(self) -> int:
        return len(self._sockets)
