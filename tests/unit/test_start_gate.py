"""The start gate: at most ``limit`` workers between fork and init; the rest wait their turn, in order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.node.pool.gate import StartGate


def _req(token: str) -> dict[str, str]:
    return {"token": token}


def test_a_burst_starts_limit_workers_at_a_time_in_order() -> None:
    gate = StartGate(2, lambda token: True)
    sent = []
    for i in range(5):
        sent += gate.submit(f"t{i}", _req(f"t{i}"))
    assert sent == [_req("t0"), _req("t1")] and len(gate) == 3
    assert gate.started("t0") == [_req("t2")]
    assert gate.started("t0") == []  # said twice: counted once
    gate.spawned("t1", 11)
    assert gate.exited(11) == [_req("t3")]  # died before its init: its turn passes on
    assert gate.exited(999) == []
    assert gate.started("t2") == [_req("t4")]
    assert len(gate) == 0


def test_a_request_whose_actor_died_while_it_waited_is_never_sent() -> None:
    dead = {"t1"}
    gate = StartGate(1, lambda token: token not in dead)
    assert gate.submit("t0", _req("t0")) == [_req("t0")]
    gate.submit("t1", _req("t1"))
    gate.submit("t2", _req("t2"))
    assert gate.started("t0") == [_req("t2")]


def test_a_dead_zygote_forgets_what_was_queued_and_starting() -> None:
    gate = StartGate(1, lambda token: True)
    gate.submit("t0", _req("t0"))
    gate.submit("t1", _req("t1"))
    gate.reset()
    assert len(gate) == 0
    assert gate.submit("t2", _req("t2")) == [_req("t2")]  # the old one no longer holds the only turn


def test_limit_zero_means_no_limit() -> None:
    gate = StartGate(0, lambda token: True)
    assert len([r for i in range(50) for r in gate.submit(f"t{i}", _req(f"t{i}"))]) == 50


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 4), events=st.lists(st.sampled_from(["submit", "start", "die"]), max_size=80))
def test_never_more_than_limit_start_and_every_request_is_sent_once(limit: int, events: list[str]) -> None:
    gate = StartGate(limit, lambda token: True)
    submitted: list[str] = []
    sent: list[str] = []
    starting: list[str] = []
    for i, event in enumerate(events):
        if event == "submit":
            submitted.append(f"t{i}")
            out = gate.submit(f"t{i}", _req(f"t{i}"))
        elif starting and event == "start":
            out = gate.started(starting.pop(0))
        elif starting and event == "die":
            token = starting.pop()
            gate.spawned(token, i)
            out = gate.exited(i)
        else:
            continue
        tokens = [r["token"] for r in out]
        sent += tokens
        starting += tokens
        assert len(starting) <= limit
    assert sent == submitted[: len(sent)]  # in order, none twice
    assert len(sent) == len(submitted) or len(starting) == limit
