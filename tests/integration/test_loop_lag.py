"""The node measures its own loop lag (late wake-ups, busy turns) over a bounded window; `zmesh status` shows it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zmesh.node.core.lag import LoopLag, Window
from zmesh.testing import NodeProcess

pytestmark = pytest.mark.timeout(60)


def test_an_empty_window_reports_zeros() -> None:
    assert Window().summary(now=100.0) == {"p50": 0.0, "p99": 0.0, "max": 0.0}


def test_percentiles_are_nearest_rank_in_milliseconds() -> None:
    window = Window(window_s=10)
    for i in range(1, 101):  # 1 ms .. 100 ms, one every 10 ms
        window.add(now=i * 0.01, value=i / 1000)
    assert window.summary(now=1.0) == {"p50": 50.0, "p99": 99.0, "max": 100.0}


def test_samples_older_than_the_window_are_forgotten() -> None:
    window = Window(window_s=5)
    window.add(now=0.5, value=2.0)  # a 2 s stall, long ago
    window.add(now=10.0, value=0.001)
    assert window.summary(now=10.0) == {"p50": 1.0, "p99": 1.0, "max": 1.0}
    assert window.summary(now=100.0) == {"p50": 0.0, "p99": 0.0, "max": 0.0}
    assert len(window) == 0


def test_memory_is_bounded_but_the_max_stays_exact_over_the_window() -> None:
    window = Window(window_s=60, max_samples=100)
    window.add(now=1.0, value=0.9)  # one long stall, then many quick turns
    for i in range(10_000):
        window.add(now=2.0 + i * 0.001, value=0.0001)
    assert len(window) == 100
    assert window.summary(now=12.0) == {"p50": 0.1, "p99": 0.1, "max": 900.0}


def test_a_loop_woken_early_is_not_late_and_busy_is_time_spent_working() -> None:
    lag = LoopLag()
    lag.iteration(due=10.5, woke=10.1, done=10.102)  # an event woke it before its deadline
    lag.iteration(due=11.0, woke=11.3, done=11.3)  # it woke 300 ms past its deadline
    summary = lag.summary(now=11.3)
    assert summary["loop_lag_ms"] == {"p50": 0.0, "p99": 300.0, "max": 300.0}
    assert summary["loop_busy_ms"]["max"] == pytest.approx(2.0)


@given(st.lists(st.tuples(st.floats(0, 1000), st.floats(0, 10)), max_size=300), st.floats(1, 120))
def test_summaries_are_ordered_and_within_what_was_fed(samples: list[tuple[float, float]], window_s: float) -> None:
    window = Window(window_s=window_s, max_samples=64)
    for now, value in sorted(samples):
        window.add(now, value)
    now = max((t for t, _ in samples), default=0.0)
    s = window.summary(now)
    assert 0.0 <= s["p50"] <= s["p99"] <= s["max"] <= max((v for _, v in samples), default=0.0) * 1000 + 0.001  # rounded to µs


def _status(node: NodeProcess, *extra: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "zmesh", "status", "--address", node.address, *extra], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_stalled_node_reports_its_lag_in_zmesh_status(isolated_run_dir: Path) -> None:
    node = NodeProcess(str(isolated_run_dir))
    try:
        before = json.loads(_status(node, "--json"))
        for key in ("loop_lag_ms", "loop_busy_ms"):
            p = before[key]
            assert 0.0 <= p["p50"] <= p["p99"] <= p["max"], before[key]
        # The stall itself: a frozen process, as a long GC pause or a descheduled VM would be.
        os.kill(node.pid, signal.SIGSTOP)
        try:
            time.sleep(1.2)
        finally:
            os.kill(node.pid, signal.SIGCONT)
        # Its loop waits at most 0.5 s at a time, so it woke at least 0.7 s past a deadline.
        after = json.loads(_status(node, "--json"))
        assert after["loop_lag_ms"]["max"] >= 600, after["loop_lag_ms"]
        assert "loop lag (last 60 s, ms): late p50" in _status(node)
    finally:
        assert node.stop() == 0
