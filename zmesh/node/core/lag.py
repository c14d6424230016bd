"""The node loop's own lag: how late it wakes and how long it is busy, over a short recent window.

A Python process does stall (GC, a busy interpreter, a loaded machine, SIGSTOP); the node
reports by how much, so a user reading ``zmesh status`` can tell a slow node from a slow
network. Pure: the caller passes every time (``time.monotonic()`` seconds).
"""

from __future__ import annotations

import math
from collections import deque

# 60 s of history; at most 4,096 samples of it for the percentiles (a busy loop turns thousands of
# times a second), while the maximum is kept per second and so stays exact over the whole window.
WINDOW_S = 60.0
MAX_SAMPLES = 4096


class Window:
    """Recent samples of one duration (seconds): p50, p99 and max over the last ``window_s`` seconds."""

    def __init__(self, window_s: float = WINDOW_S, max_samples: int = MAX_SAMPLES) -> None:
        if not window_s > 0 or max_samples < 1:
            raise ValueError(f"a lag window needs window_s > 0 and max_samples >= 1, got {window_s!r}, {max_samples!r}")
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._peaks: deque[list[float]] = deque()  # [second, max of that second], oldest first

    def add(self, now: float, value: float) -> None:
        value = max(0.0, value)
        self._samples.append((now, value))
        second = math.floor(now)
        if self._peaks and self._peaks[-1][0] == second:
            self._peaks[-1][1] = max(self._peaks[-1][1], value)
        else:
            self._peaks.append([second, value])
        self._trim(now)

    def _trim(self, now: float) -> None:
        start = now - self.window_s
        while self._samples and self._samples[0][0] < start:
            self._samples.popleft()
        # A second is dropped once all of it is out of the window.
        while self._peaks and self._peaks[0][0] + 1 <= start:
            self._peaks.popleft()

    def summary(self, now: float) -> dict[str, float]:
        """``{"p50", "p99", "max"}`` in milliseconds over the window (0.0 with no sample in it)."""
        self._trim(now)
        values = sorted(v for _, v in self._samples)
        peak = max((p[1] for p in self._peaks), default=0.0)
        return {"p50": _ms(_rank(values, 0.50)), "p99": _ms(_rank(values, 0.99)), "max": _ms(peak)}

    def __len__(self) -> int:
        return len(self._samples)


def _rank(ordered: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ``ordered`` (sorted), 0.0 when empty."""
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class LoopLag:
    """One event loop's lag: each iteration says when it was due to wake, when it woke, and when it was done.

    *Late* is how far past its deadline the loop woke (0 when an event woke it before); *busy* is
    how long it then worked before it could wait again. A message that arrives waits for both.
    """

    def __init__(self, window_s: float = WINDOW_S, max_samples: int = MAX_SAMPLES) -> None:
        self.late = Window(window_s, max_samples)
        self.busy = Window(window_s, max_samples)

    def iteration(self, due: float, woke: float, done: float) -> None:
        self.late.add(woke, woke - due)
        self.busy.add(done, done - woke)

    def summary(self, now: float) -> dict[str, dict[str, float]]:
        """What ``status()`` shows: ``{"loop_lag_ms": {...}, "loop_busy_ms": {...}}``, each p50/p99/max."""
        return {"loop_lag_ms": self.late.summary(now), "loop_busy_ms": self.busy.summary(now)}
