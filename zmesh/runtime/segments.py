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
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from zmesh.exceptions import ObjectLostError, ObjectStoreFullError
from zmesh.runtime import ownership
from zmesh.runtime.io_loop import IoLoop
from zmesh.runtime.node_client import NodeClient
from zmesh.transport import protocol, serialization, shm

# A pull waits as long as the transfer takes; the node answers it or fails it (sender lost, no progress).
_PULL_TIMEOUT_S = 24 * 3600.0
# Segments kept for reuse: a loop passing a large argument by value writes into warm pages each time. Enough
# for the calls a pipelined caller keeps in flight; what no write took within a second goes back to the store.
_POOL_MAX = 64
_POOL_BYTES = 256 << 20
_POOL_IDLE_S = 1.0

_holding = threading.local()
_reading = threading.local()


@contextmanager
def holding(holder: str) -> Iterator[None]:
    """Segments written in this block are kept for ``holder`` (a client id in hex): a worker's results, for its caller."""
    outer = getattr(_holding, "holder", None)
    _holding.holder = holder
    try:
        yield
    finally:
        _holding.holder = outer


class reading:
    """Collect weak references to the mappings this thread makes for a call's arguments, into ``mapped``."""

    __slots__ = ("_mapped", "_outer")

    def __init__(self, mapped: list[Any]) -> None:
        self._mapped = mapped

    def __enter__(self) -> list[Any]:
        self._outer = getattr(_reading, "mapped", None)
        _reading.mapped = self._mapped
        return self._mapped

    def __exit__(self, *exc: object) -> None:
        _reading.mapped = self._outer


def released(mapped: list[Any]) -> bool:
    """Whether this process mapped argument segments and no longer does: their writer may reuse them."""
    return bool(mapped) and all(ref() is None for ref in mapped)


