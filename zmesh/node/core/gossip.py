"""Each node's versioned entry, spread by gossip. Sans I/O.

Every node owns one entry (``data``: resources, actors, clients; opaque
here), ordered by ``(incarnation, version)``: the higher wins, and an entry
never goes backwards. Two mechanisms spread them:

- Deltas (rumor mongering): an entry that changed here, or that we just
  learned, is pushed to ``fanout`` random live peers per round, for a number
  of rounds that grows with log(n); so a change reaches everyone in a few
  rounds while each node sends a handful of messages per round.
- Anti-entropy (push-pull): every ``sync_interval_s`` a digest goes to one
  random peer, which answers with the entries the asker lacks or has older,
  and names the ones it lacks itself; the asker pushes those. This repairs
  whatever the deltas lost.

Entries of members that died or left are forgotten and tombstoned with their
incarnation: stale gossip never brings them back. A node owns its entry and
never takes one for itself from others.

Messages are plain dicts; an entry on the wire is ``[node_id, incarnation,
version, data]``::

    {"k": "push", "entries": [entry, ...]}
    {"k": "sync", "digest": {node_id: [incarnation, version], ...}}
    {"k": "sync_reply", "entries": [entry, ...], "want": [node_id, ...]}   answered by a push

A reply's ``Send.address`` is "" when the sender's address is not known here:
the daemon then uses the one membership knows.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from typing import Any

# One set of wire-field checks for both cores.
from zmesh.node.core.membership import Send, _check, _is_id, _is_int

_MAX_ENTRIES = 100_000  # a peer cannot grow our table (or a reply) past this
_MAX_PUSH = 128  # entries in one delta push; the rest go in the next rounds


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
class Entry:
    node_id: str
    incarnation: int
    version: int
    data: dict[str, Any]

    def key(self) -> tuple[int, int]:
        return (self.incarnation, self.version)

    def wire(self) -> list[Any]:
        return [self.node_id, self.incarnation, self.version, self.data]


class Gossip:
    def __init__(self, me: str, incarnation: int, data: dict[str, Any], timings: GossipTimings, now: float, rng: random.Random) -> None:
        self.me = me
        self.timings = timings
        self._rng = rng
        self._entries: dict[str, Entry] = {me: Entry(me, incarnation, 1, data)}
        self._tombstones: dict[str, int] = {}  # node id -> the incarnation it died at
        self._fresh: dict[str, int] = {me: self._rounds()}  # node id -> rounds left to push it
        self._addresses: dict[str, str] = {}  # the live peers' addresses, as of the last tick that sent
        self._next_round = now
        # A random phase, so that nodes started together do not all sync in the same instant.
        self._next_sync = now + timings.sync_interval_s * rng.random()

    # ------------------------------------------------------------------ our own entry

    def set_own(self, data: dict[str, Any], now: float) -> None:
        """A new version of our entry, pushed from the next round. The core keeps ``data``: do not mutate it."""
        own = self._entries[self.me]
        own.version += 1
        own.data = data
        self._fresh[self.me] = self._rounds()
        self._next_round = min(self._next_round, now)

    def set_incarnation(self, incarnation: int) -> None:
        """Membership refuted a suspicion: our entry restarts at the new incarnation, so none older outranks it."""
        own = self._entries[self.me]
        if incarnation > own.incarnation:
            own.incarnation, own.version = incarnation, 1
            self._fresh[self.me] = self._rounds()

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

    def receive(self, sender: str, message: dict[str, Any], now: float) -> tuple[list[Send], list[str]]:
        """``(replies, node ids whose entry changed)``; raises ValueError, having changed nothing, on a malformed message."""
        _check(isinstance(message, dict), "a gossip message is not a dict")
        kind = message.get("k")
        if kind == "push":
            return [], self._merge(_entries(message.get("entries")))
        if kind == "sync_reply":
            entries = _entries(message.get("entries"))
            want: Any = message.get("want")
            _check(isinstance(want, list) and len(want) <= _MAX_ENTRIES and all(map(_is_id, want)), "want is not a list of node ids")
            changed = self._merge(entries)
            wanted = [self._entries[n].wire() for n in dict.fromkeys(want) if n in self._entries]
            replies = [self._reply(sender, {"k": "push", "entries": wanted})] if wanted else []
            return replies, changed
        if kind == "sync":
            digest: Any = message.get("digest")
            _check(isinstance(digest, dict) and len(digest) <= _MAX_ENTRIES, "a digest is not a dict of at most 100000")
            theirs: dict[str, tuple[int, int]] = {}
            for node_id, key in digest.items():
                _check(_is_id(node_id), "a digest's node id is not a short str")
                _check(isinstance(key, list | tuple) and len(key) == 2 and all(map(_is_int, key)), "a digest item is not [inc, version]")
                theirs[node_id] = (key[0], key[1])
            newer = [e.wire() for n, e in self._entries.items() if n != sender and theirs.get(n, (-1, -1)) < e.key()]
            want = [n for n, key in theirs.items() if n != self.me and key > self._key_of(n) and self._tombstones.get(n, -1) < key[0]]
            return [self._reply(sender, {"k": "sync_reply", "entries": newer, "want": want})], []
        raise ValueError(f"unknown gossip message kind {str(kind)[:40]!r}")

    # ------------------------------------------------------------------ internals

    def _rounds(self) -> int:
        if self.timings.delta_rounds:
            return self.timings.delta_rounds
        return math.ceil(self.timings.retransmit_mult * math.log10(len(self._entries) + 1)) + 1

    def _push(self, peers: Sequence[tuple[str, str]]) -> list[Send]:
        # Most rounds left first: the newest deltas go out before ones already pushed a few times.
        chosen = sorted(self._fresh, key=lambda n: -self._fresh[n])[:_MAX_PUSH]
        entries = [self._entries[n] for n in chosen if n in self._entries]
        for node_id in chosen:
            self._fresh[node_id] -= 1
            if self._fresh[node_id] <= 0:
                del self._fresh[node_id]
        out = []
        for node_id, address in self._rng.sample(list(peers), min(len(peers), self.timings.fanout)):
            wire = [e.wire() for e in entries if e.node_id != node_id]  # a node owns its entry: never tell it its own
            if wire:
                out.append(Send(node_id, address, {"k": "push", "entries": wire}))
        return out

    def _reply(self, to: str, message: dict[str, Any]) -> Send:
        return Send(to, self._addresses.get(to, ""), message)

    def _key_of(self, node_id: str) -> tuple[int, int]:
        entry = self._entries.get(node_id)
        return entry.key() if entry is not None else (-1, -1)

    def _merge(self, entries: list[Entry]) -> list[str]:
        changed = []
        for entry in entries:
            node_id = entry.node_id
            if node_id == self.me or self._tombstones.get(node_id, -1) >= entry.incarnation:
                continue  # we own ours; the dead stay dead
            if entry.key() <= self._key_of(node_id):
                continue  # never backwards
            if node_id not in self._entries and len(self._entries) >= _MAX_ENTRIES:
                continue
            self._entries[node_id] = entry
            self._fresh[node_id] = self._rounds()
            if node_id not in changed:
                changed.append(node_id)
        return changed


def _entries(raw: Any) -> list[Entry]:
    """Check a whole list of wire entries before any of it is used."""
    _check(isinstance(raw, list) and len(raw) <= _MAX_ENTRIES, "entries are not a list of at most 100000")
    out = []
    for item in raw:
        _check(isinstance(item, list | tuple) and len(item) == 4, "an entry is not [node, incarnation, version, data]")
        node_id, incarnation, version, data = item
        _check(_is_id(node_id), "an entry's node id is not a short str")
        _check(_is_int(incarnation) and _is_int(version), "an entry's incarnation or version is not an int in range")
        _check(isinstance(data, dict), "an entry's data is not a dict")
        out.append(Entry(node_id, incarnation, version, data))
    return out
