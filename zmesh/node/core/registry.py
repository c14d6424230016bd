"""Mesh-unique actor names: each name's home member decides claims. Pure: no I/O, no clock.

The home of ``(namespace, name)`` is the live member with the highest rendezvous
hash of (member, name), so every member that agrees on the live set agrees on
the home without asking anyone, and a membership change moves only the names
of the members that came or went. The home grants the first claim and refuses
the rest; gossip then copies the location everywhere, so lookups are local.
A home that just took over (its predecessor died) still knows every name that
gossip had spread (``Claims.held`` is seeded from the view). Names granted by
two homes during a partition meet again in gossip after it heals:
``pick_winner`` keeps the oldest actor under the name, and the others lose it
(they live on, reachable through their handles).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping

Name = tuple[str, str]  # (namespace, name)


def _score(member: str, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{member}\x00{key}".encode(), digest_size=8).digest(), "big")


def ranked(key: str, members: Iterable[str]) -> list[str]:
    """Members in rendezvous order for ``key``: the first is its home, the next its successor."""
    return sorted(members, key=lambda m: _score(m, key), reverse=True)


def home_of(name: Name, members: Iterable[str]) -> str | None:
    order = ranked(f"{name[0]}\x00{name[1]}", members)
    return order[0] if order else None


@dataclasses.dataclass(frozen=True, slots=True)
class Holder:
    actor_id: str
    created_at: float  # the creator's wall clock: only compared to break a post-partition tie


@dataclasses.dataclass(frozen=True, slots=True)
class Granted:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Taken:
    holder: Holder


class Claims:
    """The claims this member decides as the home of some names."""

    def __init__(self) -> None:
        self._held: dict[Name, tuple[Holder, float]] = {}

    def claim(self, name: Name, holder: Holder, known: Mapping[Name, Holder], now: float) -> Granted | Taken:
        """Grant ``name`` to ``holder`` unless a live actor (ours or in the gossip view ``known``) has it."""
        held = self._held.get(name)
        current = held[0] if held is not None else known.get(name)
        if current is not None and current.actor_id != holder.actor_id:
            self._held[name] = (current, held[1] if held is not None else now)
            return Taken(current)
        self._held[name] = (holder, now)
        return Granted()

    def release(self, name: Name, actor_id: str) -> None:
        if (held := self._held.get(name)) is not None and held[0].actor_id == actor_id:
            del self._held[name]

    def holder(self, name: Name) -> Holder | None:
        held = self._held.get(name)
        return held[0] if held is not None else None

    def prune(self, live: Mapping[Name, Holder], now: float, grace_s: float) -> None:
        """Forget claims whose actor the view does not show (dead, or never created) after ``grace_s``.

        The grace covers a granted name's trip through gossip: a creation shows in its
        origin's entry from the moment it is accepted, waiting for resources or not.
        """
        for name, (held, since) in list(self._held.items()):
            seen = live.get(name)
            if (seen is None or seen.actor_id != held.actor_id) and now - since > grace_s:
                del self._held[name]
            elif seen is not None and seen.actor_id == held.actor_id:
                self._held[name] = (held, now)

    def __len__(self) -> int:
        return len(self._held)


def pick_winner(holders: Iterable[Holder]) -> Holder:
    """Of several live actors under one name (after a partition healed), the one that keeps it: the oldest."""
    return min(holders, key=lambda h: (h.created_at, h.actor_id))
