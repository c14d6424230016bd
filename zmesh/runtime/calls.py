"""The call pipeline's framing: calls and results batched per peer on the way out, split on the way in.

Both sides live here so that one module decides where one call's frames end and
the next one's begin. A batch is one message: a header frame holding one entry
per call (or result), then the payload frames the entries point into. Small
frames travel inside their entry (``protocol.pack``), large ones as frames of
their own, which ZeroMQ sends without a copy.

A CALL batch names its target once, ahead of its entries: the actor id and the
incarnation the caller believes the worker at that address hosts. Addresses are
reused (a new worker may bind a dead one's port); the target is what a worker
checks before it runs anything, and a batch meant for another target is answered
with one REFUSED message listing the result ids of its calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zmesh.transport import protocol

# Entries per message: a batch header stays far below protocol.MAX_HEADER_BYTES
# (512 entries with 8 KiB inline each make 4 MiB), and a long stream still flows.
MAX_BATCH = 512

CALL = protocol.CALL
TASK = protocol.TASK
RESULT = protocol.RESULT
REFUSED = protocol.REFUSED

# (actor id, incarnation): the one actor incarnation a CALL batch is meant for
CallTarget = tuple[str, int]

# (caller identity, result object ids, method name, concurrency group, argument frames,
#  window: None for a plain call; for a streaming call, how many items may run ahead of the consumer)
CallItem = tuple[bytes, tuple[bytes, ...], str, "str | None", list[Any], "int | None"]
# (caller identity, result object ids, function key, options, argument frames: the function's own first)
TaskItem = tuple[bytes, tuple[bytes, ...], str, dict[str, Any], list[Any]]
# (result object ids, ok, the frames of each return value, whether the worker lent refs inside it)
ResultItem = tuple[tuple[bytes, ...], bool, list[list[Any]], int]  # (oids, ok, parts, flags)

# send(kind, destination, target (None for results), entries, payload frames)
SendBatch = Callable[[bytes, Any, "CallTarget | None", list[tuple[Any, ...]], list[Any]], None]


def call_entry(
    oids: tuple[bytes, ...], method: str, group: str | None, args: list[Any], window: int | None = None
) -> tuple[tuple[Any, ...], list[Any]]:
    """One call's batch entry and the payload frames it points to; a streaming call's carries its window."""
    slot, frames = protocol.pack(args)
    if window is not None:
        return (oids, method, group, slot, window), frames
    return (oids, method, group, slot), frames


def task_entry(oids: tuple[bytes, ...], fn_key: str, options: dict[str, Any], frames: list[Any]) -> tuple[tuple[Any, ...], list[Any]]:
    """One task's batch entry: ``frames`` are the pickled function (``b""`` once the worker has it), then the arguments."""
    slot, out = protocol.pack(frames)
    return (oids, fn_key, options, slot), out


def split_tasks(identity: bytes, msg: protocol.Message) -> tuple[CallTarget, list[TaskItem]]:
    """The target of one TASK batch (the leased worker's id, 0) and its tasks; ProtocolError if malformed."""
    header = msg.header
    target = _target(header)
    items: list[TaskItem] = []
    payload = msg.payload
    pos = 0
    for index in range(2, len(header)):
        entry = header[index]
        if not isinstance(entry, tuple) or len(entry) != 4:
            raise protocol.ProtocolError("a task entry is not (oids, function key, options, frame count)")
        oids, fn_key, options, slot = entry
        if not _oids_ok(oids) or not isinstance(fn_key, str) or not isinstance(options, dict):
            raise protocol.ProtocolError("a task entry's ids, function key or options are malformed")
        frames, pos = protocol.unpack(slot, payload, pos)
        if not frames:
            raise protocol.ProtocolError("a task entry has no function frame")
        items.append((identity, oids, fn_key, options, frames))
    if pos != len(payload):
        raise protocol.ProtocolError("a task batch has frames no entry accounts for")
    return target, items


# A result entry's flags (its fifth field, absent when none is set).
LENT = 1  # the value holds refs the worker keeps alive for the caller until it sends RELEASE_LENT
ARGS_RELEASED = 2  # the worker mapped the call's shared-memory arguments and no longer does: the caller may reuse them


