"""A call runs only on the actor incarnation it names: a worker refuses the rest unrun, and the caller fails them.

Addresses are reused: when an actor dies unseen, a new worker on the same host may
bind its port. These tests play that out by pointing the runtime's idea of an actor's
address (or incarnation) somewhere else, and by talking to workers with a raw DEALER.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

import zmesh
from zmesh.exceptions import ActorDiedError, ActorUnavailableError
from zmesh.runtime import calls
from zmesh.testing import NodeProcess, wait_for
from zmesh.transport import protocol, serialization, sockets
from zmesh.transport.security import Security, resolve_key

# What a call that did not run on its actor fails with: the errors of a dead or restarting actor.
ACTOR_GONE = (ActorDiedError, ActorUnavailableError)


@zmesh.remote
class Counter:
    def __init__(self, start: int = 0) -> None:
        self.value = start

    def add(self, amount: int) -> int:
        self.value += amount
        return self.value

    def get(self) -> int:
        return self.value


@zmesh.remote
class AsyncCounter:
    def __init__(self, start: int = 0) -> None:
        self.value = start

    async def add(self, amount: int) -> int:
        self.value += amount
        return self.value

    async def get(self) -> int:
        return self.value


# Each kind of worker receives calls its own way (sequential: the main thread's call sockets; others: the I/O thread).
KINDS: dict[str, tuple[Any, dict[str, Any]]] = {
    "sequential": (Counter, {}),
    "threaded": (Counter, {"max_concurrency": 2}),
    "async": (AsyncCounter, {}),
}


def _get(ref: Any) -> Any:
    return zmesh.get(ref, timeout=20)


def _conn(handle: Any) -> Any:
    """The runtime's view of the actor behind ``handle``: its address and incarnation."""
    rt = zmesh.runtime.current()
    assert rt is not None
    return rt.actor_calls._actors[handle._zmesh_actor_id]


def _stale_news(handle: Any, address: str | None) -> None:
    """Tell this process, as its node would, that the actor lives at ``address``: news of a world that is gone.

    As after the actor died unseen and another actor's worker bound its address.
    """
    rt = zmesh.runtime.current()
    assert rt is not None
    conn = _conn(handle)
    assert conn.state == "ALIVE" and not conn.inflight and not conn.queue
    rt.actor_calls._on_actor_state(handle._zmesh_actor_id, "ALIVE", conn.incarnation, address, None)
    assert _conn(handle).address == address


def _forge_incarnation(handle: Any, incarnation: int) -> None:
    """Make this process believe the worker of the actor is ``incarnation`` (the node never reports an older one)."""
    rt = zmesh.runtime.current()
    assert rt is not None
    with rt._lock:
        conn = _conn(handle)
        assert conn.state == "ALIVE" and not conn.inflight and not conn.queue
        conn.incarnation = incarnation


# ---------------------------------------------------------------------- a caller's stale view


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_calls_for_an_actor_sent_to_another_actors_address_are_refused(driver: NodeProcess, kind: str) -> None:
    cls, options = KINDS[kind]
    a = cls.options(**options).remote(100)
    b = cls.options(**options).remote(0)
    assert _get(a.get.remote()) == 100 and _get(b.get.remote()) == 0
    a_address = _conn(a).address
    _stale_news(a, _conn(b).address)  # B bound A's old address after A died unseen

    with pytest.raises(ACTOR_GONE, match=a._zmesh_actor_id):
        _get(a.add.remote(1))
    wait_for(lambda: _conn(a).state == "ALIVE" and _conn(a).address == a_address, timeout=20, what="A to be re-resolved")
    _stale_news(a, _conn(b).address)
    refs = [a.add.remote(1) for _ in range(20)]
    answers = []
    for ref in refs:
        try:
            answers.append(_get(ref))
        except ACTOR_GONE:
            answers.append(None)
    assert answers[0] is None  # sent while the view was stale: refused
    ran = [x for x in answers if x is not None]
    assert ran == list(range(101, 101 + len(ran)))  # the rest ran on A once it was re-resolved, never on B

    assert _get(b.get.remote()) == 0  # B never ran a call meant for A
    assert _get(a.get.remote()) == 100 + len(ran)
    assert _conn(a).address == a_address  # the caller asked the node and found A where it is


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_call_tagged_with_an_older_incarnation_is_refused(driver: NodeProcess, kind: str) -> None:
    cls, options = KINDS[kind]
    a = cls.options(max_restarts=1, **options).remote(10)
    assert _get(a.add.remote(1)) == 11
    zmesh.kill(a, no_restart=False)
    assert _get(a.get.remote()) == 10  # restarted: __init__ ran again
    assert _conn(a).incarnation == 1
    _forge_incarnation(a, 0)

    with pytest.raises(ActorUnavailableError, match=a._zmesh_actor_id):
        _get(a.add.remote(5))
    assert _get(a.get.remote()) == 10  # the refused call did not run
    assert _conn(a).incarnation == 1


