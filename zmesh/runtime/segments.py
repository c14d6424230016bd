"""This process's end of its node's shared-memory object store: writing large values once, mapping them to read.

A value whose frames reach the node's threshold is written into a segment (one
file in ``/dev/shm``, ``transport/shm.py``) and travels as a *descriptor*: the
store's node, its data address, the segment's name, the frames' lengths and the
*holder*, the process the segment is kept for. The node frees a segment when its
holders let go or die (``node/store``).

- ``put``: we hold it; the ``Hold`` goes where the put's refs go (the entry), and
  letting go of the entry lets go of the segment.
- call arguments: we hold it until the call's result (the Hold rides in the
  call's kept refs).
- a result or a stream's item: the worker writes it *for its caller* (holder =
  the caller, ``holding``), so it outlives the worker as Ray's primary copy
  outlives its worker; the caller adopts it (``adopt``) and lets go with the entry.

Reading: a segment of our own node's store is mapped read-only, no copy. One of
another node's store is pulled by our node into its store first (one transfer per
node, however many of its processes read it), and mapped there.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from zmesh.exceptions import ObjectLostError, ObjectStoreFullError
from zmesh.runtime import ownership
from zmesh.runtime.io_loop import IoLoop
from zmesh.runtime.node_client import NodeClient
from zmesh.transport import protocol, serialization, shm

# A pull waits as long as the transfer takes; the node answers it or fails it (sender lost, no progress).
_PULL_TIMEOUT_S = 24 * 3600.0

_holding = threading.local()


@contextmanager
def holding(holder: str) -> Iterator[None]:
    """Segments written in this block are kept for ``holder`` (a client id in hex): a worker's results, for its caller."""
    outer = getattr(_holding, "holder", None)
    _holding.holder = holder
    try:
        yield
    finally:
        _holding.holder = outer


def parse(descriptor: Any) -> tuple[str, str, str, tuple[int, ...], str]:
    """``(store node, data address, segment name, frame lengths, holder)``; ValueError for anything else."""
    fields = serialization.loads_header(bytes(memoryview(descriptor)[1:]))
    if len(fields) != 5:
        raise ValueError("a segment descriptor has five fields")
    node_id, data, name, lengths, holder = fields
    if not (isinstance(node_id, str) and isinstance(data, str) and isinstance(name, str) and isinstance(holder, str)):
        raise ValueError("malformed segment descriptor")
    if not shm.valid_name(name) or not isinstance(lengths, tuple) or not all(type(n) is int and n >= 0 for n in lengths):
        raise ValueError("malformed segment descriptor")
    return node_id, data, name, lengths, holder


class Hold:
    """One hold on a segment: letting go of this object (in any thread, at any moment) lets go of the hold."""

    __slots__ = ("__weakref__", "_segments", "key")

    def __init__(self, segments: Segments, node_id: str, name: str, holder: str) -> None:
        self._segments = segments
        self.key = (node_id, name, holder)

    def __reduce__(self) -> Any:
        raise TypeError("a segment hold cannot be pickled")

    def __del__(self) -> None:
        self._segments.let_go(self.key)


class Segments:
    """Writes, maps, pulls and lets go of segments for one runtime; set as serialization's store."""

    def __init__(self, node: NodeClient, loop: IoLoop, me: str, info: dict[str, Any]) -> None:
        self._node = node
        self._loop = loop
        self._me = me
        self.node_id = str(info["node_id"])
        self.data_address = str(info["data"])
        self.threshold = int(info["threshold"])
        self._names = itertools.count(1)
        self._freed: deque[tuple[str, str, str]] = deque()
        self._maps: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self.written = 0  # segments this process wrote (tests, status)

    # ------------------------------------------------------------------ writing (user threads)

    def write(self, frames: list[Any]) -> list[Any]:
        lengths = tuple(memoryview(f).nbytes for f in frames)
        _, size = shm.layout(lengths)
        holder = getattr(_holding, "holder", None) or self._me
        name = shm.segment_name(self.node_id, f"{self._me[:24]}-{next(self._names):x}")
        self._node.request("store_alloc", (name, size, holder))  # ObjectStoreFullError names the sizes
        try:
            mm = shm.create(name, frames, size)
        except shm.NoSpaceError as exc:
            self._node.send(protocol.encode(protocol.REQUEST, (0, "store_free", (self.node_id, name, holder))))
            raise ObjectStoreFullError(f"a value of {size:,} bytes does not fit in shared memory: {exc.strerror}") from None
        except BaseException:
            self._node.send(protocol.encode(protocol.REQUEST, (0, "store_free", (self.node_id, name, holder))))
            raise
        self._maps[name] = mm
        self.written += 1
        if holder == self._me:
            # Whoever collects the refs pickled now keeps this (a put's entry, a call's kept refs).
            ownership.pickled(Hold(self, self.node_id, name, holder))
        return [b"S" + serialization.dumps_header((self.node_id, self.data_address, name, lengths, holder))]

    # ------------------------------------------------------------------ reading (user threads)

    def read(self, descriptor: Any) -> tuple[list[Any], Any]:
        try:
            node_id, data, name, lengths, _ = parse(descriptor)
        except (ValueError, serialization.DeserializationError) as exc:
            raise serialization.DeserializationError(f"bad shared-memory descriptor: {exc}") from None
        keep = None
        if node_id != self.node_id:
            _, size = shm.layout(lengths)
            name = self._node.request("store_pull", (node_id, data, name, size, self._me), timeout=_PULL_TIMEOUT_S)
            keep = Hold(self, self.node_id, name, self._me)
        mm = self._maps.get(name)
        if mm is None:
            try:
                mm = shm.open_map(name)
            except FileNotFoundError:
                raise ObjectLostError(f"the shared-memory copy {name} is gone (freed, or its node restarted)") from None
            self._maps[name] = mm
        return shm.frames_of(mm, lengths), keep

    def adopt(self, frames: list[Any]) -> Hold | None:
        """A result or item written for us by its worker: the hold that lets go of it with its entry."""
        try:
            node_id, _, name, _, holder = parse(frames[0])
        except (ValueError, serialization.DeserializationError):
            return None  # a garbled descriptor fails when read, with the reason
        return Hold(self, node_id, name, holder) if holder == self._me else None

    # ------------------------------------------------------------------ letting go

    def let_go(self, key: tuple[str, str, str]) -> None:
        """Called from ``Hold.__del__``: sent by the I/O thread, which never runs inside another send."""
        self._freed.append(key)
        self._loop.wake()

    def after_round(self) -> None:
        """On the I/O thread: tell the node (ours relays to another store's node) which holds are gone."""
        freed = self._freed
        while freed:
            try:
                node_id, name, holder = freed.popleft()
            except IndexError:
                break
            if self._node.lost is None:
                self._node.send_now(protocol.encode(protocol.REQUEST, (0, "store_free", (node_id, name, holder))))
