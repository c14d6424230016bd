"""Streaming calls, the consumer's side: the items each generator received, what its consumer took, the acks that pace it.

A streaming call has one result id, the generator's, completed by the call's RESULT (the
item count, or the error the generator raised) like any call's; until then its items
arrive as ``ITEM`` messages on the same connection, before that RESULT. Each item is an
object this process owns (``ids.item_id``), held for the consumer until it takes it. The
consumer's progress goes back as ``STREAM_ACK`` every half window, so the producer runs
at most a window ahead; dropping the generator sends a stop (a negative ack).

The I/O thread records items; user threads take them; all state is guarded by the
runtime's one lock, and nothing is sent while holding it.
"""

from __future__ import annotations

import copy
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from zmesh.exceptions import GetTimeoutError
from zmesh.runtime import calls, objects
from zmesh.runtime.actors import Recent
from zmesh.runtime.inbound import Inbound
from zmesh.runtime.io_loop import IoLoop
from zmesh.runtime.outbox import RUN, TO_PEER, Outbox
from zmesh.transport import protocol, serialization
from zmesh.transport.ids import ObjectId, item_id

_REMEMBER_STOPPED = 10_000


class Stream:
    """One generator's state; the consumer's view is ``taken`` of ``received``, then the end."""

    __slots__ = ("acked", "address", "callbacks", "closed", "ended", "generator", "received", "taken", "waiters", "watching", "window")

    def __init__(self, generator: ObjectId, window: int) -> None:
        self.generator = generator
        self.window = window
        self.received = 0  # items that arrived (ids item_id(generator, 0 .. received - 1))
        self.taken = 0  # items the consumer took: their references are its ObjectRefs'
        self.acked = 0  # the count last sent to the producer
        self.address: str | None = None  # where the items come from: acks go there
        self.ended = False  # the consumer has had the end (or the error)
        self.closed = False  # dropped or cancelled: nothing more is taken
        self.watching = False  # woken when the generator's result arrives
        self.waiters: list[objects.Waiter] = []
        self.callbacks: list[Callable[[], None]] = []


# What ``take`` found: an item's id (its reference the caller's from now on), the end, or nothing yet.
_END = object()


