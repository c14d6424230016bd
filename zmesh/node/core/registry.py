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
_MAX_RELEASED = 10_000


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
class Card:
    """What a ``get_if_exists`` caller needs to reach the holder before gossip shows it: opaque to the home."""

    class_name: str
    origin: str  # the node that took the creation: it knows where the actor is, or will be
    meta: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Granted:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Taken:
    holder: Holder
    card: Card | None = None  # None: the holder is known only from gossip, whose row has the same facts


@dataclasses.dataclass(slots=True)
class _Claim:
    holder: Holder
    card: Card | None
    seen: float  # last time this claim was confirmed (granted, retried, or shown live by gossip)


class Claims:
    """The claims this member decides as the home of some names.

    A claim lives until its actor is released (killed, died, never placed) or, as a safety net for a
    release that never came (its sender died), until the gossip view has not shown the actor for
    ``grace_s`` (``prune``). A released name is free at once: the next claim is granted.
    """

    def __init__(self) -> None:
        self._held: dict[Name, _Claim] = {}
        self._by_actor: dict[str, Name] = {}
        # Actors released lately: gossip may still show them for a round or two, and must not win their name back.
        self._released: dict[str, None] = {}

    def claim(self, name: Name, holder: Holder, known: Holder | None, now: float, card: Card | None = None) -> Granted | Taken:
        """Grant ``name`` to ``holder`` unless a live actor holds it: one we granted, or ``known`` (the gossip view's holder)."""
        held = self._held.get(name)
        if known is not None and known.actor_id in self._released:
            known = None
        if held is None and known is not None and known.actor_id != holder.actor_id:
            self._set(name, _Claim(known, None, now))  # a claim a previous home granted: adopt it
            held = self._held[name]
        if held is not None and held.holder.actor_id != holder.actor_id:
            return Taken(held.holder, held.card)
        self._set(name, _Claim(holder, card if card is not None else (held.card if held else None), now))
        return Granted()

    def _set(self, name: Name, claim: _Claim) -> None:
        old = self._held.get(name)
        if old is not None and old.holder.actor_id != claim.holder.actor_id:
            self._by_actor.pop(old.holder.actor_id, None)
        self._held[name] = claim
        self._by_actor[claim.holder.actor_id] = name

    def release(self, name: Name, actor_id: str) -> bool:
        """The actor holding ``name`` is dead (or was never created): the name is free. Idempotent."""
        self._released[actor_id] = None
        if len(self._released) > _MAX_RELEASED:
            del self._released[next(iter(self._released))]
        held = self._held.get(name)
        if held is not None and held.holder.actor_id == actor_id:
            del self._held[name]
            self._by_actor.pop(actor_id, None)
            return True
        return False

    def release_actor(self, actor_id: str) -> Name | None:
        """Release whatever name ``actor_id`` holds here; the name, or None."""
        name = self._by_actor.get(actor_id)
        if name is not None and self.release(name, actor_id):
            return name
        return None

    def holder(self, name: Name) -> Holder | None:
        held = self._held.get(name)
        return held.holder if held is not None else None

    def card(self, name: Name) -> Card | None:
        held = self._held.get(name)
        return held.card if held is not None else None

    def prune(self, live: Mapping[Name, Holder], now: float, grace_s: float) -> list[Name]:
        """Forget claims whose actor the view has not shown for ``grace_s``; the names freed.

        The grace covers a granted name's trip through gossip: a creation shows in its
        origin's entry from the moment it is accepted, waiting for resources or not.
        """
        freed = []
        for name, held in list(self._held.items()):
            seen = live.get(name)
            if seen is not None and seen.actor_id == held.holder.actor_id:
                held.seen = now
            elif now - held.seen > grace_s:
                self.release(name, held.holder.actor_id)
                freed.append(name)
        return freed

    def __len__(self) -> int:
        return len(self._held)


def pick_winner(holders: Iterable[Holder]) -> Holder:
    """Of several live actors under one name (after a partition healed), the one that keeps it: the oldest."""
    return min(holders, key=lambda h: (h.created_at, h.actor_id))