@pytest.mark.timeout(90)
def test_a_refused_call_with_retries_left_runs_once_on_the_actors_current_incarnation(driver: NodeProcess) -> None:
    a = Counter.options(max_restarts=1, max_task_retries=1).remote(10)
    assert _get(a.add.remote(1)) == 11
    zmesh.kill(a, no_restart=False)
    assert _get(a.get.remote()) == 10
    _forge_incarnation(a, 0)

    assert _get(a.add.remote(5)) == 15  # refused by incarnation 1, re-resolved, sent again: ran once
    assert _get(a.get.remote()) == 15


# ---------------------------------------------------------------------- the worker, from a raw DEALER


@contextmanager
def raw_dealer(handle: Any) -> Iterator[zmq.Socket[Any]]:
    """A bare DEALER to the worker of ``handle``, holding the cluster key (the worst a peer gets past the handshake)."""
    address = _conn(handle).address
    assert address is not None
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    Security(resolve_key()[0]).client(sock)
    sock.connect(sockets.endpoints(address)[0])
    try:
        yield sock
    finally:
        ctx.destroy(linger=0)


def _call_frames(header: tuple[Any, ...], method: str, *args: Any) -> tuple[bytes, list[Any]]:
    oid = os.urandom(16)
    slot, arg_frames = protocol.pack(serialization.dumps_args(args, {}))
    return oid, protocol.encode(protocol.CALL, (*header, ((oid,), method, None, slot)), arg_frames)


def _answer(sock: zmq.Socket[Any], oid: bytes, timeout: float = 10) -> protocol.Message:
    """The first RESULT or REFUSED that answers the call ``oid``."""
    answers: dict[bytes, Callable[[protocol.Message], bool]] = {
        protocol.RESULT: lambda m: any(oid in entry[0] for entry in m.header),
        protocol.REFUSED: lambda m: any(oid in oids for oids in m.header[2:]),
    }
    while True:
        assert sock.poll(int(timeout * 1000), zmq.POLLIN), f"no answer to the call within {timeout} s"
        msg = protocol.decode(sock.recv_multipart())
        if msg.type in answers and answers[msg.type](msg):
            return msg


def _value(msg: protocol.Message) -> Any:
    assert msg.type == protocol.RESULT, msg
    ((_oids, ok, counts, slot),) = msg.header
    frames, _ = protocol.unpack(slot, msg.payload, 0)
    assert ok
    return serialization.loads_value(frames[: counts[0]])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_worker_refuses_calls_for_another_actor_or_incarnation_and_names_each_call(driver: NodeProcess, kind: str) -> None:
    cls, options = KINDS[kind]
    b = cls.options(**options).remote(0)
    assert _get(b.get.remote()) == 0
    me = b._zmesh_actor_id
    with raw_dealer(b) as sock:
        for target in [("0123456789abcdef", 0), (me, 1), (me, 7)]:  # another actor; newer incarnations
            oid, frames = _call_frames(target, "add", 1)
            sock.send_multipart(frames)
            msg = _answer(sock, oid)
            assert msg.type == protocol.REFUSED
            assert calls.split_refusal(msg) == (target, [(oid,)])
        oid, frames = _call_frames((me, 0), "add", 1)
        sock.send_multipart(frames)
        assert _value(_answer(sock, oid)) == 1  # its own target runs: the refusals ran nothing
    assert _get(b.get.remote()) == 1


