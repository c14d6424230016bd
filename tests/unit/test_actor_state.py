"""The caller's per-actor state machine, without any I/O: what each piece of node news does to calls."""

from __future__ import annotations

from zmesh.exceptions import ActorDiedError, ActorUnavailableError
from zmesh.runtime.actors import ALIVE, DEAD, PENDING, ActorConn, Call, apply_state
from zmesh.transport.ids import ActorId, ObjectId


def call(n: int, retries: int = 0) -> Call:
    oid = ObjectId(n.to_bytes(16, "big"))
    return Call((oid,), ((oid,), "f", None, ()), [], retries)


def alive_conn(address: str = "tcp://w1") -> ActorConn:
    conn = ActorConn(ActorId("a1"))
    assert apply_state(conn, ALIVE, 0, address, None) is not None
    return conn


def test_alive_sends_what_was_queued_in_order() -> None:
    conn = ActorConn(ActorId("a1"))
    conn.queue.extend([call(1), call(2), call(3)])
    step = apply_state(conn, ALIVE, 0, "tcp://w1", None)
    assert step is not None
    assert [c.oids for c in step.send] == [call(n).oids for n in (1, 2, 3)]
    assert conn.state is ALIVE and conn.address == "tcp://w1"
    assert list(conn.inflight) == [c.oids[0] for c in step.send]


def test_restart_fails_calls_in_flight_as_unavailable() -> None:
    conn = alive_conn()
    conn.inflight[call(1).oids[0]] = call(1)
    step = apply_state(conn, PENDING, 1, None, None)
    assert step is not None and step.gone == "tcp://w1"
    assert len(step.fail) == 1 and isinstance(step.fail[0][1], ActorUnavailableError)
    assert conn.state is PENDING and conn.address is None


def test_restart_requeues_calls_with_retries_left_ahead_of_newer_ones() -> None:
    conn = alive_conn()
    for c in (call(1, retries=1), call(2, retries=-1)):
        conn.inflight[c.oids[0]] = c
    conn.queue.append(call(3))
    step = apply_state(conn, PENDING, 1, None, None)
    assert step is not None and not step.fail
    assert [c.oids for c in conn.queue] == [call(n).oids for n in (1, 2, 3)]
    assert conn.queue[0].retries_left == 0 and conn.queue[1].retries_left == -1
    step = apply_state(conn, ALIVE, 1, "tcp://w2", None)
    assert step is not None and [c.oids for c in step.send] == [call(n).oids for n in (1, 2, 3)]


def test_death_fails_everything_and_is_final() -> None:
    conn = alive_conn()
    conn.inflight[call(1).oids[0]] = call(1, retries=5)
    step = apply_state(conn, DEAD, 1, None, "killed")
    assert step is not None
    assert all(isinstance(err, ActorDiedError) and "killed" in str(err) for _, err in step.fail)
    assert conn.state is DEAD
    assert apply_state(conn, ALIVE, 2, "tcp://w3", None) is None  # nothing comes back from the dead


def test_stale_news_is_ignored() -> None:
    conn = alive_conn()
    assert apply_state(conn, PENDING, 1, None, None) is not None
    assert apply_state(conn, ALIVE, 0, "tcp://w1", None) is None  # from the previous incarnation
    assert conn.state is PENDING
