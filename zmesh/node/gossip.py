"""Each node's versioned entry, spread by gossip. Sans I/O.

Every node owns one entry (``data``: resources, actors, clients; opaque
here), ordered by ``(incarnation, version)``. Two mechanisms spread them:

- Deltas (rumor mongering): an entry that changed here, or that we just
  learned, is pushed to ``fanout`` random live peers per round, for a number
  of rounds that grows with log(n); so a change reaches everyone in a few
  rounds while each node sends a handful of messages per round.
- Anti-entropy: every ``sync_interval_s`` a digest ``{node: [incarnation,
  version]}`` goes to one random peer, which answers with the entries the
  asker lacks and asks for the ones it lacks; this repairs whatever deltas lost.

Entries of members that died or left are forgotten and tombstoned with their
incarnation: stale gossip never brings them back.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from typing import Any

from zmesh.node.membership import Send

_MAX_ENTRIES = 100_000


@dataclasses.dataclass(frozen=True, slots=True)
class GossipTimings:
    fanout: int = 3
    round_s: float = 0.1
    sync_interval_s: float = 1.0
    delta_rounds: int = 0  # 0: ceil(retransmit_mult * log10(n + 1)) + 1
    retransmit_mult: int = 2


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


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(what)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


class Gossip:
    def __init__(self, me: str, incarnation: int, data: dict[str, Any], timings: GossipTimings, now: float, rng: random.Random) -> None:
        self.me = me
        self.timings = timings
        self._rng = rng
        self._entries: dict[str, Entry] = {me: Entry(me, incarnation, 1, data)}
        self._tombstones: dict[str, int] = {}
        self._fresh: dict[str, int] = {me: self._rounds()}  # node id -> rounds left to push it
        self._next_round = now
        self._next_sync = now + timings.sync_interval_s * rng.random()
        self.sent = 0  # messages, for the simulation's figures

    # ------------------------------------------------------------------ our own entry

    def set_own(self, data: dict[str, Any], now: float) -> None:
        own = self._entries[self.me]
        own.version += 1
        own.data = data
        self._fresh[self.me] = self._rounds()
        self._next_round = min(self._next_round, now)

    def set_incarnation(self, incarnation: int) -> None:
        own = self._entries[self.me]
        if incarnation > own.incarnation:
            own.incarnation, own.version = incarnation, 1
            self._fresh[self.me] = self._rounds()

    # ------------------------------------------------------------------ views

    def entry(self, node_id: str) -> Entry | None:
        return self._entries.get(node_id)

    def entries(self) -> dict[str, Entry]:
        return dict(self._entries)

    def forget(self, node_id: str, incarnation: int) -> bool:
        if node_id == self.me:
            return False
        self._tombstones[node_id] = max(incarnation, self._tombstones.get(node_id, -1))
        if len(self._tombstones) > _MAX_ENTRIES:
            self._tombstones.pop(next(iter(self._tombstones)))
        self._fresh.pop(node_id, None)
        return self._entries.pop(node_id, None) is not None

    def next_deadline(self) -> float:
        return min(self._next_round if self._fresh else self._next_sync, self._next_sync)

    # ------------------------------------------------------------------ stimuli

    def _rounds(self) -> int:
        if self.timings.delta_rounds:
            return self.timings.delta_rounds
        return math.ceil(self.timings.retransmit_mult * math.log10(len(self._entries) + 2)) + 1

    def tick(self, now: float, peers: Sequence[tuple[str, str]]) -> list[Send]:
        out: list[Send] = []
        if not peers:
            return out
        if self._fresh and now >= self._next_round:
            self._next_round = now + self.timings.round_s
            entries = [self._entries[n].wire() for n in self._fresh if n in self._entries]
            for node_id in list(self._fresh):
                self._fresh[node_id] -= 1
                if self._fresh[node_id] <= 0:
                    del self._fresh[node_id]
            if entries:
                for node_id, address in self._rng.sample(list(peers), min(len(peers), self.timings.fanout)):
                    out.append(Send(node_id, address, {"k": "push", "entries": entries}))
        if now >= self._next_sync:
            self._next_sync = now + self.timings.sync_interval_s
            node_id, address = self._rng.choice(list(peers))
            out.append(self.sync_with(node_id, address))
        self.sent += len(out)
        return out

    def sync_with(self, node_id: str, address: str) -> Send:
        """A digest for one peer: start a push-pull with it now (a member that just joined)."""
        return Send(node_id, address, {"k": "sync", "digest": self._digest()})

    def _digest(self) -> dict[str, list[int]]:
        return {n: [e.incarnation, e.version] for n, e in self._entries.items()}

    def receive(self, sender: str, message: dict[str, Any], now: float) -> tuple[list[Send], list[str]]:
        _check(isinstance(message, dict), "a gossip message is not a dict")
        kind = message.get("k")
        if kind in ("push", "sync_reply"):
            changed = self._merge(message.get("entries"))
            replies: list[Send] = []
            if kind == "sync_reply":
                want: list[str] = message.get("want")  # type: ignore[assignment]  # checked next
                _check(isinstance(want, list) and all(isinstance(n, str) for n in want), "want is not a list of ids")
                entries = [self._entries[n].wire() for n in want[:_MAX_ENTRIES] if n in self._entries]
                if entries:
                    replies.append(Send(sender, "", {"k": "push", "entries": entries}))  # "": the sender's address
            self.sent += len(replies)
            return replies, changed
        if kind == "sync":
            digest: dict[str, Any] = message.get("digest")  # type: ignore[assignment]  # checked next
            _check(isinstance(digest, dict) and len(digest) <= _MAX_ENTRIES, "a digest is not a dict")
            theirs: dict[str, tuple[int, int]] = {}
            for node_id, key in digest.items():
                _check(isinstance(node_id, str) and isinstance(key, list) and len(key) == 2 and all(map(_int, key)), "bad digest item")
                theirs[node_id] = (key[0], key[1])
            newer = [e.wire() for n, e in self._entries.items() if theirs.get(n, (-1, -1)) < e.key()]
            want = [n for n, k in theirs.items() if n != self.me and k > self._key_of(n) and self._tombstones.get(n, -1) < k[0]]
            self.sent += 1
            return [Send(sender, "", {"k": "sync_reply", "entries": newer, "want": want})], []
        raise ValueError(f"unknown gossip message kind {str(kind)[:40]!r}")

    def _key_of(self, node_id: str) -> tuple[int, int]:
        entry = self._entries.get(node_id)
        return entry.key() if entry is not None else (-1, -1)

    def _merge(self, entries: Any) -> list[str]:
        _check(isinstance(entries, list) and len(entries) <= _MAX_ENTRIES, "entries are not a list")
        changed = []
        for item in entries:
            _check(isinstance(item, list) and len(item) == 4, "an entry is not [node, incarnation, version, data]")
            node_id, incarnation, version, data = item
            _check(isinstance(node_id, str) and 0 < len(node_id) <= 64, "an entry's node id is not a short str")
            _check(_int(incarnation) and _int(version) and isinstance(data, dict), "an entry's version or data is malformed")
            if node_id == self.me or self._tombstones.get(node_id, -1) >= incarnation:
                continue  # we own ours; the dead stay dead
            if (incarnation, version) <= self._key_of(node_id):
                continue
            if node_id not in self._entries and len(self._entries) >= _MAX_ENTRIES:
                continue
            self._entries[node_id] = Entry(node_id, incarnation, version, data)
            self._fresh[node_id] = self._rounds()
            changed.append(node_id)
        return changed