def _garbage_targets(me: str) -> list[tuple[Any, ...]]:
    entry = ((b"o" * 16,), "add", None, (serialization.dumps_args((1,), {})[0],))
    return [
        (entry,),  # no target at all: the old layout
        (me, entry),  # no incarnation
        ((me, 0), entry),  # the target as one tuple
        (me.encode(), 0, entry),  # actor id as bytes
        (None, 0, entry),
        (7, 0, entry),
        (me, "0", entry),  # incarnation as a string
        (me, -1, entry),
        (me, 0.0, entry),
        (me, True, entry),  # a bool is no incarnation
        (me, None, entry),
        (me, 0),  # a target and no calls
        (me, 0, "not an entry"),
    ]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_garbage_targets_are_dropped_and_counted_and_the_worker_keeps_serving(driver: NodeProcess, kind: str) -> None:
    cls, options = KINDS[kind]
    b = cls.options(**options).remote(0)
    assert _get(b.get.remote()) == 0
    me = b._zmesh_actor_id
    before = zmesh.api._status()["dropped_messages"]
    garbage = _garbage_targets(me)
    with raw_dealer(b) as sock:
        for header in garbage:
            sock.send_multipart(protocol.encode(protocol.CALL, header))
        oid, frames = _call_frames((me, 0), "add", 5)
        sock.send_multipart(frames)
        assert _value(_answer(sock, oid)) == 5  # everything sent before it was handled; none of it ran
    assert _get(b.add.remote(1)) == 6
    wait_for(
        lambda: zmesh.api._status()["dropped_messages"] >= before + len(garbage),
        timeout=20,
        what="the worker to count every malformed target as a dropped message",
    )


# ---------------------------------------------------------------------- the framing on its own

targets = st.tuples(st.sampled_from(["aa", "bb"]), st.integers(min_value=0, max_value=2))
call = st.tuples(
    st.sampled_from(["tcp://a", "tcp://b"]),
    targets,
    st.lists(st.binary(min_size=1, max_size=8), min_size=1, max_size=2).map(tuple),
    st.lists(st.binary(max_size=16), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(call, max_size=60))
def test_no_batch_mixes_targets_and_every_call_keeps_its_target(items: list[Any]) -> None:
    sent: list[tuple[str, Any, int]] = []
    got: list[tuple[str, Any, Any, list[bytes]]] = []

    def send(kind: bytes, dest: Any, target: Any, entries: list[tuple[Any, ...]], payload: list[Any]) -> None:
        wire = [bytes(f) for f in calls.message(kind, entries, payload, target)]
        wire_target, split = calls.split_calls(b"caller", protocol.decode(wire))
        assert wire_target == target  # one target per batch, on the wire as in the batcher
        sent.append((dest, target, len(split)))
        got.extend((dest, wire_target, ids, [bytes(f) for f in args]) for _, ids, _, _, args, _ in split)

    batcher = calls.Batcher(send)
    for dest, target, ids, args in items:
        batcher.add(calls.CALL, dest, *calls.call_entry(ids, "m", None, args), target)
    batcher.flush()
    assert got == [(dest, target, ids, args) for dest, target, ids, args in items]
    # A new batch starts exactly where the destination or the target changes.
    changes = sum(1 for k, item in enumerate(items) if k == 0 or item[:2] != items[k - 1][:2])
    assert len(sent) == changes


@given(st.lists(st.lists(st.binary(min_size=1, max_size=8), min_size=1, max_size=3).map(tuple), min_size=1, max_size=20), targets)
def test_a_refusal_names_its_target_and_every_refused_call(ids: list[tuple[bytes, ...]], target: tuple[str, int]) -> None:
    items: list[calls.CallItem] = [(b"caller", oids, "m", None, [], None) for oids in ids]
    wire = [bytes(f) for f in calls.refusal(target, items)]
    assert calls.split_refusal(protocol.decode(wire)) == (target, ids)


@pytest.mark.parametrize(
    "header",
    [("aa", 0), (("aa", 0), (b"o",)), ("aa", -1, (b"o",)), ("aa", 0, ()), ("aa", 0, (1,)), ("aa", 0, [b"o"]), (b"aa", 0, (b"o",))],
)
def test_malformed_refusals_are_refused(header: tuple[Any, ...]) -> None:
    with pytest.raises(protocol.ProtocolError):
        calls.split_refusal(protocol.decode(protocol.encode(protocol.REFUSED, header)))
