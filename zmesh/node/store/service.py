"""The node's object store: its requests, its files, its transfers and who still holds what.

Processes ask (``store_alloc`` before writing a segment, ``store_pull`` for a copy
of another node's segment, ``store_free`` when a hold ends); a free for another
node's segment is relayed there over the mesh. Holders that exit lose their holds:
at once for this node's processes (their session ends), within the mesh's grace
for others (the same check the runtimes use for owners). At start the node sweeps
the segments of stores whose node died without cleaning up; at stop it unlinks its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import psutil
import zmq

from zmesh.node.config import NodeConfig
from zmesh.node.core.store import Segment, StoreBook
from zmesh.node.requests import Reply
from zmesh.node.store.transfer import DataServer, Puller
from zmesh.transport import shm
from zmesh.transport.security import Security

logger = logging.getLogger(__name__)

_HOLDER_CHECK_S = 1.0
# A result's segment whose worker exited is freed this long after, unless its caller adopted it meanwhile: the
# caller's adopt may still be on its way (over the mesh, for a caller on another node) when the worker's exit is seen.
_ADOPT_GRACE_S = 5.0
_DEFAULT_SHARE = 0.3  # of the machine's memory, as Ray's default object store


def default_capacity() -> int:
    """30% of memory, and never more than the shared-memory file system can hold."""
    share = int(psutil.virtual_memory().total * _DEFAULT_SHARE)
    try:
        return min(share, int(psutil.disk_usage(str(shm.directory())).total))
    except OSError:
        return share


class ObjectStore:
    def __init__(
        self,
        node_id: str,
        config: NodeConfig,
        ctx: zmq.Context[Any],
        security: Security,
        poller: zmq.Poller,
        send_mesh: Callable[[str, str, dict[str, Any]], Any],
        gone: Callable[[list[str]], list[str]],
        member_dead: Callable[[str], bool],
    ) -> None:
        self.node_id = node_id
        self._config = config
        self._send_mesh = send_mesh
        self._gone = gone
        self._member_dead = member_dead
        self._lock = shm.StoreLock(node_id)
        swept = shm.sweep_dead_stores(node_id)
        if swept:
            logger.info("zmesh node: removed %d shared-memory segment(s) left by nodes that died", len(swept))
        self.book = StoreBook(node_id, config.object_store_memory or default_capacity())
        self.server = DataServer(ctx, security, config.host, node_id)
        poller.register(self.server.socket, zmq.POLLIN)
        self.puller = Puller(
            ctx,
            security,
            node_id,
            poller,
            # A chunk over the message limit would cost the connection (ZeroMQ drops the peer): keep under it.
            max(1, min(config.transfer_chunk, security.max_message_bytes - 4096)),
            config.transfer_window,
            config.transfer_stall_s,
            self._finished,
        )
        self._next_check = 0.0

    def info(self) -> dict[str, Any]:
        """What a process needs to write and read segments (sent in the node's welcome)."""
        return {"node_id": self.node_id, "data": self.server.address, "threshold": self._config.store_threshold}

    def ops(self) -> dict[str, Callable[[Any, tuple[Any, ...], list[Any], Reply], None]]:
        return {
            "store_alloc": lambda c, a, p, r: self._alloc(str(a[0]), int(a[1]), str(a[2]), c.client_id.hex(), r),
            "store_adopt": lambda c, a, p, r: self._adopt(str(a[0]), str(a[1]), str(a[2])),
            "store_free": lambda c, a, p, r: self._free(str(a[0]), str(a[1]), str(a[2]), r),
            "store_rename": lambda c, a, p, r: self._rename(str(a[0]), str(a[1]), str(a[2])),
            "store_pull": lambda c, a, p, r: self._pull(str(a[0]), str(a[1]), str(a[2]), int(a[3]), str(a[4]), r),
        }

    # ------------------------------------------------------------------ requests

    def _alloc(self, name: str, size: int, holder: str, writer: str, reply: Reply) -> None:
        if shm.store_of(name) != self.node_id or not shm.valid_name(name) or size < 1:
            reply.error("ValueError", f"bad segment {name!r} of {size} bytes for the store of node {self.node_id}")
            return
        refusal = self.book.alloc(name, size, holder, writer)
        if refusal is not None:
            reply.error("ObjectStoreFullError", refusal)
        else:
            reply.ok(None)

    def _free(self, node_id: str, name: str, holder: str, reply: Reply) -> None:
        if reply.req_id != 0:  # a hold let go is sent without waiting for an answer
            reply.ok(None)
        if node_id != self.node_id:
            self._send_mesh(node_id, "store_free", {"name": name, "holder": holder})
            return
        self._drop(self.book.free(name, holder))

    def _rename(self, old: str, new: str, holder: str) -> None:
        if shm.store_of(new) == self.node_id and shm.valid_name(new) and not self.book.rename(old, new, holder):
            logger.warning("zmesh node: a rename of segment %s by %s did not match the ledger", old, holder[:16])

    def _adopt(self, node_id: str, name: str, holder: str) -> None:
        if node_id != self.node_id:
            self._send_mesh(node_id, "store_adopt", {"name": name, "holder": holder})
        else:
            self.book.adopted(name, holder)

    def on_mesh_adopt(self, body: dict[str, Any]) -> None:
        self.book.adopted(str(body["name"]), str(body["holder"]))

    def on_mesh_free(self, body: dict[str, Any]) -> None:
        """Another node relays a free of one of our segments."""
        self._drop(self.book.free(str(body["name"]), str(body["holder"])))

    def _pull(self, node_id: str, data_address: str, name: str, size: int, holder: str, reply: Reply) -> None:
        if node_id == self.node_id:
            reply.error("ValueError", f"segment {name} is in this node's own store")
            return
        if not shm.valid_name(name) or shm.store_of(name) != node_id or size < 1:
            reply.error("ValueError", f"bad segment {name!r} of node {node_id}")
            return
        if self._member_dead(node_id):
            reply.error("ObjectLostError", f"the object is lost: node {node_id}, which held it, is gone")
            return
        refusal, ready, start = self.book.pull((node_id, name), size, holder, reply)
        if refusal:
            reply.error("ObjectStoreFullError", refusal)
        elif ready is not None:
            reply.ok(ready.name)
        elif start is not None:
            self.puller.start(start.name, start.source, data_address, size, time.monotonic())

    def _finished(self, name: str, error: str | None) -> None:
        if error is None:
            for waiter in self.book.pulled(name):
                waiter.ok(name)
            return
        seg = self.book.pull_failed(name)
        if seg is not None:
            logger.warning("zmesh node: a copy of %s failed: %s", seg.source, error)
            for waiter in seg.waiters:
                waiter.error("ObjectLostError", error)

    # ------------------------------------------------------------------ holders and members

    def client_gone(self, client_hex: str) -> None:
        self._drop(self.book.holders_gone({client_hex}))
        self.book.writer_gone(client_hex, time.monotonic())

    def member_gone(self, node_id: str) -> None:
        self.puller.node_gone(node_id)

    def tend(self, now: float) -> None:
        self.puller.tend(now)
        self.server.tend(now)
        self._drop(self.book.orphans(now, _ADOPT_GRACE_S))
        if now < self._next_check:
            return
        self._next_check = now + _HOLDER_CHECK_S
        holders = sorted(self.book.holders())
        if holders:
            self._drop(self.book.holders_gone(set(self._gone(holders))))

    def _drop(self, segments: list[Segment]) -> None:
        for seg in segments:
            if seg.source is not None:
                self.puller.cancel(seg.name)  # a copy still being made: nobody is left to read it
            for waiter in seg.waiters:
                waiter.error("ObjectLostError", "every reader of this copy is gone")
            shm.unlink(seg.name)

    def on_readable(self, sock: Any, now: float) -> bool:
        if sock is self.server.socket:
            self.server.on_readable(now)
            return True
        if self.puller.owns(sock):
            self.puller.on_readable(sock, now)
            return True
        return False

    def describe(self) -> dict[str, Any]:
        return {
            **self.book.describe(),
            "bytes_sent": self.server.bytes_sent,
            "bytes_received": self.puller.bytes_received,
            "malformed_chunk_requests": self.server.malformed,
            "transfers_active": self.puller.active(),
        }

    def close(self) -> None:
        self.puller.close()
        self.server.close()
        for name in self.book.names():
            shm.unlink(name)
        shm.remove_store(self.node_id)  # renamed segments whose new name the ledger never learnt, too
        self._lock.release()
