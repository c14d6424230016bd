"""The vocabulary of SWIM membership: member states, timings, actions, rumors, and the checks every wire field passes. Pure.

Messages are plain dicts; ``k`` is the kind, ``r`` the piggybacked rumors::

    {"k": "ping", "seq": int, "r": [...]}                     answered by an ack; a probe's rumors start
                                                              with the prober's own ALIVE
    {"k": "ack", "seq": int, "r": [...]}
    {"k": "ping_req", "seq": int, "target": id, "address": str, "r": [...]}
    {"k": "nack", "seq": int, "r": [...]}                     the helper got no ack in time
    rumor: [state, node_id, address, incarnation, accuser, weight]   (accuser and weight may be omitted)
    weight: of a DEAD, how many members its declarer held ALIVE (itself included) when it declared it

A refutation, a death and a goodbye are also sent at once to every live
member as ``{"k": "ping", "seq": 0, "r": [rumor]}``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

ALIVE, SUSPECT, DEAD, LEFT = "ALIVE", "SUSPECT", "DEAD", "LEFT"
_STATES = (ALIVE, SUSPECT, DEAD, LEFT)
_LIVE = (ALIVE, SUSPECT)
_RANK = {ALIVE: 0, SUSPECT: 1, DEAD: 2, LEFT: 3}
_KINDS = ("ping", "ack", "ping_req", "nack")

MAX_RUMORS_PER_MESSAGE = 20
# What we accept is looser than what we send, so a peer with other settings is not refused.
_MAX_RUMORS_IN = 100
_MAX_MEMBERS = 100_000  # a peer's rumors cannot grow the table past this
_MAX_RELAYS = 10_000
_MAX_ID = 128
_MAX_ADDRESS = 300
_MAX_INT = 2**62
_SWEEP_S = 1.0  # how often forgotten tombstones are looked for

Rumor = tuple[str, str, str, int, str, int]  # state, node, address, incarnation, accuser, weight


@dataclasses.dataclass(frozen=True, slots=True)
class MembershipTimings:
    probe_interval_s: float = 0.2  # one probe per protocol period
    probe_timeout_s: float = 0.1  # direct ack deadline; then indirect probes until the period ends
    indirect_probes: int = 3
    suspicion_min_s: float = 1.8  # Lifeguard: the timeout shrinks from max toward min with confirmations
    suspicion_max_s: float = 3.6
    suspicion_confirmations: int = 3  # K; min(K, live peers - 1) so that small meshes reach min
    max_local_health: int = 8  # probe interval and timeout are multiplied by (1 + local health)
    lag_tolerance_s: float = 0.25  # a stimulus later than our own deadline by more: our loop stalled
    retransmit_mult: int = 4  # a rumor rides on max(3, ceil(mult * log10(n + 1)) + 1) messages
    tombstone_s: float = 300.0  # dead and left members are remembered this long

    def __post_init__(self) -> None:
        for name in ("probe_interval_s", "probe_timeout_s", "suspicion_min_s", "lag_tolerance_s", "tombstone_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.suspicion_max_s < self.suspicion_min_s:
            raise ValueError(f"suspicion_max_s ({self.suspicion_max_s}) must be >= suspicion_min_s ({self.suspicion_min_s})")
        for name in ("indirect_probes", "suspicion_confirmations", "max_local_health", "retransmit_mult"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


@dataclasses.dataclass(slots=True)
class Member:
    node_id: str
    address: str
    incarnation: int
    state: str
    since: float  # when it entered this state


@dataclasses.dataclass(frozen=True, slots=True)
class Send:
    to: str  # node id
    address: str  # where to connect; "" means "the address you know for ``to``"
    message: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Changed:
    """A member's state changed; ``previous`` is None for a member this node did not know."""

    node_id: str
    address: str
    state: str
    previous: str | None
    incarnation: int


