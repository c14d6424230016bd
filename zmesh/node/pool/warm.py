"""Warm workers: forked ahead of demand, connected and waiting, each given to one actor at most, ever.

A creation that finds a warm worker skips the fork, the worker's runtime (its
sockets, its node connection and the node's welcome) and the ``init`` round trip:
the worker's ``init`` request is parked here, and answering it with an actor's
spec is what binds the worker to that actor. From then on it is that actor's
worker like any other, and the pool forgets it. A warm worker has run no user
code and holds no actor's environment (GPUs) before it is bound.

The pool is small, filled only while creations keep coming (a creation within
``idle_s``), and empties itself when they stop: its waiting workers are sent away
(their ``init`` refused, so they exit cleanly). Workers that die before they
park back the refill off, so a worker that cannot start is not forked in a loop.
This module decides; the node does the I/O (spawn requests, answers). Pure: the
clock is passed in.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict
from typing import Any

# Tokens of warm workers start with this; an actor's worker token is "<actor id>.<incarnation>".
PREFIX = "warm."
DEFAULT_SIZE = 4
DEFAULT_IDLE_S = 2.0
# After a warm worker dies before it parks, the next refill waits this long, doubling up to the cap.
_BACKOFF_S = 0.5
_BACKOFF_MAX_S = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class Parked:
    """A warm worker waiting for an actor: where to answer its ``init`` request."""

    token: str
    identity: bytes
    req_id: Any
    pid: int


class WarmPool:
    def __init__(self, size: int = DEFAULT_SIZE, idle_s: float = DEFAULT_IDLE_S, prefix: str = PREFIX) -> None:
        self.size = size
        self.idle_s = idle_s
        self._prefix = prefix
        self._parked: OrderedDict[str, Parked] = OrderedDict()
        self._starting: dict[str, int | None] = {}  # asked of the zygote, not parked yet -> pid once forked
        self._ids = itertools.count(1)
        self._last_demand = float("-inf")
        self._failures = 0
        self._retry_at = float("-inf")

    # --- queries

    def owns(self, token: Any) -> bool:
        """Whether ``token`` names a warm worker (parked, starting or long gone)."""
        return isinstance(token, str) and token.startswith(self._prefix)

    def __len__(self) -> int:
        return len(self._parked)

    def expects(self, token: str) -> bool:
        """Whether the worker of ``token`` was asked for and has not parked yet."""
        return token in self._starting

    def pids(self) -> list[int]:
        """Every live worker of the pool whose pid is known: parked, or forked and not parked yet."""
        return [w.pid for w in self._parked.values()] + [pid for pid in self._starting.values() if pid is not None]

    def describe(self) -> dict[str, Any]:
        return {"size": self.size, "parked": [w.pid for w in self._parked.values()], "starting": len(self._starting)}

    # --- decisions

    def take(self, now: float) -> Parked | None:
        """The longest-waiting parked worker, now bound to the caller's actor and out of the pool; None if none waits."""
        self._last_demand = now
        if not self._parked:
            return None
        return self._parked.popitem(last=False)[1]

    def wanted(self, now: float) -> list[str]:
        """Tokens of the workers to ask the zygote for now: enough to fill the pool while creations keep coming."""
        if self.size <= 0 or now - self._last_demand > self.idle_s or now < self._retry_at:
            return []
        missing = self.size - len(self._parked) - len(self._starting)
        tokens = [f"{self._prefix}{next(self._ids)}" for _ in range(max(0, missing))]
        for token in tokens:
            self._starting[token] = None
        return tokens

    def spawned(self, token: Any, pid: int) -> bool:
        """The zygote forked a worker; True if it is one of ours (False: not a warm token at all)."""
        if not self.owns(token):
            return False
        if token in self._starting:
            self._starting[token] = pid
        return True

    def park(self, worker: Parked, now: float) -> bool:
        """A warm worker asks for its actor. False: not wanted (unknown, or the pool is full or idle): refuse it."""
        if self._starting.pop(worker.token, -1) == -1:
            return False
        self._failures = 0
        if len(self._parked) >= self.size or now - self._last_demand > self.idle_s:
            return False
        self._parked[worker.token] = worker
        return True

    def exited(self, pid: int, now: float) -> bool:
        """A process exited; True if it was a warm worker of the pool (it is forgotten)."""
        for token, worker in self._parked.items():
            if worker.pid == pid:
                del self._parked[token]
                return True
        for token, started in self._starting.items():
            if started == pid:
                # Died before it could park: something keeps workers from starting. Back off before the next.
                del self._starting[token]
                self._retry_at = now + min(_BACKOFF_MAX_S, _BACKOFF_S * 2**self._failures)
                self._failures += 1
                return True
        return False

    def retire(self, now: float) -> list[Parked]:
        """Parked workers to send away: creations stopped coming ``idle_s`` ago."""
        if not self._parked or now - self._last_demand <= self.idle_s:
            return []
        gone = list(self._parked.values())
        self._parked.clear()
        return gone

    def reset(self) -> list[int]:
        """The zygote died, and every worker of the pool with it; returns their pids."""
        pids = self.pids()
        self._parked.clear()
        self._starting.clear()
        return pids
