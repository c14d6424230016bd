"""The warm pool's decisions with a fake clock: refill while creations come, one actor per worker, idle retirement, backoff."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.node.pool.warm import Parked, WarmPool


def _arrive(pool: WarmPool, token: str, pid: int, now: float) -> bool:
    pool.spawned(token, pid)
    return pool.park(Parked(token, token.encode(), 1, pid), now)


def test_nothing_is_forked_before_the_first_creation() -> None:
    pool = WarmPool(size=3, idle_s=2.0)
    assert pool.wanted(0.0) == []
    assert pool.take(0.0) is None  # the first creation finds nothing, but asks for a pool
    tokens = pool.wanted(0.0)
    assert len(tokens) == 3 and all(pool.owns(t) for t in tokens)
    assert pool.wanted(0.1) == []  # already asked for: not twice


def test_a_taken_worker_is_never_given_again() -> None:
    pool = WarmPool(size=2, idle_s=2.0)
    pool.take(0.0)
    tokens = pool.wanted(0.0)
    assert all(_arrive(pool, t, 100 + i, 0.1) for i, t in enumerate(tokens))
    first = pool.take(0.2)
    assert first is not None and first.pid == 100
    assert first.pid not in pool.pids()
    # It asks again (it never would, but a replayed request must not park it): unknown token, refused.
    assert not pool.park(first, 0.3)
    second = pool.take(0.3)
    assert second is not None and second.pid == 101
    assert pool.take(0.4) is None
    assert len(pool.wanted(0.4)) == 2  # refilled


def test_a_surplus_or_unknown_worker_is_refused() -> None:
    pool = WarmPool(size=1, idle_s=2.0)
    pool.take(0.0)
    (token,) = pool.wanted(0.0)
    assert not _arrive(pool, "warm.999", 7, 0.1)  # never asked for
    assert _arrive(pool, token, 8, 0.1)
    assert not pool.park(Parked("not-warm", b"x", 1, 9), 0.1)


def test_waiting_workers_are_sent_away_when_creations_stop() -> None:
    pool = WarmPool(size=2, idle_s=1.0)
    pool.take(0.0)
    tokens = pool.wanted(0.0)
    _arrive(pool, tokens[0], 10, 0.5)
    assert pool.retire(0.9) == []
    gone = pool.retire(1.5)
    assert [w.pid for w in gone] == [10]
    assert pool.wanted(1.5) == []  # no demand: no refill
    assert not _arrive(pool, tokens[1], 11, 1.6)  # started before the pool went idle: refused, it exits
    assert pool.pids() == []


def test_a_worker_that_dies_before_it_parks_backs_the_refill_off() -> None:
    pool = WarmPool(size=1, idle_s=100.0)
    pool.take(0.0)
    (token,) = pool.wanted(0.0)
    pool.spawned(token, 50)
    assert pool.exited(50, 1.0)
    assert pool.wanted(1.0) == []  # backing off
    (token,) = pool.wanted(1.6)
    pool.spawned(token, 51)
    assert pool.exited(51, 2.0)
    assert pool.wanted(2.9) == []  # twice as long
    assert len(pool.wanted(3.1)) == 1
    assert not pool.exited(12345, 3.2)  # not ours


def test_the_zygote_dying_takes_the_whole_pool() -> None:
    pool = WarmPool(size=2, idle_s=5.0)
    pool.take(0.0)
    tokens = pool.wanted(0.0)
    _arrive(pool, tokens[0], 20, 0.1)
    pool.spawned(tokens[1], 21)
    assert sorted(pool.reset()) == [20, 21]
    assert pool.take(0.2) is None
    assert len(pool.wanted(0.2)) == 2


def test_a_pool_of_size_zero_never_forks() -> None:
    pool = WarmPool(size=0, idle_s=5.0)
    assert pool.take(0.0) is None
    assert pool.wanted(0.0) == []


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(0, 4),
    ops=st.lists(st.tuples(st.sampled_from(["take", "tick", "arrive", "exit", "reset"]), st.floats(0, 3)), max_size=60),
)
def test_no_worker_is_ever_given_twice_and_the_pool_stays_bounded(size: int, ops: list[tuple[str, float]]) -> None:
    pool = WarmPool(size=size, idle_s=1.0)
    now = 0.0
    pending: list[str] = []
    pids = iter(range(1000, 10_000))
    given_out: set[int] = set()
    for op, step in ops:
        now += step
        if op == "take":
            worker = pool.take(now)
            if worker is not None:
                assert worker.pid not in given_out
                given_out.add(worker.pid)
        elif op == "tick":
            pending += pool.wanted(now)
            pool.retire(now)
        elif op == "arrive" and pending:
            _arrive(pool, pending.pop(0), next(pids), now)
        elif op == "exit" and pool.pids():
            pool.exited(pool.pids()[0], now)
        elif op == "reset":
            pool.reset()
            pending.clear()
        assert len(pool) <= size
        assert not given_out & set(pool.pids())
