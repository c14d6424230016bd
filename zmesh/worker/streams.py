"""Streaming calls, the producer's side: run a generator, send each item to its caller, never past the caller's credit.

A streaming call (num_returns="streaming") names one result id, the generator's; its
items get ids derived from it (``ids.item_id``), go to the caller as ``ITEM`` messages
on the call's connection, and the call's ordinary RESULT (the item count, or the error
the generator raised) closes it. The caller acks the items its consumer took
(``STREAM_ACK``); the producer runs at most ``window`` items past the last ack, and a
negative ack stops it. Nothing here knows actors: an executor says how to send to the
caller and how to wait (``StreamCall``), a target says how a value is framed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

from zmesh.runtime import Runtime, calls, objects
from zmesh.runtime.inbound import Inbound
from zmesh.transport import protocol
from zmesh.transport.ids import ObjectId, item_id

logger = logging.getLogger(__name__)

# While a producer waits for credit this long without news, it asks the node whether its caller still lives.
CHECK_CALLER_S = 1.0


class Credit:
    """How far one stream's producer may run: ``window`` items past what its caller consumed; or stop (any thread)."""

    __slots__ = ("_cond", "_wakers", "cancelled", "consumed", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.consumed = 0
        self.cancelled = False
        self._cond = threading.Condition(threading.Lock())
        self._wakers: list[Callable[[], None]] = []  # asyncio producers waiting, woken on their loop

    def allows(self, index: int) -> bool:
        """Whether item ``index`` (0-based) may be produced now."""
        return index < self.consumed + self.window

    def grant(self, consumed: int) -> None:
        """The caller consumed ``consumed`` items (a negative count: it wants no more)."""
        with self._cond:
            if consumed < 0:
                self.cancelled = True
            elif consumed > self.consumed:
                self.consumed = consumed
            self._cond.notify_all()
            wakers, self._wakers = self._wakers, []
        for wake in wakers:
            wake()

    def stop(self) -> None:
        self.grant(-1)

    def wait(self, index: int, timeout: float) -> bool:
        """Block until item ``index`` may be produced or the stream is stopped; False after ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: self.cancelled or self.allows(index), timeout)

    async def wait_async(self, index: int, timeout: float) -> bool:
        woken, wake = objects.loop_waiter()
        with self._cond:
            if self.cancelled or self.allows(index):
                return True
            self._wakers.append(wake)
        try:
            await asyncio.wait_for(woken, timeout)
        except TimeoutError:
            pass
        return self.cancelled or self.allows(index)


class Credits:
    """The open streams of one worker, by (caller identity, generator id): where the callers' acks land."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[bytes, bytes], Credit] = {}

    def register(self, inbound: Inbound) -> None:
        """Acks for a threaded or asyncio worker arrive on the runtime's ROUTER (an inline one reads its own sockets)."""
        inbound.router.register(protocol.STREAM_ACK, self.on_ack)

    def open(self, caller: bytes, generator: bytes, window: int) -> Credit:
        credit = Credit(window)
        with self._lock:
            self._open[(caller, generator)] = credit
        return credit

    def close(self, caller: bytes, generator: bytes) -> None:
        with self._lock:
            self._open.pop((caller, generator), None)

    def on_ack(self, caller: bytes, msg: protocol.Message) -> None:
        """An ack from ``caller``; one for a stream already over is ignored (it crossed the end on the wire)."""
        generator, consumed = calls.split_ack(msg)
        with self._lock:
            credit = self._open.get((caller, generator))
        if credit is not None:
            credit.grant(consumed)

    def __len__(self) -> int:
        return len(self._open)


# value -> (its frames, the refs pickled into it); raises what serializing it raised
Frame = Callable[[Any], tuple[list[Any], list[Any]]]
# (credit, index, timeout) -> whether item ``index`` may be produced (or the stream stopped) within ``timeout``
Wait = Callable[[Credit, int, float], bool]


@dataclasses.dataclass(frozen=True)
class StreamCall:
    """One streaming call, as its executor runs it."""

    generator: bytes  # the call's result id
    caller: bytes  # the caller's identity: where items go, whose acks count
    window: int
    send: Callable[[list[Any]], None]  # send one message to the caller, ahead of the call's RESULT
    frame: Frame
    wait: Wait | None = None  # how a blocked producer waits for acks; None: on the credit (acks come on another thread)


def produce(values: Any, call: StreamCall, credits: Credits, rt: Runtime) -> int:
    """Send the items of ``values`` (an iterable) to the caller; returns how many went.

    Raises what iterating raised (the caller's next ref raises it, after the items before
    it). Stops early, closing the generator, when the caller stops the stream or is gone.
    """
    iterator = _iterator(values)
    credit = credits.open(call.caller, call.generator, call.window)
    wait = call.wait or _wait_on_credit
    index = 0
    try:
        while True:
            while not credit.cancelled and not credit.allows(index):
                if not wait(credit, index, CHECK_CALLER_S) and caller_gone(rt, call.caller):
                    credit.stop()
            if credit.cancelled:
                break
            try:
                value = next(iterator)
            except StopIteration:
                break
            oid = item_id(ObjectId(call.generator), index)
            frames, refs = call.frame(value)
            if refs:
                rt.lend(call.caller, oid, refs)
            rt.settle_borrows()  # our borrowed refs inside it are registered before the caller may drop its own
            call.send(calls.item_message(call.generator, index, frames, bool(refs)))
            index += 1
    finally:
        credits.close(call.caller, call.generator)
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # a generator stopped early runs its ``finally`` blocks now, not whenever it is collected
    return index


async def produce_async(values: Any, call: StreamCall, credits: Credits, rt: Runtime) -> int:
    """``produce`` on an asyncio loop: ``values`` may be an async iterable (async generator) or a plain one."""
    async_iterator = values.__aiter__() if hasattr(values, "__aiter__") else None
    iterator = None if async_iterator is not None else _iterator(values)
    credit = credits.open(call.caller, call.generator, call.window)
    index = 0
    try:
        while True:
            while not credit.cancelled and not credit.allows(index):
                if not await credit.wait_async(index, CHECK_CALLER_S) and await asyncio.to_thread(caller_gone, rt, call.caller):
                    credit.stop()
            if credit.cancelled:
                break
            try:
                value = await async_iterator.__anext__() if async_iterator is not None else next(iterator)  # type: ignore[arg-type]
            except (StopIteration, StopAsyncIteration):
                break
            oid = item_id(ObjectId(call.generator), index)
            frames, refs = call.frame(value)
            if refs:
                rt.lend(call.caller, oid, refs)
            if not rt.borrows.settled:
                await asyncio.to_thread(rt.settle_borrows)  # owners answer over the network: never block the loop
            call.send(calls.item_message(call.generator, index, frames, bool(refs)))
            index += 1
    finally:
        credits.close(call.caller, call.generator)
        aclose = getattr(async_iterator, "aclose", None)
        close = getattr(iterator, "close", None)
        if aclose is not None:
            await aclose()
        elif close is not None:
            close()
    return index


def _iterator(values: Any) -> Any:
    try:
        return iter(values)
    except TypeError:
        raise TypeError(f"a streaming call must return a generator or another iterable, not {type(values).__name__}") from None


def _wait_on_credit(credit: Credit, index: int, timeout: float) -> bool:
    return credit.wait(index, timeout)


def caller_gone(rt: Runtime, caller: bytes) -> bool:
    """Whether the process ``caller`` (its identity, the client id) has exited: then nobody will ever ack."""
    try:
        gone = rt.request("gone", ([caller.hex()],), timeout=CHECK_CALLER_S * 5)
    except Exception as exc:  # the node is unreachable: keep waiting, the worker ends with its node anyway
        logger.debug("could not ask the node whether a stream's caller lives: %s", exc)
        return False
    return isinstance(gone, list) and caller.hex() in gone
