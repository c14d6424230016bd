"""The reference-counting protocol (runtime/ownership.py) on simulated processes and channels, no sockets.

One owner and a few other processes pass one object around as call arguments, keep or
drop it, and exchange the protocol's messages over FIFO channels delivered in any order
hypothesis draws. Safety: the owner never frees the object while anybody holds it or a
call carrying it is in flight. Liveness: once everyone lets go, it is freed and every
table is empty.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.runtime.ownership import Borrows, Outgoing
from zmesh.transport import protocol
from zmesh.transport.ids import ObjectId

X = ObjectId(b"x" * 16)
OWNER = "p0"


@dataclasses.dataclass
class Process:
    name: str
    user: int = 0  # references its code holds and may drop
    keeps: int = 0  # references kept for calls in flight (until their result)
    borrows: Borrows | None = None
    calls: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # calls received, not answered: (caller, id)
    finishing: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # registered, waiting to be settled

    @property
    def local(self) -> int:
        return self.user + self.keeps


class Mesh:
    def __init__(self, size: int) -> None:
        self.procs = {f"p{i}": Process(f"p{i}", borrows=None if i == 0 else Borrows(f"p{i}")) for i in range(size)}
        self.procs[OWNER].user = 1  # the owner's own ref, as after put()
        self.channels: dict[tuple[str, str], deque[tuple[str, Any]]] = {}
        self.borrowers: dict[str, int] = {}
        self.freed = False
        self.next_call = 0

    # --- plumbing

    def send(self, src: str, out: list[Outgoing]) -> None:
        for message in out:
            msg = protocol.decode(message.frames)
            self.channels.setdefault((src, message.address), deque()).append(("proto", msg))

    def gained(self, name: str) -> None:
        proc = self.procs[name]
        if proc.local == 1 and proc.borrows is not None:
            proc.borrows.held(X, OWNER)

    def lost(self, name: str) -> None:
        proc = self.procs[name]
        if proc.local > 0:
            return
        if proc.borrows is not None:
            self.send(name, proc.borrows.dropped(X))
        self.check_free()

    def check_free(self) -> None:
        if self.procs[OWNER].local == 0 and not self.borrowers:
            self.freed = True

    # --- actions

    def actions(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for name, proc in self.procs.items():
            if proc.user > 0:
                out.append(("drop", name))
                out.extend(("call", (name, other)) for other in self.procs if other != name)
            out.extend(("finish", (name, c)) for c in proc.calls)
            if proc.borrows is None or proc.borrows.settled:
                out.extend(("answer", (name, c)) for c in proc.finishing)
        out.extend(("deliver", key) for key, queue in self.channels.items() if queue)
        return out

    def do(self, kind: str, arg: Any) -> None:
        if kind == "drop":
            self.procs[arg].user -= 1
            self.lost(arg)
        elif kind == "call":
            src, dst = arg
            self.procs[src].keeps += 1  # the caller keeps what it pickled until the result
            self.next_call += 1
            self.channels.setdefault((src, dst), deque()).append(("call", (src, self.next_call)))
        elif kind == "finish":  # the method ran; before answering, register what it still holds
            name, c = arg
            proc = self.procs[name]
            proc.calls.remove(c)
            if proc.borrows is not None:
                self.send(name, proc.borrows.register())
            proc.finishing.append(c)
        elif kind == "answer":
            name, (caller, call_id) = arg
            self.procs[name].finishing.remove((caller, call_id))
            self.channels.setdefault((name, caller), deque()).append(("result", call_id))
        elif kind == "deliver":
            src, dst = arg
            what, body = self.channels[arg].popleft()
            self.deliver(src, dst, what, body)

    def deliver(self, src: str, dst: str, what: str, body: Any) -> None:
        proc = self.procs[dst]
        if what == "call":
            assert not self.freed, "a call carried a freed object"
            proc.user += 1  # the argument arrives as a ref its code may keep or drop
            self.gained(dst)
            proc.calls.append(body)
        elif what == "result":
            proc.keeps -= 1
            self.lost(dst)
        elif body.type == protocol.BORROW:
            oid, borrower = body.header
            ok = not self.freed
            if ok:
                self.borrowers[borrower] = self.borrowers.get(borrower, 0) + 1
            self.channels.setdefault((dst, src), deque()).append(("answer", (oid, ok)))
        elif body.type == protocol.UNBORROW:
            _, borrower = body.header
            self.borrowers[borrower] -= 1
            if not self.borrowers[borrower]:
                del self.borrowers[borrower]
            self.check_free()

    def deliver_answer(self, dst: str, body: tuple[bytes, bool]) -> None:
        borrows = self.procs[dst].borrows
        assert borrows is not None
        self.send(dst, borrows.answered(ObjectId(body[0]), body[1]))

    def check(self) -> None:
        if self.freed:
            holders = {n: p.local for n, p in self.procs.items() if p.local}
            in_flight = [m for q in self.channels.values() for m in q if m[0] == "call"]
            assert not holders and not in_flight, f"freed while held: {holders} {in_flight}"


def _step(mesh: Mesh, kind: str, arg: Any) -> None:
    if kind == "deliver" and mesh.channels[arg][0][0] == "answer":
        mesh.deliver_answer(arg[1], mesh.channels[arg].popleft()[1])
    else:
        mesh.do(kind, arg)
    mesh.check()


@settings(max_examples=400, deadline=None)
@given(st.integers(min_value=2, max_value=4), st.lists(st.integers(min_value=0, max_value=10**6), max_size=150))
def test_never_freed_while_held_and_freed_once_nobody_holds_it(size: int, choices: list[int]) -> None:
    mesh = Mesh(size)
    for choice in choices:
        actions = mesh.actions()
        if not actions:
            break
        _step(mesh, *actions[choice % len(actions)])
    # Then everyone lets go: answer every call, drop every ref, deliver every message.
    for _ in range(10_000):
        actions = [a for a in mesh.actions() if a[0] != "call"]
        if not actions:
            break
        _step(mesh, *actions[0])
    assert mesh.freed, "nobody holds the object, yet it was not freed"
    for proc in mesh.procs.values():
        assert proc.local == 0
        if proc.borrows is not None:
            assert len(proc.borrows) == 0 and proc.borrows.settled


def test_a_borrow_dropped_before_the_owner_answered_is_taken_back() -> None:
    b = Borrows("p1")
    b.held(X, OWNER)
    (borrow,) = b.register()
    assert protocol.decode(borrow.frames).type == protocol.BORROW
    assert b.dropped(X) == []  # not yet: the owner has not answered
    (unborrow,) = b.answered(X, True)
    assert protocol.decode(unborrow.frames).type == protocol.UNBORROW and len(b) == 0


def test_letting_go_waits_for_registrations() -> None:
    b = Borrows("p1")
    b.held(X, OWNER)
    release = Outgoing("lender", [b"release"])
    out = b.letting_go(release)
    assert [protocol.decode(m.frames).type for m in out] == [protocol.BORROW]
    assert b.answered(X, True) == [release]


def test_a_dead_owner_settles_what_waited_for_it() -> None:
    b = Borrows("p1")
    b.held(X, OWNER)
    b.register()
    release = Outgoing("lender", [b"release"])
    assert b.letting_go(release) == []
    assert b.owner_gone(OWNER) == [release]
    assert b.settled and len(b) == 0