@dataclasses.dataclass(frozen=True, slots=True)
class Buried:
    """The mesh declared this node DEAD at ``incarnation``: it stalled (a freeze, an overloaded host) or was cut off.

    It refutes and rejoins, but whatever it hosted then was buried with it and must stop, as Ray
    makes a node it declared dead exit. A node learns it was buried from a member that hears from it
    while holding it dead, or that sees its refutation override the death. When both sides of a
    partition buried each other, the larger side is the mesh: every DEAD carries the weight of its
    declaration (how many members its declarer still held ALIVE, itself included), and a node alone
    suspects everyone at once, so its declarations weigh 1. The lighter side is buried; an even
    split buries neither (names are then reconciled, see ``docs/mesh.md``).
    """

    incarnation: int


Action = Send | Changed | Buried


@dataclasses.dataclass(slots=True)
class _Probe:
    target: str
    seq: int
    direct_deadline: float
    period_end: float
    indirect: bool = False
    helpers: set[str] = dataclasses.field(default_factory=set)
    nacks: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(slots=True)
class _Suspicion:
    incarnation: int
    start: float
    deadline: float
    accusers: set[str]  # the first one started it; each later one is a confirmation


@dataclasses.dataclass(slots=True)
class _Relay:
    """A ping we send on behalf of a requester's ``ping_req``."""

    requester: str
    requester_seq: int
    target: str
    nack_at: float | None  # None once the nack went out
    expires: float


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(what)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_INT


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _MAX_ID


def _overrides(state: str, incarnation: int, old_state: str, old_incarnation: int) -> bool:
    """SWIM's precedence as one total order, so any delivery order of the same rumors ends alike."""
    return (incarnation, _RANK[state]) > (old_incarnation, _RANK[old_state])


def _parse(message: Any) -> tuple[str, int, list[Rumor], str | None]:
    """Check a whole message before any of it is used: ``(kind, seq, rumors, ping_req target)``."""
    _check(isinstance(message, dict), "a membership message is not a dict")
    kind = message.get("k")
    _check(isinstance(kind, str) and kind in _KINDS, f"unknown membership message kind {str(kind)[:40]!r}")
    seq = message.get("seq")
    _check(_is_int(seq), "seq is not an int in range")
    raw = message.get("r", [])
    _check(isinstance(raw, list | tuple) and len(raw) <= _MAX_RUMORS_IN, f"rumors are not a list of at most {_MAX_RUMORS_IN}")
    rumors = [_rumor(item) for item in raw]
    target = None
    if kind == "ping_req":
        target = message.get("target")
        _check(_is_id(target), "a ping_req's target is not a node id")
        address = message.get("address")
        _check(isinstance(address, str) and len(address) <= _MAX_ADDRESS, "a ping_req's address is not a str")
    return kind, seq, rumors, target


def _rumor(item: Any) -> Rumor:
    _check(isinstance(item, list | tuple) and 4 <= len(item) <= 6, "a rumor is not [state, node, address, incarnation, accuser, weight]")
    state, node_id, address, incarnation = item[:4]
    accuser = item[4] if len(item) >= 5 else ""
    weight = item[5] if len(item) == 6 else 0
    _check(_is_int(weight) and weight <= _MAX_MEMBERS, "a rumor's weight is not a member count")
    _check(isinstance(state, str) and state in _STATES, f"unknown member state {str(state)[:20]!r}")
    _check(_is_id(node_id), "a rumor's node id is not a short str")
    _check(isinstance(address, str) and len(address) <= _MAX_ADDRESS, "a rumor's address is not a short str")
    _check(bool(address) or state not in _LIVE, "a live member's rumor has no address")
    _check(_is_int(incarnation), "a rumor's incarnation is not an int in range")
    _check(isinstance(accuser, str) and len(accuser) <= _MAX_ID, "a rumor's accuser is not a short str")
    return (state, node_id, address, incarnation, accuser, weight)


def wire(rumor: Rumor) -> list[Any]:
    """A rumor as it travels: the weight only where there is one (a DEAD)."""
    return list(rumor) if rumor[5] else list(rumor[:5])


