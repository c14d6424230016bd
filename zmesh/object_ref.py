"""ObjectRef: a future for a value owned by some zmesh process.

Its module path is part of the wire format (refs are pickled across processes).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Generator
from typing import Any

from zmesh import runtime as runtime_mod
from zmesh.runtime import Runtime, objects, ownership
from zmesh.transport.ids import ObjectId


class ObjectRef:
    """A reference to a value that is, or will be, held by its owner process.

    Hashable, picklable (a copy in another process fetches from the owner) and
    awaitable.
    """

    __slots__ = ("__weakref__", "_rt", "id", "owner")

    def __init__(self, oid: ObjectId, owner: str, rt: Runtime | None) -> None:
        # Internal: the runtime has already counted this reference.
        self.id = oid
        self.owner = owner
        self._rt = rt

    def hex(self) -> str:
        return self.id.hex()

    def __repr__(self) -> str:
        return f"ObjectRef({self.id.hex()})"

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and other.id == self.id

    def __reduce__(self) -> tuple[Any, ...]:
        # Whoever serializes this (a call, a result, a put) keeps the ref alive until the receiver counts it.
        ownership.pickled(self)
        return (_rebuild, (self.id, self.owner))

    def __del__(self) -> None:
        rt = self._rt
        if rt is not None and not rt.closed:
            rt.release(self.id)

    def _runtime(self) -> Runtime:
        rt = self._rt if self._rt is not None and not self._rt.closed else runtime_mod.current()
        if rt is None:
            raise RuntimeError("zmesh is not initialized in this process; call zmesh.init() first")
        return rt

    def future(self) -> concurrent.futures.Future[Any]:
        """A concurrent.futures.Future completed with this ref's value or error."""
        rt = self._runtime()
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        entry = rt.entries_for([(self.id, self.owner)])[0]

        def done() -> None:
            try:
                fut.set_result(rt.value_of(entry))
            except BaseException as exc:
                fut.set_exception(exc)

        rt.objects.add_callback(entry, done)
        return fut

    def __await__(self) -> Generator[Any, None, Any]:
        rt = self._runtime()
        entry = rt.entries_for([(self.id, self.owner)])[0]
        waiter, wake = objects.loop_waiter()
        rt.objects.add_callback(entry, wake)
        yield from waiter.__await__()
        return rt.value_of(entry)


def _rebuild(oid: ObjectId, owner: str) -> ObjectRef:
    rt = runtime_mod.current()
    if rt is not None:
        rt.add_ref(oid, owner)
    return ObjectRef(oid, owner, rt)
