"""ObjectRefGenerator: what a streaming call returns, one ObjectRef per item, in order, as each is produced (as Ray's)."""

from __future__ import annotations

from typing import Any

from zmesh.exceptions import ZmeshError
from zmesh.object_ref import ObjectRef
from zmesh.runtime import Runtime, objects
from zmesh.runtime.streams import Stream


class ObjectRefGenerator:
    """The items of a streaming call: ``for ref in gen``, ``next(gen)``, ``async for ref in gen``.

    Each item is an ``ObjectRef`` owned by this process, usable and passable like any
    call's result. An error the generator raised is the value of the ref after the last
    item (``get`` raises it); the end is ``StopIteration``. An error on this side (the
    actor died) is raised by ``next`` itself. Dropping the generator stops its producer.
    """

    def __init__(self, ref: ObjectRef, rt: Runtime) -> None:
        # Internal: made by a streaming call, whose stream the runtime opened before sending it.
        stream = rt.streams.get(ref.id)
        assert stream is not None
        self._ref = ref
        self._rt = rt
        self._stream: Stream = stream
        self._cancelled = False

    def __repr__(self) -> str:
        return f"ObjectRefGenerator({self._ref.hex()})"

    def __iter__(self) -> ObjectRefGenerator:
        return self

    def __next__(self) -> ObjectRef:
        return self._next_sync()

    def _next_sync(self, timeout_s: float | None = None) -> ObjectRef:
        """The next item's ref; StopIteration at the end; GetTimeoutError if none came within ``timeout_s``."""
        rt = self._rt
        if rt.closed:
            raise ZmeshError("zmesh was shut down while this generator was open")
        if self._cancelled:
            raise StopIteration
        oid = rt.streams.take(self._stream, timeout_s)
        if oid is None:
            raise StopIteration
        return ObjectRef(oid, rt.address, rt)

    def __aiter__(self) -> ObjectRefGenerator:
        return self

    async def __anext__(self) -> ObjectRef:
        rt = self._rt
        while not self._cancelled and not rt.streams.ready(self._stream):
            await _changed(rt, self._stream)
        try:
            return self._next_sync(0)  # ready (only this consumer takes its items): returns at once
        except StopIteration:
            raise StopAsyncIteration from None

    def next_ready(self) -> bool:
        """Whether ``next`` would return (or raise) without waiting."""
        return self._rt.streams.ready(self._stream)

    def is_finished(self) -> bool:
        """Whether the generator ended and every item was taken: ``next`` would raise ``StopIteration``."""
        return self._rt.streams.finished(self._stream)

    def completed(self) -> ObjectRef:
        """A ref ready when the producer finished: its value is the number of items, or the error it raised."""
        return self._ref

    def _cancel(self) -> None:
        """Stop the producer; items already taken stay valid, ``next`` ends the iteration."""
        self._cancelled = True
        rt = self._rt
        if not rt.closed:
            rt.streams.close_soon(self._stream)

    def __del__(self) -> None:
        rt = getattr(self, "_rt", None)
        if rt is not None and not rt.closed:
            rt.streams.close_soon(self._stream)

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("an ObjectRefGenerator cannot leave its process; pass the ObjectRefs it gives instead")


async def _changed(rt: Runtime, stream: Stream) -> None:
    """Wait until the stream may have something for its consumer (an item, its end, an error)."""
    woken, wake = objects.loop_waiter()
    rt.streams.on_change(stream, wake)
    await woken