def result_entry(
    oids: tuple[bytes, ...], ok: bool, parts: list[list[Any]], lent: bool = False, released: bool = False
) -> tuple[tuple[Any, ...], list[Any]]:
    """One result's batch entry (``parts``: the frames of each return value, or of the error per id)."""
    slot, frames = protocol.pack([f for part in parts for f in part])
    entry = (oids, ok, [len(part) for part in parts], slot)
    flags = (LENT if lent else 0) | (ARGS_RELEASED if released else 0)
    return ((*entry, flags) if flags else entry), frames


def message(kind: bytes, entries: list[tuple[Any, ...]], payload: list[Any], target: CallTarget | None = None) -> list[Any]:
    """The frames of one batch; a CALL batch names its ``target`` first."""
    header = tuple(entries) if target is None else (*target, *entries)
    return [protocol.header_frame(kind, header), *payload]


class Batcher:
    """Consecutive entries of one kind for one destination and target leave as one message of at most MAX_BATCH entries."""

    __slots__ = ("_dest", "_entries", "_kind", "_payload", "_send", "_target")

    def __init__(self, send: SendBatch) -> None:
        self._send = send
        self._kind: bytes | None = None
        self._dest: Any = None
        self._target: CallTarget | None = None
        self._entries: list[tuple[Any, ...]] = []
        self._payload: list[Any] = []

    def add(self, kind: bytes, dest: Any, entry: tuple[Any, ...], frames: list[Any], target: CallTarget | None = None) -> None:
        # Two actors may hold one address over time: a batch never mixes their calls.
        if kind is not self._kind or dest != self._dest or target != self._target or len(self._entries) >= MAX_BATCH:
            self.flush()
            self._kind, self._dest, self._target = kind, dest, target
        self._entries.append(entry)
        self._payload.extend(frames)

    def flush(self) -> None:
        if self._entries:
            kind, dest, target, entries, payload = self._kind, self._dest, self._target, self._entries, self._payload
            self._entries, self._payload = [], []
            assert kind is not None
            self._send(kind, dest, target, entries, payload)
        self._kind = self._dest = self._target = None


def _target(header: tuple[Any, ...]) -> CallTarget:
    """The (actor id, incarnation) a CALL or REFUSED header opens with; ProtocolError if it has none."""
    if len(header) < 3:
        raise protocol.ProtocolError("a call batch is not (actor id, incarnation, entry, ...)")
    actor_id, incarnation = header[0], header[1]
    if type(actor_id) is not str or type(incarnation) is not int or incarnation < 0:
        raise protocol.ProtocolError("a call batch's target is not (actor id string, incarnation >= 0)")
    return actor_id, incarnation


def _oids_ok(oids: Any) -> bool:
    return isinstance(oids, tuple) and bool(oids) and all(isinstance(o, bytes) for o in oids)


def split_calls(identity: bytes, msg: protocol.Message) -> tuple[CallTarget, list[CallItem]]:
    """The target of one CALL batch and its calls, in their order; ProtocolError if anything is malformed."""
    header = msg.header
    target = _target(header)
    items: list[CallItem] = []
    payload = msg.payload
    pos = 0
    for index in range(2, len(header)):
        entry = header[index]
        if not isinstance(entry, tuple) or len(entry) not in (4, 5):
            raise protocol.ProtocolError("a call entry is not (oids, method, group, frame count[, window])")
        oids, method, group, slot = entry[:4]
        window = entry[4] if len(entry) == 5 else None
        if window is not None and (type(window) is not int or window < 1 or len(oids) != 1):
            raise protocol.ProtocolError("a streaming call's window is not an int >= 1, or it has more than one result id")
        if not _oids_ok(oids):
            raise protocol.ProtocolError("a call's result ids are not a non-empty tuple of bytes")
        if not isinstance(method, str) or not (group is None or isinstance(group, str)):
            raise protocol.ProtocolError("a call's method or group is not a string")
        frames, pos = protocol.unpack(slot, payload, pos)
        items.append((identity, oids, method, group, frames, window))
    if pos != len(payload):
        raise protocol.ProtocolError("a call batch has frames no entry accounts for")
    return target, items


