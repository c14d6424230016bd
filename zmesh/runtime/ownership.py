"""Ownership-based reference counting across processes: who still holds a reference to what.

A value lives in its owner's process (``put``, or the caller of a method) until no
reference to it is left anywhere. The owner counts its own ``ObjectRef``s and
knows the *borrowers*: processes that told it (BORROW) they keep a reference,
until they tell it they dropped the last one (UNBORROW) or die. As in Ray, a
process that hands a reference to another keeps its own until the receiver had
the chance to register:

- call arguments: the caller keeps every ref pickled into a call until its
  result arrives (``Call.keep``); the worker registers what it still holds
  before it sends the result;
- return values: the worker keeps the refs pickled into a result (*lent* to the
  caller) until the caller says it is done with that result (RELEASE_LENT);
- put values: the owner keeps the refs pickled into the value as long as the
  value lives.

A reference that arrives and is dropped before such a moment (the usual fate of
a top-level argument, which arrives as its value) costs no message. The rule
that makes the hand-over safe: a process registers every foreign reference it
still holds, and waits for the owners' acknowledgements, before it sends any
message that lets another process let go (a result, RELEASE_LENT, UNBORROW).

``Borrows`` below is that protocol for one process, without I/O: events in,
messages out. The owner's side is the borrower set on each owned entry
(``objects.Entry.borrowers``). Designed for the mesh: an owner on another node
is reached the same way, and a borrower's death comes from membership.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from zmesh.transport import protocol
from zmesh.transport.ids import ObjectId


@dataclasses.dataclass
class Outgoing:
    """A message to send: ``frames`` to the process at ``address``."""

    address: str
    frames: list[Any]


class Borrows:
    """This process's side as a borrower of other processes' objects."""

    def __init__(self, me: str) -> None:
        self.me = me  # this process's address: owners count borrowers by it
        self.unregistered: dict[ObjectId, str] = {}  # held here, owner not told yet
        self.awaiting: dict[ObjectId, str] = {}  # BORROW sent, no answer yet
        self.registered: dict[ObjectId, str] = {}  # the owner counts us
        self._dropped_while_awaiting: set[ObjectId] = set()
        self._deferred: list[Outgoing] = []  # messages that let others let go: sent once nothing is awaited

    # --- local references (the runtime calls these as its counts cross zero)

    def held(self, oid: ObjectId, owner: str) -> None:
        """The first local reference to a foreign object appeared."""
        if oid in self.registered or oid in self.awaiting:
            self._dropped_while_awaiting.discard(oid)
            return
        self.unregistered[oid] = owner

    def dropped(self, oid: ObjectId) -> list[Outgoing]:
        """The last local reference to a foreign object is gone."""
        if self.unregistered.pop(oid, None) is not None:
            return []  # the owner never heard of us: nothing to take back
        if oid in self.awaiting:
            self._dropped_while_awaiting.add(oid)  # take it back once the owner has answered
            return []
        owner = self.registered.pop(oid, None)
        if owner is None:
            return []
        return self.letting_go(Outgoing(owner, protocol.encode(protocol.UNBORROW, (oid, self.me))))

    # --- hand-over points

    def register(self) -> list[Outgoing]:
        """BORROW every foreign object held but not yet registered; answers arrive through ``answered``."""
        out = []
        for oid, owner in self.unregistered.items():
            self.awaiting[oid] = owner
            out.append(Outgoing(owner, protocol.encode(protocol.BORROW, (oid, self.me))))
        self.unregistered.clear()
        return out

    @property
    def settled(self) -> bool:
        """Whether every owner has answered: a message that lets others let go may leave now."""
        return not self.unregistered and not self.awaiting

    def letting_go(self, message: Outgoing) -> list[Outgoing]:
        """Send ``message`` (it lets another process drop references) once registrations are settled."""
        out = self.register()
        if self.settled:
            return [*out, message]
        self._deferred.append(message)
        return out

    def answered(self, oid: ObjectId, ok: bool) -> list[Outgoing]:
        """The owner answered our BORROW (``ok`` False: it had already freed the object)."""
        owner = self.awaiting.pop(oid, None)
        out: list[Outgoing] = []
        if owner is not None and ok:
            if oid in self._dropped_while_awaiting:
                out.append(Outgoing(owner, protocol.encode(protocol.UNBORROW, (oid, self.me))))
            else:
                self.registered[oid] = owner
        self._dropped_while_awaiting.discard(oid)
        if self.settled and self._deferred:
            out.extend(self._deferred)
            self._deferred = []
        return out

    def owner_gone(self, owner: str) -> list[Outgoing]:
        """An owner died: nothing is owed to it, and nothing waits for its answers any more."""
        for table in (self.unregistered, self.registered):
            for oid in [o for o, a in table.items() if a == owner]:
                del table[oid]
        out: list[Outgoing] = []
        for oid in [o for o, a in self.awaiting.items() if a == owner]:
            out.extend(self.answered(oid, False))
        return out

    def __len__(self) -> int:
        return len(self.unregistered) + len(self.awaiting) + len(self.registered)


# --- which refs a serialization pickled


_collecting = threading.local()


# Lower-case: used as ``with ownership.collect() as refs:``; a class is cheaper than a generator on the call path.
class collect:
    """Collect the ObjectRefs pickled in this thread while the block runs (see ``ObjectRef.__reduce__``)."""

    __slots__ = ("_outer", "refs")

    def __enter__(self) -> list[Any]:
        self._outer = getattr(_collecting, "refs", None)
        self.refs: list[Any] = []
        _collecting.refs = self.refs
        return self.refs

    def __exit__(self, *exc: object) -> None:
        _collecting.refs = self._outer
        if self._outer is not None:
            self._outer.extend(self.refs)


def pickled(ref: Any) -> None:
    """Called by ``ObjectRef.__reduce__``: the ref is being sent somewhere; whoever collects keeps it alive."""
    refs = getattr(_collecting, "refs", None)
    if refs is not None:
        refs.append(ref)
