"""Each node's versioned entry, spread by gossip as deltas. Sans I/O.

Every node owns one entry (``entry.Entry``: fields plus keyed sections such as
``actors``, values opaque here), ordered by ``(incarnation, version)``: the
higher wins, and an entry never goes backwards. What travels is deltas
(``entry.Delta``): the latest values of what changed between two versions, or
the whole entry. Two mechanisms spread them:

- Rumor mongering: each change of an entry, ours or one we just learned, is
  pushed to ``fanout`` random live peers per round, for a number of rounds
  that grows with log(n). The rumor is the delta of that change: ours from
  the version before it, one we learned as it came. A push carries, per
  entry, the chain of its rumors still alive, oldest first, so a receiver a
  few versions behind catches up from it, and one further behind ignores it.
  So a change reaches everyone in a few rounds, each node sends a handful of
  messages per round, and a steady trickle of changes costs a few items per
  push whatever the entry's size. Rumors are forwarded as they came, not
  recomputed: a receiver only knows that an item changed somewhere in a
  delta's range, so a delta it computed would widen at every hop.
- Anti-entropy (push-pull): every ``sync_interval_s`` a digest goes to one
  random peer, which answers with the delta since the asker's version of each
  entry it has newer (the whole entry when the asker is at another
  incarnation or behind the deletions it still remembers), and names, with
  its own versions, the entries it lacks or has older; the asker pushes those
  deltas. This repairs whatever the rumors lost.

Entries of members that died or left are forgotten and tombstoned with their
incarnation: stale gossip never brings them back. A node owns its entry and
never takes one for itself from others.

Messages are plain dicts; a delta on the wire is ``[node_id, incarnation,
from, to, fields, items, deleted]`` (see ``entry``)::

    {"k": "push", "deltas": [delta, ...]}
    {"k": "sync", "digest": {node_id: [incarnation, version], ...}}
    {"k": "sync_reply", "deltas": [delta, ...], "want": {node_id: [incarnation, version], ...}}   answered by a push

A reply's ``Send.address`` is "" when the sender's address is not known here:
the daemon then uses the one membership knows.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Collection, Sequence
from typing import Any

from zmesh.node.core.entry import Delta, Entry, EntryChange, parse

# One set of wire-field checks for both cores.
from zmesh.node.core.swim import Send, _check, _is_id, _is_int

__all__ = ["Delta", "Entry", "EntryChange", "Gossip", "GossipTimings"]

_MAX_ENTRIES = 100_000  # a peer cannot grow our table (or a reply) past this
_MAX_PUSH = 128  # entries in one delta push; the rest go in the next rounds
_MAX_CHAIN = 16  # rumors of one entry; more are folded into one delta since the oldest (a busy entry)


@dataclasses.dataclass(frozen=True, slots=True)
class GossipTimings:
    fanout: int = 3  # peers a fresh delta is pushed to per round
    round_s: float = 0.1  # how often deltas are pushed
    sync_interval_s: float = 1.0  # a full push-pull with one random peer
    delta_rounds: int = 0  # rounds each delta is pushed; 0: ceil(retransmit_mult * log10(n + 1)) + 1
    retransmit_mult: int = 2  # lower than membership's 4: the periodic sync repairs what deltas miss

    def __post_init__(self) -> None:
        if not (self.round_s > 0 and self.sync_interval_s > 0):
            raise ValueError(f"round_s and sync_interval_s must be > 0, got {self.round_s!r}, {self.sync_interval_s!r}")
        if self.fanout < 1 or self.delta_rounds < 0 or self.retransmit_mult < 0:
            raise ValueError("fanout must be >= 1, delta_rounds and retransmit_mult >= 0")


@dataclasses.dataclass(slots=True)
class _Rumor:
    delta: list[Any] | None  # a wire delta; None: the whole entry, as it is when pushed
    rounds: int  # left to push it


class Gossip:
    def __init__(
        self,
        me: str,
        incarnation: int,
        data: dict[str, Any],
        timings: GossipTimings,
        now: float,
        rng: random.Random,
        sections: Collection[str] = ("actors",),
    ) -> None:
        """``sections``: the top-level keys whose values are dicts gossiped item by item (the rest are fields)."""
        if not all(map(_is_id, sections)):
            raise ValueError(f"section names must be non-empty short strs, got {sections!r}")
        self.me = me
        self.timings = timings
        self.sections = frozenset(sections)
        self._rng = rng
        self._entries: dict[str, Entry] = {me: Entry.own(me, incarnation, data, self.sections)}
        self._tombstones: dict[str, int] = {}  # node id -> the incarnation it died at
        self._fresh: dict[str, list[_Rumor]] = {}  # node id -> the rumors of its entry still pushed, oldest first
        self._rumor(me, None)
        self._addresses: dict[str, str] = {}  # the live peers' addresses, as of the last tick that sent
        self._next_round = now
        # A random phase, so that nodes started together do not all sync in the same instant.
        self._next_sync = now + timings.sync_interval_s * rng.random()

    # ------------------------------------------------------------------ our own entry

    def set_own(self, data: dict[str, Any], now: float) -> None:
        """Our data now: if anything changed, a new version, whose delta is pushed from the next round.

        The core keeps ``data``: do not mutate it. ValueError if peers would refuse it (a section not a dict, a key not a short str).
        """
        own = self._entries[self.me]
        before = own.version
        if own.set_data(data, self.sections):
            self._rumor(self.me, None if before < own.horizon else own.delta(before).wire())
            self._next_round = min(self._next_round, now)

    def set_incarnation(self, incarnation: int) -> None:
        """Membership refuted a suspicion: our entry restarts at the new incarnation, so none older outranks it."""
        own = self._entries[self.me]
        if incarnation > own.incarnation:
            own.restart(incarnation)
            self._rumor(self.me, None)

    # ------------------------------------------------------------------ views

    def entry(self, node_id: str) -> Entry | None:
        return self._entries.get(node_id)

    def entries(self) -> dict[str, Entry]:
        """Every entry known, ours included."""
        return dict(self._entries)

    def forget(self, node_id: str, incarnation: int) -> bool:
        """A member died or left: drop its entry; none at or below ``incarnation`` is taken again."""
        if node_id == self.me:
            return False
        previous = self._tombstones.pop(node_id, -1)  # re-inserted last: the cap below evicts the oldest
        self._tombstones[node_id] = max(incarnation, previous)
        if len(self._tombstones) > _MAX_ENTRIES:
            del self._tombstones[next(iter(self._tombstones))]
        entry = self._entries.get(node_id)
        if entry is None or entry.incarnation > incarnation:
            return False  # already reborn at a higher incarnation: that entry stays
        self._fresh.pop(node_id, None)
        del self._entries[node_id]
        return True

    def next_deadline(self) -> float:
        """When ``tick`` next has work."""
        return min(self._next_round, self._next_sync) if self._fresh else self._next_sync

    # ------------------------------------------------------------------ stimuli

    def tick(self, now: float, peers: Sequence[tuple[str, str]]) -> list[Send]:
        """``peers``: ``(node_id, address)`` of the live members, this node excluded."""
        out: list[Send] = []
        if now >= self._next_round and self._fresh:
            self._next_round = now + self.timings.round_s
            if peers:
                out += self._push(peers)
        if now >= self._next_sync:
            self._next_sync = now + self.timings.sync_interval_s
            if peers:
                node_id, address = peers[self._rng.randrange(len(peers))]
                out.append(self.sync_with(node_id, address))
        if out:
            self._addresses = dict(peers)
        return out

    def sync_with(self, node_id: str, address: str) -> Send:
        """A digest for one peer: a push-pull with it now (a member that just joined)."""
        return Send(node_id, address, {"k": "sync", "digest": {n: [e.incarnation, e.version] for n, e in self._entries.items()}})

    def receive(self, sender: str, message: dict[str, Any], now: float) -> tuple[list[Send], list[EntryChange]]:
        """``(replies, what changed in which entries)``; raises ValueError, having changed nothing, on a malformed message."""
        _check(isinstance(message, dict), "a gossip message is not a dict")
        kind = message.get("k")
        if kind == "push":
            return [], self._merge(self._deltas(message.get("deltas")))
        if kind == "sync_reply":
            deltas = self._deltas(message.get("deltas"))
            want = _digest(message.get("want"), "want")
            changes = self._merge(deltas)
            wanted = [self._delta_for(n, key) for n, key in want.items() if n in self._entries and key < self._entries[n].key()]
            replies = [self._reply(sender, {"k": "push", "deltas": wanted})] if wanted else []
            return replies, changes
        if kind == "sync":
            theirs = _digest(message.get("digest"), "digest")
            newer = [self._delta_for(n, theirs.get(n)) for n, e in self._entries.items() if n != sender and theirs.get(n, (0, 0)) < e.key()]
            lacking = {
                n: list(self._key_of(n))
                for n, key in theirs.items()
                if n != self.me and key > self._key_of(n) and self._tombstones.get(n, -1) < key[0]
            }
            return [self._reply(sender, {"k": "sync_reply", "deltas": newer, "want": lacking})], []
        raise ValueError(f"unknown gossip message kind {str(kind)[:40]!r}")

    # ------------------------------------------------------------------ internals

    def _rounds(self) -> int:
        if self.timings.delta_rounds:
            return self.timings.delta_rounds
        return math.ceil(self.timings.retransmit_mult * math.log10(len(self._entries) + 1)) + 1

    def _rumor(self, node_id: str, delta: list[Any] | None) -> None:
        """An entry changed by ``delta`` (None: it is new, or was replaced whole): push that for a few rounds."""
        rounds = self._rounds()
        chain = self._fresh.setdefault(node_id, [])
        if delta is None:
            chain[:] = [_Rumor(None, rounds)]  # the whole entry covers every older rumor
            return
        chain.append(_Rumor(delta, rounds))
        if len(chain) > _MAX_CHAIN:
            first = chain[0].delta
            folded = self._entries[node_id].delta(first[2] if first is not None else 0)
            chain[:] = [_Rumor(folded.wire() if folded.since else None, rounds)]

    def _push(self, peers: Sequence[tuple[str, str]]) -> list[Send]:
        # Most rounds left first: the newest changes go out before ones already pushed a few times.
        chosen = sorted(self._fresh, key=lambda n: -self._fresh[n][-1].rounds)[:_MAX_PUSH]
        deltas: list[tuple[str, list[Any]]] = []
        for node_id in chosen:
            chain = self._fresh[node_id]
            entry = self._entries.get(node_id)
            if entry is not None and any(r.delta is None for r in chain):
                deltas.append((node_id, entry.delta(0).wire()))
            elif entry is not None:
                deltas += [(node_id, r.delta) for r in chain if r.delta is not None]
            for rumor in chain:
                rumor.rounds -= 1
            while chain and chain[0].rounds <= 0:
                del chain[0]
            if not chain:
                del self._fresh[node_id]
        out = []
        for node_id, address in self._rng.sample(list(peers), min(len(peers), self.timings.fanout)):
            wire = [d for n, d in deltas if n != node_id]  # a node owns its entry: never tell it its own
            if wire:
                out.append(Send(node_id, address, {"k": "push", "deltas": wire}))
        return out

    def _delta_for(self, node_id: str, theirs: tuple[int, int] | None) -> list[Any]:
        """What a peer at ``theirs`` lacks of our entry of ``node_id``: a delta, or all of it at another incarnation."""
        entry = self._entries[node_id]
        since = theirs[1] if theirs is not None and theirs[0] == entry.incarnation else 0
        return entry.delta(since).wire()

    def _reply(self, to: str, message: dict[str, Any]) -> Send:
        return Send(to, self._addresses.get(to, ""), message)

    def _key_of(self, node_id: str) -> tuple[int, int]:
        entry = self._entries.get(node_id)
        return entry.key() if entry is not None else (0, 0)  # versions start at 1: (0, 0) is "none"

    def _deltas(self, raw: Any) -> list[Delta]:
        """Check a whole list of wire deltas before any of it is used."""
        _check(isinstance(raw, list) and len(raw) <= _MAX_ENTRIES, "deltas are not a list of at most 100000")
        return [parse(item, self.sections) for item in raw]

    def _merge(self, deltas: list[Delta]) -> list[EntryChange]:
        changes: dict[str, EntryChange] = {}
        for delta in deltas:
            node_id = delta.node_id
            if node_id == self.me or self._tombstones.get(node_id, -1) >= delta.incarnation:
                continue  # we own ours; the dead stay dead
            entry = self._entries.get(node_id)
            if entry is not None and (delta.incarnation, delta.version) <= entry.key():
                continue  # never backwards (and a delta seen twice changes nothing)
            if delta.since == 0:
                if entry is None and len(self._entries) >= _MAX_ENTRIES:
                    continue
                self._entries[node_id] = Entry.from_full(delta)
                self._rumor(node_id, None)
            elif entry is not None and entry.incarnation == delta.incarnation and delta.since <= entry.version and entry.fits(delta):
                entry.apply(delta)
                self._rumor(node_id, delta.wire())
            else:
                continue  # it starts after the version we have (or would overfill it): the sync repairs that
            change, previous = delta.change(), changes.get(node_id)
            changes[node_id] = change if previous is None else _combine(previous, change)
        return list(changes.values())


def _combine(a: EntryChange, b: EntryChange) -> EntryChange:
    if a.full or b.full:
        return EntryChange(a.node_id, True)
    items = {s: a.items.get(s, frozenset()) | b.items.get(s, frozenset()) for s in {*a.items, *b.items}}
    return EntryChange(a.node_id, False, a.fields | b.fields, items)


def _digest(raw: Any, what: str) -> dict[str, tuple[int, int]]:
    _check(isinstance(raw, dict) and len(raw) <= _MAX_ENTRIES, f"a {what} is not a dict of at most 100000")
    out: dict[str, tuple[int, int]] = {}
    for node_id, key in raw.items():
        _check(_is_id(node_id), f"a {what}'s node id is not a short str")
        _check(isinstance(key, list | tuple) and len(key) == 2 and all(map(_is_int, key)), f"a {what} item is not [inc, version]")
        out[node_id] = (key[0], key[1])
    return out