def refusal(target: CallTarget, items: list[Any], kind: bytes = REFUSED) -> list[Any]:
    """The REFUSED message answering a batch for ``target`` (not the receiver's actor and incarnation): none of it ran.

    ``kind`` RETURNED: tasks a task worker gives back unrun (its running task waits), in the same shape.
    """
    return [protocol.header_frame(kind, (*target, *(item[1] for item in items)))]


def split_refusal(msg: protocol.Message) -> tuple[CallTarget, list[tuple[bytes, ...]]]:
    """The target a worker refused and the result ids of the refused calls; ProtocolError if malformed."""
    header = msg.header
    target = _target(header)
    refused = [header[index] for index in range(2, len(header))]
    if msg.payload or not all(_oids_ok(oids) for oids in refused):
        raise protocol.ProtocolError("a refusal is not (actor id, incarnation, result ids, ...)")
    return target, refused


def split_results(msg: protocol.Message) -> list[ResultItem]:
    """The results of one RESULT batch, each value's frames apart; ProtocolError if malformed."""
    items: list[ResultItem] = []
    payload = msg.payload
    pos = 0
    for entry in msg.header:
        if not isinstance(entry, tuple) or len(entry) not in (4, 5):
            raise protocol.ProtocolError("a result entry is not (oids, ok, frame counts, frames[, lent])")
        oids, ok, counts, slot = entry[:4]
        if not isinstance(oids, tuple) or not oids or not isinstance(counts, list | tuple) or len(counts) != len(oids):
            raise protocol.ProtocolError("a result's ids and frame counts do not match")
        frames, pos = protocol.unpack(slot, payload, pos)
        if not all(type(c) is int and c >= 0 for c in counts) or sum(counts) != len(frames):
            raise protocol.ProtocolError("a result's frame counts do not match its frames")
        parts = []
        start = 0
        for count in counts:
            parts.append(frames[start : start + count])
            start += count
        flags = entry[4] if len(entry) == 5 and type(entry[4]) is int else 0
        items.append((oids, bool(ok), parts, flags))
    if pos != len(payload):
        raise protocol.ProtocolError("a result batch has frames no entry accounts for")
    return items


def item_message(generator: bytes, index: int, frames: list[Any], lent: bool = False) -> list[Any]:
    """The ITEM message carrying a streaming call's ``index``-th value (``lent``: it holds refs the worker keeps)."""
    slot, payload = protocol.pack(frames)
    header = (generator, index, slot, True) if lent else (generator, index, slot)
    return [protocol.header_frame(protocol.ITEM, header), *payload]


def split_item(msg: protocol.Message) -> tuple[bytes, int, list[Any], bool]:
    """(generator id, index, value frames, lent) of one ITEM message; ProtocolError if malformed."""
    header = msg.header
    if len(header) not in (3, 4) or type(header[0]) is not bytes or type(header[1]) is not int or header[1] < 0:
        raise protocol.ProtocolError("an item is not (generator id, index >= 0, frames[, lent])")
    frames, pos = protocol.unpack(header[2], msg.payload, 0)
    if pos != len(msg.payload) or not frames:
        raise protocol.ProtocolError("an item's frames do not match the message")
    return header[0], header[1], frames, len(header) == 4 and header[3] is True


def ack_message(generator: bytes, consumed: int) -> list[Any]:
    """The STREAM_ACK telling a producer how many items were consumed; a negative count stops it."""
    return [protocol.header_frame(protocol.STREAM_ACK, (generator, consumed))]


def split_ack(msg: protocol.Message) -> tuple[bytes, int]:
    """(generator id, consumed) of one STREAM_ACK; ProtocolError if malformed."""
    header = msg.header
    if len(header) != 2 or type(header[0]) is not bytes or type(header[1]) is not int or msg.payload:
        raise protocol.ProtocolError("a stream ack is not (generator id, consumed count)")
    return header[0], header[1]