def reusable(kept: list[Any] | None) -> None:
    """The one reader of a call's argument segments let go of them: the writer's holds may pool them."""
    for hold in kept or ():
        if type(hold) is Hold:
            hold.reusable = True


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
    """One hold on a segment: letting go of this object (in any thread, at any moment) lets go of the hold.

    A writer's hold on a segment whose only reader said it no longer maps it (``reusable``) puts the
    segment in the writer's pool instead, and its pages are written again, warm.
    """

    __slots__ = ("__weakref__", "_segments", "key", "mapping", "reusable", "size")

    def __init__(self, segments: Segments, node_id: str, name: str, holder: str, size: int = 0, mapping: Any = None) -> None:
        self._segments = segments
        self.key = (node_id, name, holder)
        self.size = size
        self.mapping = mapping  # the writer's own mapping of a reused segment: written again without a page fault
        self.reusable = False

    def __reduce__(self) -> Any:
        raise TypeError("a segment hold cannot be pickled")

    def __del__(self) -> None:
        try:
            if self.reusable and self.size:
                self._segments.pool_put(self.key, self.size, self.mapping)
            else:
                self._segments.let_go(self.key)
        except Exception:  # at interpreter exit the runtime may be half gone; its node frees what it held
            pass


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
        # What the I/O thread tells the node, in order: ("store_free", (node, name, holder)) or ("store_rename", ...).
        self._freed: deque[tuple[str, tuple[str, str, str]]] = deque()
        self._maps: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        # Segments of ours that their one reader let go of: (name, size, since, our mapping or None), newest last.
        self._pool: deque[tuple[str, int, float, Any]] = deque()
        self._pool_bytes = 0
        self._pool_lock = threading.RLock()  # Hold.__del__ may run (a collection) while this thread holds it
        # Set by the runtime: a top-level ref argument it owns whose value is in the store -> that value's descriptor.
        self.inline: Callable[[Any], list[Any] | None] = lambda value: None

    # ------------------------------------------------------------------ writing (user threads)

    def write(self, frames: list[Any]) -> list[Any] | None:
        if self._loop.on_io_thread:
            return None  # the node's answer to a reservation would come through this very thread: send it as messages
        lengths = tuple(memoryview(f).nbytes for f in frames)
        _, size = shm.layout(lengths)
        holder = getattr(_holding, "holder", None) or self._me
        name = shm.segment_name(self.node_id, f"{self._me[:24]}-{next(self._names):x}")
        reused = self._reuse(name, frames, size) if holder == self._me else None
        if reused is not None:
            return self._written(name, reused[0], lengths, holder, reused[1])
        try:
            self._node.request("store_alloc", (name, size, holder))  # ObjectStoreFullError names the sizes
        except ObjectStoreFullError:
            if not self._drain_pool():
                raise
            self._node.request("store_alloc", (name, size, holder))
        try:
            shm.create(name, frames, size)
        except shm.NoSpaceError as exc:
            self._node.send(protocol.encode(protocol.REQUEST, (0, "store_free", (self.node_id, name, holder))))
            raise ObjectStoreFullError(f"a value of {size:,} bytes does not fit in shared memory: {exc.strerror}") from None
        except BaseException:
            self._node.send(protocol.encode(protocol.REQUEST, (0, "store_free", (self.node_id, name, holder))))
            raise
        return self._written(name, size, lengths, holder)

    def _written(self, name: str, size: int, lengths: tuple[int, ...], holder: str, mapping: Any = None) -> list[Any]:
        if holder == self._me:
            # Whoever collects the refs pickled now keeps this (a put's entry, a call's kept refs).
            ownership.pickled(Hold(self, self.node_id, name, holder, size, mapping))
        return [b"S" + serialization.dumps_header((self.node_id, self.data_address, name, lengths, holder))]

    # ------------------------------------------------------------------ reusing our own segments

    def _reuse(self, name: str, frames: list[Any], size: int) -> tuple[int, Any] | None:
        """Write into a pooled segment of at least ``size`` bytes (at most twice), renamed: (its size, our mapping)."""
        with self._pool_lock:
            fits = [i for i, entry in enumerate(self._pool) if size <= entry[1] <= 2 * size]
            if not fits:
                return None
            old, pooled, _, mapping = self._pool[fits[-1]]
            del self._pool[fits[-1]]
            self._pool_bytes -= pooled
            self._maps.pop(old, None)
        try:
            os.rename(shm.directory() / old, shm.directory() / name)
            if mapping is None:
                mapping = shm.map_to_write(name)
            shm.write(mapping, frames)
        except OSError:
            self._freed.append(("store_free", (self.node_id, old, self._me)))
            shm.unlink(name)
            return None
        # A new name: a descriptor of the old value can never reach these bytes. The node learns it in order with
        # our frees, at the I/O thread's next round (no wake-up of its own); a node that stops removes every file
        # of its store, whatever its name.
        self._freed.append(("store_rename", (old, name, self._me)))
        return pooled, mapping

    def pool_put(self, key: tuple[str, str, str], size: int, mapping: Any) -> None:
        """From ``Hold.__del__``: keep a segment nobody maps any more for the next value of about its size."""
        with self._pool_lock:
            self._pool.append((key[1], size, time.monotonic(), mapping))
            self._pool_bytes += size
            while len(self._pool) > _POOL_MAX or self._pool_bytes > _POOL_BYTES:
                self._let_go_pooled()

    def _let_go_pooled(self) -> None:
        """The oldest pooled segment goes back to the store (the pool's lock is held)."""
        name, size, _, _ = self._pool.popleft()
        self._pool_bytes -= size
        self._freed.append(("store_free", (self.node_id, name, self._me)))

    def _drain_pool(self) -> bool:
        """Let go of every pooled segment (the store is full); whether there was any."""
        with self._pool_lock:
            pooled, self._pool, self._pool_bytes = self._pool, deque(), 0
        for name, *_ in pooled:
            self._node.send(protocol.encode(protocol.REQUEST, (0, "store_free", (self.node_id, name, self._me))))
        if pooled:
            self._node.request("gone", ([],))  # the frees above are answered in order: the room is there after this
        return bool(pooled)

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
        mapped = getattr(_reading, "mapped", None)
        if mapped is not None:
            mapped.append(weakref.ref(mm))
        try:
            return shm.frames_of(mm, lengths), keep
        except ValueError as exc:
            raise serialization.DeserializationError(str(exc)) from None

    def adopt(self, frames: list[Any]) -> Hold | None:
        """A result or item written for us by its worker: the hold that lets go of it with its entry."""
        try:
            node_id, _, name, _, holder = parse(frames[0])
        except (ValueError, serialization.DeserializationError):
            return None  # a garbled descriptor fails when read, with the reason
        if holder != self._me:
            return None
        # Tell the segment's node we have it: from now on it no longer goes if its writer exits.
        self._freed.append(("store_adopt", (node_id, name, holder)))
        self._loop.nudge()
        return Hold(self, node_id, name, holder)

    # ------------------------------------------------------------------ letting go

    def let_go(self, key: tuple[str, str, str]) -> None:
        """Called from ``Hold.__del__``: sent by the I/O thread, which never runs inside another send."""
        self._freed.append(("store_free", key))
        self._loop.nudge()

    def close(self) -> None:
        """The runtime is closing: pooled segments go (the node frees what we held when we leave)."""
        with self._pool_lock:
            self._pool.clear()
            self._pool_bytes = 0
        self._maps.clear()

    def after_round(self) -> None:
        """On the I/O thread: tell the node (ours relays to another store's node) which holds are gone."""
        if self._pool and time.monotonic() - self._pool[0][2] > _POOL_IDLE_S:
            with self._pool_lock:
                while self._pool and time.monotonic() - self._pool[0][2] > _POOL_IDLE_S:
                    self._let_go_pooled()
        freed = self._freed
        while freed:
            try:
                op, args = freed.popleft()
            except IndexError:
                break
            if self._node.lost is None:
                self._node.send_now(protocol.encode(protocol.REQUEST, (0, op, args)))
