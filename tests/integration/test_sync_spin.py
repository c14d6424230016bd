"""A thread waiting for a synchronous call's result polls for it briefly (runtime/spin.py).

The policy is pure and tested alone; the polling itself through real worker processes,
with call durations drawn on both sides of the poll limit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zmesh
from zmesh import runtime as runtime_mod
from zmesh.exceptions import ActorDiedError
from zmesh.runtime.spin import MAX_BACKOFF, SpinPolicy, default_limit_ns

LIMIT_NS = 2_000_000


@given(st.lists(st.booleans(), max_size=500))
def test_polls_that_time_out_are_rare_and_one_answer_restores_polling(outcomes: list[bool]) -> None:
    policy = SpinPolicy(LIMIT_NS)
    timeouts_in_a_row = 0
    spins_in_run = 0
    waits_in_run = 0
    for answered in outcomes:
        budget = policy.budget()
        if timeouts_in_a_row == 0:
            assert budget == LIMIT_NS  # after an answer (or at first) every wait polls
        if budget == 0:
            waits_in_run += 1
            continue
        policy.record(answered)
        if answered:
            timeouts_in_a_row = spins_in_run = waits_in_run = 0
        else:
            timeouts_in_a_row += 1
            spins_in_run += 1
            waits_in_run += 1
            # Slow answers cost one poll per 2**MAX_BACKOFF + 1 waits at most, after the first few.
            assert spins_in_run <= MAX_BACKOFF + 1 + waits_in_run // (2**MAX_BACKOFF + 1)
    assert policy.answered + policy.timed_out <= len(outcomes)


def test_a_zero_limit_never_polls() -> None:
    policy = SpinPolicy(0)
    assert [policy.budget() for _ in range(5)] == [0] * 5


def test_the_limit_is_configurable_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZMESH_SYNC_SPIN_US", "250")
    assert default_limit_ns() == 250_000
    monkeypatch.setenv("ZMESH_SYNC_SPIN_US", "0")
    assert default_limit_ns() == 0
    monkeypatch.setenv("ZMESH_SYNC_SPIN_US", "soon")
    with pytest.raises(ValueError, match="ZMESH_SYNC_SPIN_US"):
        default_limit_ns()


@zmesh.remote
class Sleeper:
    def __init__(self) -> None:
        self.calls = 0

    def nap(self, seconds: float, tag: int) -> tuple[int, int]:
        time.sleep(seconds)
        self.calls += 1
        return tag, self.calls


@pytest.fixture
def polling(local: None) -> Iterator[SpinPolicy]:
    """The driver's poll policy, with a known limit: the tests draw durations around it."""
    rt = runtime_mod.current()
    assert rt is not None
    saved = rt.actor_calls._spin
    rt.actor_calls._spin = SpinPolicy(LIMIT_NS)
    yield rt.actor_calls._spin
    rt.actor_calls._spin = saved


# One fixture for every drawn example is what we want: the policy carries over between them, as in a real driver.
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([0.0, 0.0005, 0.0019, 0.0021, 0.004]), min_size=1, max_size=12))
def test_sync_calls_on_both_sides_of_the_poll_limit_answer_in_order(polling: SpinPolicy, naps: list[float]) -> None:
    actor = Sleeper.remote()
    try:
        for tag, seconds in enumerate(naps, 1):
            assert zmesh.get(actor.nap.remote(seconds, tag), timeout=30) == (tag, tag)
    finally:
        zmesh.kill(actor)


def test_fast_sync_calls_are_answered_to_the_polling_thread(polling: SpinPolicy) -> None:
    actor = Sleeper.remote()
    for tag in range(1, 201):
        assert zmesh.get(actor.nap.remote(0, tag), timeout=30) == (tag, tag)
    # On a loaded machine some answers take longer than the limit (and back off the next polls); many must not.
    assert polling.answered >= 20, (polling.answered, polling.timed_out)
    zmesh.kill(actor)


def test_an_actor_killed_while_its_caller_polls_fails_the_call(polling: SpinPolicy) -> None:
    actor = Sleeper.remote()
    assert zmesh.get(actor.nap.remote(0, 1), timeout=30) == (1, 1)
    ref = actor.nap.remote(60, 2)
    killer = threading.Timer(0.0005, zmesh.kill, (actor,))
    killer.start()
    with pytest.raises(ActorDiedError):
        zmesh.get(ref, timeout=30)
    killer.join(30)  # the death can reach us before the answer to the kill does


def test_threads_calling_at_once_share_the_poll_and_lose_nothing(polling: SpinPolicy) -> None:
    actors = [Sleeper.remote() for _ in range(3)]
    errors: list[BaseException] = []

    def caller(actor: object, naps: list[float]) -> None:
        try:
            for tag, seconds in enumerate(naps, 1):
                assert zmesh.get(actor.nap.remote(seconds, tag), timeout=30) == (tag, tag)  # type: ignore[attr-defined]
        except BaseException as exc:  # reported below, in the test's own thread
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(a, [0.0, 0.0021, 0.0005] * 20)) for a in actors]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    for a in actors:
        zmesh.kill(a)
