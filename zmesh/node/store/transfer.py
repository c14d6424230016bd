"""Moving segments between nodes: chunks asked for with a bounded window, on sockets of their own.

A node serves its store's segments on a data ROUTER (CURVE like every TCP socket
of the mesh), apart from the mesh link, so a gigabyte in flight never delays a
SWIM probe. The reading node asks for ``window`` chunks of ``chunk`` bytes at a
time and asks for the next as each arrives: the sender holds at most a window of
chunks in ZeroMQ's queues per transfer, whatever the object's size or how many
nodes read it; a chunk leaves as a view of the sender's mapping (no copy in
Python) and CURVE encrypts it chunk by chunk.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable
from typing import Any

import zmq

from zmesh.transport import protocol, shm, sockets
from zmesh.transport.security import Security

logger = logging.getLogger(__name__)

CHUNK_GET = protocol.CHUNK_GET
CHUNK = protocol.CHUNK

_IDLE_MAP_S = 5.0  # a served segment's mapping is dropped after this long without a request


class DataServer:
    """Serves this node's segments to other nodes, chunk by chunk."""

    def __init__(self, ctx: zmq.Context[Any], security: Security, host: str, store_id: str) -> None:
        self.socket, self.address = sockets.router(ctx, security, host, 0)
        self._store_id = store_id
        self._maps: dict[str, tuple[memoryview, float]] = {}
        self.bytes_sent = 0
        self.malformed = 0

    def on_readable(self, now: float) -> None:
        sock = self.socket
        while True:
            try:
                frames = sockets.recv(sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._serve(frames, now)

    def _serve(self, frames: list[Any], now: float) -> None:
        identity = frames[0]
        try:
            msg = protocol.decode(frames[1:])
            if msg.type != CHUNK_GET or len(msg.header) != 4:
                raise ValueError("not a chunk request")
            tid, name, offset, length = msg.header
            if not (isinstance(name, str) and shm.valid_name(name) and type(offset) is int and type(length) is int):
                raise ValueError("malformed chunk request")
            if shm.store_of(name) != self._store_id:  # only this node's own segments are served
                raise ValueError("malformed chunk request")
        except Exception:
            self.malformed += 1  # a peer's garbage costs it its answer, never the node
            return
        mm = self._map(name, now)
        if mm is None:
            error = f"segment {name} is not held by this node any more (freed, or its owner is gone)"
            self._send(identity, protocol.encode(CHUNK, (tid, offset, error)))
            return
        if not 0 <= offset < mm.nbytes or length < 1:
            self._send(identity, protocol.encode(CHUNK, (tid, offset, f"bad range {offset}+{length} of {name}")))
            return
        view = mm[offset : offset + length]
        self.bytes_sent += view.nbytes
        self._send(identity, protocol.encode(CHUNK, (tid, offset, None), [view]))

    def _send(self, identity: bytes, frames: list[Any]) -> None:
        try:
            self.socket.send_multipart([identity, *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            pass  # the reader is gone or stuck: its transfer stalls and fails there

    def _map(self, name: str, now: float) -> memoryview | None:
        held = self._maps.get(name)
        if held is not None:
            self._maps[name] = (held[0], now)
            return held[0]
        try:
            mm = shm.view(shm.open_map(name, populate=True)).toreadonly()
        except (FileNotFoundError, ValueError, OSError):
            return None
        self._maps[name] = (mm, now)
        return mm

    def tend(self, now: float) -> None:
        # Dropped, not closed: chunks still queued in ZeroMQ are views of the mapping; the last one gone unmaps it.
        for name in [n for n, (_, used) in self._maps.items() if now - used > _IDLE_MAP_S]:
            del self._maps[name]

    def close(self) -> None:
        self._maps.clear()
        self.socket.close(linger=0)


class _Transfer:
    __slots__ = ("address", "asked", "done_bytes", "fd", "from_node", "last", "name", "size", "source_name", "tid")

    def __init__(self, tid: int, name: str, source: tuple[str, str], address: str, size: int, fd: int, now: float) -> None:
        self.tid = tid
        self.address = address  # the source node's data socket
        self.name = name
        self.from_node, self.source_name = source
        self.size = size
        self.fd = fd  # the new segment, written with pwrite: no page fault per page, ENOSPC rather than SIGBUS
        self.asked = 0  # bytes asked for so far
        self.done_bytes = 0
        self.last = now


# Called with (local segment name, error or None) when a transfer ends.
Finished = Callable[[str, str | None], None]


class Puller:
    """Transfers into this node's store from other nodes' data servers."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        security: Security,
        node_id: str,
        poller: zmq.Poller,
        chunk: int,
        window: int,
        stall_s: float,
        finished: Finished,
    ) -> None:
        self._ctx = ctx
        self._security = security
        self._identity = b"D" + node_id.encode()
        self._poller = poller
        self._chunk = chunk
        self._window = window
        self._stall_s = stall_s
        self._finished = finished
        self._socks: dict[str, zmq.Socket[Any]] = {}  # data address -> DEALER
        self._by_sock: dict[zmq.Socket[Any], str] = {}
        self._transfers: dict[int, _Transfer] = {}
        self._by_name: dict[str, int] = {}
        self._tids = itertools.count(1)
        self.bytes_received = 0

    def owns(self, sock: Any) -> bool:
        return sock in self._by_sock

    def start(self, name: str, source: tuple[str, str], data_address: str, size: int, now: float) -> None:
        """Make local segment ``name`` and fill it from ``source`` (node id, name) served at ``data_address``."""
        try:
            fd = shm.open_to_fill(name, size)
        except OSError as exc:
            self._finished(name, f"no room in shared memory for a copy of {size:,} bytes: {exc.strerror or exc}")
            return
        tid = next(self._tids)
        transfer = _Transfer(tid, name, source, data_address, size, fd, now)
        self._transfers[tid] = transfer
        self._by_name[name] = tid
        for _ in range(self._window):
            self._ask(transfer)

    def _sock(self, address: str) -> zmq.Socket[Any]:
        sock = self._socks.get(address)
        if sock is None:
            sock, _ = sockets.dealer(self._ctx, self._security, address, self._identity)
            sock.setsockopt(zmq.LINGER, 0)
            self._socks[address] = sock
            self._by_sock[sock] = address
            self._poller.register(sock, zmq.POLLIN)
        return sock

    def _ask(self, t: _Transfer) -> None:
        if t.asked >= t.size:
            return
        length = min(self._chunk, t.size - t.asked)
        frames = protocol.encode(CHUNK_GET, (t.tid, t.source_name, t.asked, length))
        try:
            self._sock(t.address).send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self._end(t, f"could not ask {t.address} for a chunk: {exc}")
            return
        t.asked += length

    def on_readable(self, sock: Any, now: float) -> None:
        while True:
            try:
                frames = sockets.recv(sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = protocol.decode(frames)
                tid, offset, error = msg.header
            except Exception:
                continue  # garbage from a peer: ignored, the transfer stalls and fails if it was ours
            transfer = self._transfers.get(tid) if isinstance(tid, int) else None
            if transfer is None:
                continue  # a cancelled transfer's late chunk
            if error is not None or len(msg.payload) != 1 or not isinstance(offset, int):
                self._end(transfer, f"node {transfer.from_node} could not send the object: {error or 'malformed chunk'}")
                continue
            data = memoryview(msg.payload[0])
            if offset < 0 or offset + data.nbytes > transfer.size:
                self._end(transfer, f"node {transfer.from_node} sent a chunk out of range")
                continue
            try:
                shm.pwrite_at(transfer.fd, data, offset)
            except OSError as exc:
                self._end(transfer, f"no room in shared memory for the copy: {exc.strerror or exc}")
                continue
            transfer.done_bytes += data.nbytes
            transfer.last = now
            self.bytes_received += data.nbytes
            if transfer.done_bytes >= transfer.size:
                self._end(transfer, None)
            else:
                self._ask(transfer)

    def _end(self, t: _Transfer, error: str | None) -> None:
        if self._transfers.pop(t.tid, None) is None:
            return
        self._by_name.pop(t.name, None)
        os.close(t.fd)
        if error is not None:
            shm.unlink(t.name)
        self._finished(t.name, error)

    def cancel(self, name: str) -> None:
        """Nobody waits for this copy any more: stop asking, drop the partial copy (no callback)."""
        tid = self._by_name.pop(name, None)
        t = self._transfers.pop(tid, None) if tid is not None else None
        if t is not None:
            os.close(t.fd)
            shm.unlink(name)

    def node_gone(self, node_id: str) -> None:
        for t in [t for t in self._transfers.values() if t.from_node == node_id]:
            self._end(t, f"node {node_id}, which held the object, is gone")

    def tend(self, now: float) -> None:
        for t in [t for t in self._transfers.values() if now - t.last > self._stall_s]:
            self._end(t, f"no part of the object arrived from node {t.from_node} for {self._stall_s:g} s")

    def active(self) -> int:
        return len(self._transfers)

    def close(self) -> None:
        for t in list(self._transfers.values()):
            self.cancel(t.name)
        for sock in self._socks.values():
            self._poller.unregister(sock)
            sock.close(linger=0)
        self._socks.clear()
        self._by_sock.clear()
