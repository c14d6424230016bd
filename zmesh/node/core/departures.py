"""Which processes of the mesh have exited: how any node answers "is this owner, borrower or lender gone?". Pure.

A node knows its own clients (connected drivers and workers) and, through gossip,
every other node's; a process listed nowhere has exited. Exits are remembered (and
the recent exits of our own clients gossiped), so the answer is "gone" at once, not
after the grace that covers a process whose node's entry has not arrived yet.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from typing import Any

_MAX_GONE = 20_000
_MAX_MINE = 2_000
_MINE_FOR_S = 60.0
_MAX_UNKNOWN = 10_000


class Departures:
    def __init__(self) -> None:
        self._gone: dict[str, float] = {}  # processes known to have exited, here or elsewhere
        self._mine: dict[str, float] = {}  # our own clients that exited lately: gossiped, so others know at once
        self._unknown_since: dict[str, float] = {}

    def remember(self, peers: Iterable[str], now: float, *, mine: bool = False) -> None:
        for peer in peers:
            if mine:
                self._mine[peer] = now
            if peer not in self._gone or mine:
                self._gone[peer] = now
        while len(self._gone) > _MAX_GONE:
            self._gone.pop(next(iter(self._gone)))
        for peer, since in list(self._mine.items()):
            if now - since > _MINE_FOR_S or len(self._mine) > _MAX_MINE:
                del self._mine[peer]

    def mine(self) -> list[str]:
        """Our clients that exited lately, for our gossip entry."""
        return sorted(self._mine)

    def gone(self, peers: Iterable[Any], live: Container[str], now: float, grace_s: float) -> list[str]:
        """Which of these addresses (or client ids in hex) belong to no live process: ``live`` holds every known one."""
        out = []
        for peer in peers:
            if not isinstance(peer, str) or peer in live:
                continue
            if peer in self._gone:
                out.append(peer)
                continue
            # Not (yet) in any entry: a client of another node that gossip has not shown us yet, or long gone.
            first = self._unknown_since.setdefault(peer, now)
            if len(self._unknown_since) > _MAX_UNKNOWN:
                self._unknown_since.clear()
            if now - first > grace_s:
                out.append(peer)
        return out
