"""How many workers start at once: the rest of a burst waits its turn in the node, not in the kernel's run queue.

Starting a worker (fork, its runtime, its node connection) is nearly all CPU,
and page faults shared by every process of the host. Two hundred workers forked at
once on two cores make each start take a hundred times as long, and thrash: run
queues, TLB shootdowns, page-table locks. So a spawn request goes to the zygote
only while fewer than ``limit`` workers are between their fork and their ``init``
request (as Ray caps its workers' startup concurrency); the others queue here, in
order. Pure: the node sends what this returns.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any


class StartGate:
    """``wanted(token)``: whether a queued request is still worth a fork when its turn comes (its actor may have died)."""

    def __init__(self, limit: int, wanted: Callable[[str], bool]) -> None:
        self.limit = limit
        self._wanted = wanted
        self._queue: deque[tuple[str, dict[str, Any]]] = deque()
        self._starting: OrderedDict[str, int | None] = OrderedDict()  # token -> pid once forked

    def __len__(self) -> int:
        """Spawn requests waiting for their turn."""
        return len(self._queue)

    def submit(self, token: str, request: dict[str, Any]) -> list[dict[str, Any]]:
        """Queue a spawn request; the requests to send now."""
        self._queue.append((token, request))
        return self._release()

    def spawned(self, token: Any, pid: int) -> None:
        if token in self._starting:
            self._starting[token] = pid

    def started(self, token: Any) -> list[dict[str, Any]]:
        """The worker of ``token`` asked for its actor: it is past the costly part. The requests to send now."""
        if self._starting.pop(token, -1) == -1:
            return []
        return self._release()

    def exited(self, pid: int) -> list[dict[str, Any]]:
        """A process exited; if it was still starting, its turn passes on. The requests to send now."""
        for token, started in self._starting.items():
            if started == pid:
                del self._starting[token]
                return self._release()
        return []

    def reset(self) -> None:
        """The zygote died: nothing it was asked for is starting, and the queued requests are the node's to send again."""
        self._queue.clear()
        self._starting.clear()

    def _release(self) -> list[dict[str, Any]]:
        out = []
        while self._queue and (self.limit <= 0 or len(self._starting) < self.limit):
            token, request = self._queue.popleft()
            if self._wanted(token):
                self._starting[token] = None
                out.append(request)
        return out
