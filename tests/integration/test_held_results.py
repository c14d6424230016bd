"""A sequential actor sends the results of a batch's quick calls together, and never holds one long.

Through a real node and worker (executors.Inline): counts drawn around the most results in
one message, durations around the hold limit, and slow calls (sleeping, and busy in Python)
behind quick ones, whose results must arrive while the slow call still runs.
"""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zmesh
from zmesh.worker.executors import _HOLD_MAX, _HOLD_S


@zmesh.remote
class Recorder:
    def __init__(self) -> None:
        self.seen: list[int] = []

    def quick(self, i: int, pause: float = 0.0) -> int:
        if pause:
            time.sleep(pause)
        self.seen.append(i)
        return i

    def nap(self, seconds: float) -> str:
        time.sleep(seconds)
        return "slept"

    def spin(self, seconds: float) -> str:
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # holds the GIL, unlike sleep
            pass
        return "spun"

    def order(self) -> list[int]:
        return self.seen


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from([1, 2, _HOLD_MAX - 1, _HOLD_MAX, _HOLD_MAX + 1, 2 * _HOLD_MAX + 3]),
    st.sampled_from([0.0, _HOLD_S / 2, _HOLD_S * 1.5]),
)
def test_every_result_of_a_pipelined_burst_arrives_in_order(local: None, count: int, pause: float) -> None:
    actor = Recorder.remote()
    try:
        refs = [actor.quick.remote(i, pause if i % 7 == 3 else 0.0) for i in range(count)]
        assert zmesh.get(refs, timeout=60) == list(range(count))
        assert zmesh.get(actor.order.remote(), timeout=30) == list(range(count))
    finally:
        zmesh.kill(actor)


@pytest.mark.parametrize("slow", ["nap", "spin"])
def test_results_before_a_slow_call_arrive_while_it_runs(local: None, slow: str) -> None:
    actor = Recorder.remote()
    assert zmesh.get(actor.quick.remote(-1), timeout=30) == -1  # started, so the burst goes out as one batch
    quick = [actor.quick.remote(i) for i in range(20)]
    long_call = getattr(actor, slow).remote(4.0)
    ready, _ = zmesh.wait(quick, num_returns=len(quick), timeout=2.0)
    assert len(ready) == len(quick)  # not held until the 4-second call ends
    assert zmesh.wait([long_call], timeout=0)[0] == []
    assert zmesh.get(long_call, timeout=30) in ("slept", "spun")
    zmesh.kill(actor)


def test_prints_of_a_call_follow_the_results_of_the_calls_before_it(local: None, capfd: pytest.CaptureFixture[str]) -> None:
    @zmesh.remote
    class Talker:
        def quick(self, i: int) -> int:
            return i

        def say(self, text: str) -> str:
            print(text, flush=True)
            return text

    talker = Talker.remote()
    refs = [talker.quick.remote(i) for i in range(10)]
    said = talker.say.remote("hello from the actor")
    assert zmesh.get([*refs, said], timeout=30) == [*range(10), "hello from the actor"]
    zmesh.testing.wait_for(lambda: "hello from the actor" in capfd.readouterr().out, 5, what="the printed line")
    zmesh.kill(talker)


def test_threads_bursting_at_one_actor_get_all_their_results(local: None) -> None:
    actor = Recorder.remote()
    errors: list[BaseException] = []

    def burst(base: int) -> None:
        try:
            refs = [actor.quick.remote(base + i) for i in range(150)]
            assert zmesh.get(refs, timeout=60) == [base + i for i in range(150)]
        except BaseException as exc:  # reported in the test's own thread
            errors.append(exc)

    threads = [threading.Thread(target=burst, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    zmesh.kill(actor)
