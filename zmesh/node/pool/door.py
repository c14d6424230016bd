"""The node's door for its own workers: a ROUTER on an IPC socket in the user's private run directory.

Workers talk to their node over this door instead of the node's TCP port: no
CURVE handshake (two key exchanges and a ZAP round trip per worker, a large
share of what starting one costs) and no cipher on their requests. It is as
safe as the IPC sockets every zmesh process already serves its local peers on
(``transport.sockets.servers``): the socket file lives in the 0700 run
directory, which no other user can enter. Other hosts cannot reach it at all.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import zmq

from zmesh.transport import rundir, sockets

# Identities of workers seen at the door, remembered so answers leave by it; bounded, oldest forgotten.
_REMEMBER = 100_000


class WorkerDoor:
    def __init__(self, ctx: sockets.Context, max_message_bytes: int) -> None:
        sock: sockets.Socket = ctx.socket(zmq.ROUTER)
        # As every zmesh socket: closing never blocks, nothing is dropped silently, oversized frames are refused.
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # Named <pid>-..., so a node that died without closing it has it removed as stale by the next one.
        self._path = rundir.socket_dir() / f"{os.getpid()}-node-{os.urandom(6).hex()}.sock"
        try:
            sock.bind(f"ipc://{self._path}")
        except zmq.ZMQError as exc:
            sock.close()
            raise OSError(f"cannot bind the workers' socket {self._path}: {exc}") from None
        self.socket = sock
        self.address = f"ipc://{self._path}"
        self._peers: OrderedDict[bytes, None] = OrderedDict()

    def came_in(self, identity: bytes) -> None:
        """A message from ``identity`` came through the door: answers to it must leave by it."""
        peers = self._peers
        if identity in peers:
            peers.move_to_end(identity)
            return
        peers[identity] = None
        if len(peers) > _REMEMBER:
            peers.popitem(last=False)

    def socket_for(self, identity: bytes, default: Any) -> Any:
        """The socket to answer ``identity`` on: this door's if it came in here, else ``default``."""
        return self.socket if identity in self._peers else default

    def close(self) -> None:
        self.socket.close(linger=0)
        self._path.unlink(missing_ok=True)