class Streams:
    """The streaming calls this process made, by generator id."""

    def __init__(
        self, lock: threading.Lock, store: objects.ObjectStore, loop: IoLoop, outbox: Outbox, release: Callable[[ObjectId], None]
    ) -> None:
        self._lock = lock
        self._store = store
        self._loop = loop
        self._outbox = outbox
        self._release = release
        self._open: dict[ObjectId, Stream] = {}
        # Streams dropped before their end, and whether their producer was told to stop (it is on its first late item).
        self._stopped: Recent[ObjectId, bool] = Recent(_REMEMBER_STOPPED)

    def register(self, inbound: Inbound) -> None:
        inbound.peer.register(protocol.ITEM, self._on_item)

    def __len__(self) -> int:
        return len(self._open)

    # ------------------------------------------------------------------ user threads

    def open(self, generator: ObjectId, window: int) -> Stream:
        """Expect the items of ``generator``'s call (before it is sent: its items may come at once)."""
        stream = Stream(generator, window)
        with self._lock:
            self._open[generator] = stream
        return stream

    def get(self, generator: ObjectId) -> Stream | None:
        with self._lock:
            return self._open.get(generator)

    def take(self, stream: Stream, timeout: float | None = None) -> ObjectId | None:
        """The next item's id, its reference counted for the caller's new ObjectRef; None at the end.

        An error the generator raised comes as one more item, whose value raises it; an
        error on this side (the actor died, the call could not be sent) is raised here.
        Raises ``GetTimeoutError`` when nothing came within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter: objects.Waiter | None = None
        while True:
            with self._lock:
                found = self._take_locked(stream)
                if found is None:
                    waiter = waiter or objects.Waiter()
                    waiter.clear()
                    stream.waiters.append(waiter)
                    self._watch_end_locked(stream)
                else:
                    ack = self._ack_locked(stream)
            if found is not None:
                if ack is not None:
                    self._loop.push(ack)
                return None if found is _END else found
            assert waiter is not None
            remaining = None if deadline is None else deadline - time.monotonic()
            if (remaining is not None and remaining <= 0) or not waiter.wait(remaining):
                with self._lock:
                    if waiter in stream.waiters:
                        stream.waiters.remove(waiter)
                raise GetTimeoutError(f"no item of the stream came within {timeout} s")

    def ready(self, stream: Stream) -> bool:
        """Whether ``take`` would return (or raise) without waiting."""
        with self._lock:
            return self._ready_locked(stream)

    def finished(self, stream: Stream) -> bool:
        """Whether the consumer has had everything: the end is known and every item was taken."""
        with self._lock:
            if stream.ended or stream.closed:
                return True
            entry = self._store.get_locked(stream.generator)
            return stream.taken >= stream.received and (entry is None or (entry.done and entry.ok and entry.error is None))

    def on_change(self, stream: Stream, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once, on any thread) when ``take`` may no longer wait; at once if it would not."""
        with self._lock:
            now = self._ready_locked(stream)
            if not now:
                stream.callbacks.append(callback)
                self._watch_end_locked(stream)
        if now:
            callback()

    def close_soon(self, stream: Stream) -> None:
        """The generator was dropped or cancelled (any thread, even inside ``__del__``): the I/O thread stops the producer."""
        self._loop.push((RUN, None, functools.partial(self.close, stream)))

    # ------------------------------------------------------------------ locked helpers

    def _ready_locked(self, stream: Stream) -> bool:
        if stream.ended or stream.closed or stream.taken < stream.received:
            return True
        entry = self._store.get_locked(stream.generator)
        return entry is None or entry.done

    def _take_locked(self, stream: Stream) -> Any:
        if stream.ended or stream.closed:
            return _END
        if stream.taken < stream.received:
            stream.taken += 1
            return item_id(stream.generator, stream.taken - 1)
        entry = self._store.get_locked(stream.generator)
        if entry is not None and not entry.done:
            return None
        stream.ended = True
        if entry is None or (entry.ok and entry.error is None):
            return _END
        if entry.error is not None:
            raise copy.copy(entry.error)  # the actor died, or the call never reached it
        # The generator raised: its error is the value of one more item, after the ones before it.
        oid = item_id(stream.generator, stream.taken)
        failed = self._store.new_owned_locked(oid)
        failed.frames, failed.ok, failed.done = entry.frames, False, True
        self._store.add_ref_locked(oid)
        stream.taken += 1
        return oid

    def _ack_locked(self, stream: Stream) -> tuple[Any, ...] | None:
        """The ack to send once the consumer is half a window past the last one (never holds the producer up)."""
        if stream.address is None or stream.ended or stream.taken - stream.acked < max(1, stream.window // 2):
            return None
        stream.acked = stream.taken
        return (TO_PEER, stream.address, calls.ack_message(stream.generator, stream.taken))

    def _watch_end_locked(self, stream: Stream) -> None:
        """Wake the stream's waiters when its call's result arrives (once per stream)."""
        if stream.watching:
            return
        entry = self._store.get_locked(stream.generator)
        if entry is not None and not entry.done:
            entry.callbacks.append(functools.partial(self._wake, stream))
            stream.watching = True

    def _wake(self, stream: Stream) -> None:
        with self._lock:
            waiters, stream.waiters = stream.waiters, []
            callbacks, stream.callbacks = stream.callbacks, []
        objects.wake(waiters, callbacks)

    # ------------------------------------------------------------------ the I/O thread

    def close(self, stream: Stream) -> None:
        """Stop ``stream``: release the items nobody took, and tell the producer to stop if it may still run."""
        with self._lock:
            if self._open.get(stream.generator) is not stream:
                return
            del self._open[stream.generator]
            stream.closed = True
            untaken = [item_id(stream.generator, i) for i in range(stream.taken, stream.received)]
            stream.taken = stream.received
            entry = self._store.get_locked(stream.generator)
            running = entry is not None and not entry.done
            tell = running and stream.address is not None
            if running:
                self._stopped.add(stream.generator, tell)
            waiters, stream.waiters = stream.waiters, []
            callbacks, stream.callbacks = stream.callbacks, []
        if tell:
            assert stream.address is not None
            self._outbox.send_to_peer(stream.address, calls.ack_message(stream.generator, -1))
        for oid in untaken:
            self._release(oid)
        objects.wake(waiters, callbacks)

    def _on_item(self, address: str, msg: protocol.Message) -> None:
        generator, index, frames, lent = calls.split_item(msg)
        gen = ObjectId(generator)
        oid = item_id(gen, index)
        hold = serialization.adopt(frames)  # an item in shared memory, written for us: let go with its entry, or now
        with self._lock:
            stream = self._open.get(gen)
            if stream is not None:
                if index != stream.received:
                    raise protocol.ProtocolError(f"item {index} of a stream came where item {stream.received} was due")
                entry = self._store.new_owned_locked(oid)
                entry.frames, entry.done = frames, True
                if hold is not None:
                    entry.contained = [hold]
                if lent:
                    entry.lender = address
                self._store.add_ref_locked(oid)  # the stream's, until the consumer takes it
                stream.received += 1
                stream.address = address
                waiters, stream.waiters = stream.waiters, []
                callbacks, stream.callbacks = stream.callbacks, []
            else:
                told = self._stopped.get(gen) is True
                self._stopped.add(gen, True)
        if stream is not None:
            objects.wake(waiters, callbacks)
            return
        # A stream dropped already: nobody will take this item.
        if lent:
            self._outbox.send_to_peer(address, protocol.encode(protocol.RELEASE_LENT, (oid,)))
        if not told:
            self._outbox.send_to_peer(address, calls.ack_message(gen, -1))
