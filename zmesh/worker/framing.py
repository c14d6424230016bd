"""How a worker frames what a call or task returned, or raised, into its RESULT entry: shared by actors and tasks."""

from __future__ import annotations

import traceback
from typing import Any

from zmesh.exceptions import TaskError
from zmesh.runtime import Runtime, calls, ownership, segments
from zmesh.transport import serialization

Reply = tuple[tuple[Any, ...], list[Any]]  # a result's batch entry and its frames


def frame_value(
    rt: Runtime, caller: bytes, oids: tuple[Any, ...], where: str, value: Any, kind: str
) -> tuple[bool, list[list[Any]], list[Any]]:
    """(ok, frames of each return value, refs pickled into them); ValueError when the count of values is wrong.

    A large value goes into shared memory held for ``caller``, who owns it: it outlives this worker.
    """
    with ownership.collect() as refs, segments.holding(caller.hex()):
        if len(oids) == 1:
            parts = [serialization.dumps_value(value)]
        else:
            values = _values(value, len(oids), where, kind)
            parts = [serialization.dumps_value(v) for v in values]
    for part in parts:
        rt.check_size(part, f"the result of {where}()")
    return True, parts, refs


def _values(value: Any, expected: int, where: str, kind: str) -> tuple[Any, ...]:
    try:
        values = tuple(value)
    except TypeError:
        raise ValueError(
            f"{kind} {where} declared num_returns={expected} but returned one {type(value).__name__}, not {expected} values"
        ) from None
    if len(values) != expected:
        raise ValueError(f"{kind} {where} declared num_returns={expected} but returned {len(values)} value(s)")
    return values


def error_frames(oids: tuple[Any, ...], where: str, exc: BaseException) -> list[list[Any]]:
    """The frames of the error ``exc`` (raised running ``where``), one copy per result id."""
    message = f"{where} raised {type(exc).__name__}: {exc}"
    error = TaskError.from_cause(exc, message, traceback.format_exc(), where)
    try:
        frames = serialization.dumps_value(error)
    except serialization.SerializationError:
        frames = serialization.dumps_value(TaskError(message, None, traceback.format_exc(), where))
    return [frames for _ in oids]


def reply(
    rt: Runtime,
    identity: bytes,
    oids: tuple[Any, ...],
    ok: bool,
    parts: list[list[Any]],
    refs: list[Any],
    settle: bool = True,
    released: bool = False,
) -> Reply:
    """The result's entry; refs inside it are lent to the caller, and what we borrowed is registered first.

    ``released``: the call's shared-memory arguments were mapped here and are no longer (the caller may reuse them).
    """
    if refs:
        rt.lend(identity, oids[0], refs)
    if settle:
        rt.settle_borrows()
    return calls.result_entry(oids, ok, parts, lent=bool(refs), released=released)
