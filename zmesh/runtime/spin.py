"""How long a thread waiting for a synchronous call's result polls for it before it sleeps.

Waking a sleeping thread on another core costs more than all the work of a small
call: on a 2-core VM a ZeroMQ round trip takes 55 us within one core and 155 us
across two, and most of the difference is the wake-ups. A caller that polls its
socket for a moment instead of sleeping takes a third off a synchronous call.

Polling is paid in CPU whenever the answer is slow, and two pollers on a small
machine starve the processes they wait for. So a poll that times out makes the
next ``2**k`` waits sleep at once (``k`` grows with each timeout in a row, up to
``MAX_BACKOFF``): a caller of slow methods wastes at most one poll in 65 waits.
One answered poll starts polling every time again.
"""

from __future__ import annotations

import os

# Long enough for a small call on this host or a near one; a failed poll wastes this much CPU.
DEFAULT_LIMIT_NS = 1_000_000
MAX_BACKOFF = 6


def default_limit_ns() -> int:
    """The poll limit for this process: ``ZMESH_SYNC_SPIN_US`` if set, none on a single CPU."""
    configured = os.environ.get("ZMESH_SYNC_SPIN_US")
    if configured is not None:
        try:
            return max(0, int(configured)) * 1000
        except ValueError:
            raise ValueError(f"ZMESH_SYNC_SPIN_US must be a whole number of microseconds, got {configured!r}") from None
    # With one CPU the poller would only delay the process that is to answer.
    return DEFAULT_LIMIT_NS if len(os.sched_getaffinity(0)) > 1 else 0


class SpinPolicy:
    """Decides each wait's poll budget from how the previous polls went.

    Races between threads only blur the counters (each update is one assignment), never break them.
    """

    __slots__ = ("_backoff", "_skip", "answered", "limit_ns", "timed_out")

    def __init__(self, limit_ns: int) -> None:
        self.limit_ns = limit_ns
        self._backoff = 0  # timeouts in a row
        self._skip = 0  # waits left that sleep at once
        self.answered = 0  # polls that got their answer
        self.timed_out = 0  # polls that gave up and slept

    def budget(self) -> int:
        """Nanoseconds the next wait may poll; 0 means sleep at once."""
        if self._skip > 0:
            self._skip -= 1
            return 0
        return self.limit_ns

    def record(self, answered: bool) -> None:
        """Whether the answer came within a poll's budget."""
        if answered:
            self.answered += 1
            self._backoff = 0
        else:
            self.timed_out += 1
            self._backoff = min(self._backoff + 1, MAX_BACKOFF)
            self._skip = 1 << self._backoff