def suspicion_timeout(t: MembershipTimings, live: int, accusers: int) -> float:
    """Lifeguard: from ``suspicion_max_s`` toward ``suspicion_min_s`` as independent accusers confirm (log-scaled)."""
    wanted = min(t.suspicion_confirmations, max(0, live - 1))
    confirmations = max(0, accusers - 1)
    if wanted <= 0:
        return t.suspicion_min_s
    fraction = math.log(min(confirmations, wanted) + 1) / math.log(wanted + 1)
    return max(t.suspicion_min_s, t.suspicion_max_s - (t.suspicion_max_s - t.suspicion_min_s) * fraction)


class RumorQueue:
    """Rumors waiting to be piggybacked, each told a bounded number of times, the least told and newest first."""

    def __init__(self) -> None:
        self._rumors: dict[str, tuple[Rumor, int, int]] = {}  # node id -> (rumor, times sent, generation)
        self._generation = 0

    def spread(self, rumor: Rumor) -> None:
        self._generation += 1
        self._rumors[rumor[1]] = (rumor, 0, self._generation)

    def forget(self, node_id: str) -> None:
        self._rumors.pop(node_id, None)

    def snapshot(self) -> dict[str, tuple[Rumor, int, int]]:
        return dict(self._rumors)

    def take(self, first: list[Rumor], limit: int) -> list[list[Any]]:
        """``first``, then as many queued rumors as a message holds; each is dropped once told ``limit`` times."""
        out = [wire(r) for r in first]
        if not self._rumors:
            return out
        # Least sent first, then newest: a fresh rumor overtakes the ones already told many times.
        chosen = sorted(self._rumors.items(), key=lambda item: (item[1][1], -item[1][2]))[: MAX_RUMORS_PER_MESSAGE - len(out)]
        for node_id, (rumor, sent, generation) in chosen:
            out.append(wire(rumor))
            if sent + 1 >= limit:
                del self._rumors[node_id]
            else:
                self._rumors[node_id] = (rumor, sent + 1, generation)
        return out


class Burials:
    """Who we buried (at which incarnation of ours, with what weight), and whether news of our own death buries us.

    See ``Buried``: news from a member we never held dead at that incarnation buries us (we stalled, or
    were cut off before we could decide anything); news from one we buried too (a partition both sides
    decided) buries us only if its side was the larger, by the weights of the two declarations.
    """

    def __init__(self) -> None:
        self._saw_dead: dict[str, tuple[int, int]] = {}  # node id -> (our incarnation, weight) when we last held it dead
        self._told: dict[str, float] = {}  # node id -> when we last told it that we buried it
        self._buried_at = -1  # the highest incarnation of ours the mesh buried (reported once)

    def saw(self, member: Member, our_incarnation: int, weight: int) -> None:
        if member.state == DEAD:
            self._saw_dead.pop(member.node_id, None)
            self._saw_dead[member.node_id] = (our_incarnation, max(1, weight))
            if len(self._saw_dead) > _MAX_RELAYS:
                del self._saw_dead[next(iter(self._saw_dead))]

    def death_rumor(self, node_id: str, address: str, incarnation: int, me: str) -> list[Any]:
        return [DEAD, node_id, address, incarnation, me, self._saw_dead.get(node_id, (0, 1))[1]]

    def overruled(self, declarer: str, weight: int) -> bool:
        """Whether a death declared by ``declarer`` with ``weight`` is one we overruled: we buried that member
        ourselves with at least that weight (its side of a partition was the lighter). A verdict it makes once it
        is back among us carries the weight of the members it holds alive again, and counts."""
        ours = self._saw_dead.get(declarer)
        return ours is not None and weight <= ours[1]

    def buries_us(self, accuser: str, incarnation: int, weight: int) -> bool:
        if incarnation <= self._buried_at:
            return False  # reported already
        ours = self._saw_dead.get(accuser)
        if ours is not None and ours[0] >= incarnation and weight <= ours[1]:
            return False
        self._buried_at = incarnation
        return True

    def may_tell(self, node_id: str, now: float, interval: float) -> bool:
        if now - self._told.get(node_id, -1e18) < interval:
            return False
        self._told[node_id] = now
        if len(self._told) > _MAX_RELAYS:
            del self._told[next(iter(self._told))]
        return True
