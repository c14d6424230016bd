"""Who is alive: SWIM failure detection with Lifeguard's refinements. Sans I/O.

Events in (``tick``, ``receive``, ``heard_from``, ``add``, ``leave``), with the
clock passed in; actions out (``Send`` a message, ``Changed`` a member's state).

- Each protocol period this node probes one member (a shuffled round-robin).
  No ack within the probe timeout: it asks ``indirect_probes`` others to probe
  it. No ack by the period's end: the member is SUSPECT.
- A suspicion ends in DEAD unless the suspect refutes it by raising its
  incarnation. Lifeguard: the timeout starts at ``suspicion_max_s`` and
  shrinks toward ``suspicion_min_s`` with each independent accuser.
- Membership changes travel as rumors piggybacked on every message, each
  carried a bounded number of times. Precedence is SWIM's: a higher
  incarnation wins; at one incarnation SUSPECT beats ALIVE; DEAD and LEFT beat
  everything at or below theirs and are tombstones: nothing older resurrects.
- Local health (Lifeguard): a node that needed help to probe, or had to
  refute a suspicion of itself, may be the slow one, so its local-health
  multiplier stretches its own probe timeouts. A stimulus that arrives much
  later than this node's own next deadline means *its* loop stalled (GC,
  a busy interpreter, SIGSTOP): the probe that timed out meanwhile is not
  counted and every running suspicion is extended by the stall, so a
  stalled node never accuses healthy peers.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

ALIVE, SUSPECT, DEAD, LEFT = "ALIVE", "SUSPECT", "DEAD", "LEFT"
_STATES = (ALIVE, SUSPECT, DEAD, LEFT)
_RANK = {ALIVE: 0, SUSPECT: 1, DEAD: 2, LEFT: 3}
_MAX_RUMORS = 20  # per message
_MAX_MEMBERS = 100_000  # a peer cannot grow our table past this


@dataclasses.dataclass(frozen=True, slots=True)
class MembershipTimings:
    probe_interval_s: float = 0.2
    probe_timeout_s: float = 0.1
    indirect_probes: int = 3
    suspicion_min_s: float = 1.8
    suspicion_max_s: float = 3.6
    suspicion_confirmations: int = 3
    max_local_health: int = 8
    lag_tolerance_s: float = 0.25
    retransmit_mult: int = 4
    tombstone_s: float = 300.0


@dataclasses.dataclass(slots=True)
class Member:
    node_id: str
    address: str
    incarnation: int
    state: str
    since: float


@dataclasses.dataclass(frozen=True, slots=True)
class Send:
    to: str
    address: str
    message: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Changed:
    node_id: str
    address: str
    state: str
    previous: str | None
    incarnation: int


Action = Send | Changed


@dataclasses.dataclass(slots=True)
class _Probe:
    target: str
    seq: int
    direct_deadline: float
    period_end: float
    indirect: bool = False
    nacks: int = 0


@dataclasses.dataclass(slots=True)
class _Suspicion:
    incarnation: int
    start: float
    deadline: float
    accusers: set[str]


@dataclasses.dataclass(slots=True)
class _Relay:
    requester: str
    seq: int
    deadline: float


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(what)


class Membership:
    def __init__(self, me: str, address: str, timings: MembershipTimings, now: float, rng: random.Random, incarnation: int = 0) -> None:
        self.me = me
        self.address = address
        self.timings = timings
        self.incarnation = incarnation
        self.local_health = 0
        self.declared_dead = 0  # times this node learned others had declared it dead (then refuted)
        self._rng = rng
        self._members: dict[str, Member] = {}
        self._order: list[str] = []
        self._next_probe = now
        self._probe: _Probe | None = None
        self._suspicions: dict[str, _Suspicion] = {}
        self._relays: dict[int, _Relay] = {}
        self._seq = 0
        # node id -> (rumor, times sent): a newer rumor about a node replaces the older one.
        self._rumors: dict[str, tuple[list[Any], int]] = {}
        self._expected = now  # when this node's loop should next have run: lag beyond it is our stall

    # ------------------------------------------------------------------ views

    def members(self) -> list[Member]:
        return list(self._members.values())

    def get(self, node_id: str) -> Member | None:
        return self._members.get(node_id)

    def live(self) -> list[Member]:
        return [m for m in self._members.values() if m.state in (ALIVE, SUSPECT)]

    def _scale(self) -> float:
        return 1 + self.local_health

    def next_deadline(self) -> float:
        deadlines = [self._next_probe]
        if self._probe is not None:
            deadlines.append(self._probe.period_end if self._probe.indirect else self._probe.direct_deadline)
        deadlines.extend(s.deadline for s in self._suspicions.values())
        deadlines.extend(r.deadline for r in self._relays.values())
        return min(deadlines)

    # ------------------------------------------------------------------ stimuli

    def add(self, node_id: str, address: str, incarnation: int, now: float) -> list[Action]:
        """A peer proven by an authenticated hello."""
        self._stalled(now)
        if node_id == self.me:
            return []
        return self._apply([ALIVE, node_id, address, incarnation, self.me], now, direct=True)

    def heard_from(self, sender: str, now: float) -> list[Action]:
        self._stalled(now)
        probe = self._probe
        if probe is not None and probe.target == sender:
            self._acked(now)
        return []

    def disconnected(self, node_id: str, now: float) -> list[Action]:
        """The transport saw the connection drop: probe it next, never more than that."""
        member = self._members.get(node_id)
        if member is not None and member.state == ALIVE and node_id in self._order:
            self._order.remove(node_id)
            self._order.append(node_id)
            if self._probe is None:
                self._next_probe = min(self._next_probe, now)
        return []

    def tick(self, now: float) -> list[Action]:
        self._stalled(now)
        out: list[Action] = []
        probe = self._probe
        if probe is not None:
            target = self._members.get(probe.target)
            if target is None or target.state not in (ALIVE, SUSPECT):
                self._probe = None
            elif not probe.indirect and now >= probe.direct_deadline:
                probe.indirect = True
                helpers = [m for m in self.live() if m.node_id != probe.target]
                for helper in self._rng.sample(helpers, min(len(helpers), self.timings.indirect_probes)):
                    out.append(self._send(helper, {"k": "ping_req", "seq": probe.seq, "target": target.node_id, "address": target.address}))
            elif probe.indirect and now >= probe.period_end:
                self._probe = None
                if probe.nacks == 0 and len(self.live()) > 1:
                    self._raise_health()  # nobody answered us at all: maybe we are the slow one
                accusation = [SUSPECT, target.node_id, target.address, target.incarnation, self.me]
                if target.state == ALIVE:
                    out += self._apply(accusation, now, direct=True)
                elif self.me not in self._suspicions.get(target.node_id, _NO_SUSPICION).accusers:
                    # Our own failed probe of a suspect is an independent confirmation (Lifeguard): say so.
                    self._confirm(target.node_id, self.me, now)
                    self._spread(accusation)
        if self._probe is None and now >= self._next_probe:
            out += self._start_probe(now)
        for node_id, suspicion in list(self._suspicions.items()):
            if now >= suspicion.deadline:
                member = self._members.get(node_id)
                if member is not None and member.state == SUSPECT:
                    rumor = [DEAD, node_id, member.address, member.incarnation, self.me]
                    out += self._apply(rumor, now, direct=True)
                    # A death is rare and must not wait for piggybacks: every live member hears it now.
                    out += [Send(m.node_id, m.address, {"k": "ping", "seq": 0, "r": [rumor]}) for m in self.live()]
                self._suspicions.pop(node_id, None)
        for seq, relay in list(self._relays.items()):
            if now >= relay.deadline:
                del self._relays[seq]
                requester = self._members.get(relay.requester)
                if requester is not None and requester.state in (ALIVE, SUSPECT):
                    out.append(self._send(requester, {"k": "nack", "seq": relay.seq}))
        for node_id, member in list(self._members.items()):
            if member.state in (DEAD, LEFT) and now - member.since > self.timings.tombstone_s:
                del self._members[node_id]
                self._rumors.pop(node_id, None)
        self._expected = self.next_deadline()
        return out

    def receive(self, sender: str, message: dict[str, Any], now: float) -> list[Action]:
        self._stalled(now)
        _check(isinstance(message, dict), "a membership message is not a dict")
        kind = message.get("k")
        _check(kind in ("ping", "ack", "ping_req", "nack"), f"unknown membership message kind {str(kind)[:40]!r}")
        rumors = message.get("r", [])
        _check(isinstance(rumors, list) and len(rumors) <= 100, "rumors are not a short list")
        seq: int = message.get("seq")  # type: ignore[assignment]  # checked next
        _check(isinstance(seq, int) and not isinstance(seq, bool), "seq is not an int")
        out: list[Action] = []
        for rumor in rumors:
            out += self._apply(_valid_rumor(rumor), now, direct=False)
        member = self._members.get(sender)
        if member is None or member.state not in (ALIVE, SUSPECT):
            return out
        if kind == "ping":
            out.append(self._send(member, {"k": "ack", "seq": seq}))
        elif kind == "ack":
            probe = self._probe
            if probe is not None and probe.seq == seq:
                self._acked(now)
            relay = self._relays.pop(seq, None)
            if relay is not None:
                requester = self._members.get(relay.requester)
                if requester is not None and requester.state in (ALIVE, SUSPECT):
                    out.append(self._send(requester, {"k": "ack", "seq": relay.seq}))
        elif kind == "nack":
            if self._probe is not None and self._probe.seq == seq:
                self._probe.nacks += 1
        else:  # ping_req: probe the target for the requester
            target = message.get("target")
            _check(isinstance(target, str) and isinstance(message.get("address"), str), "a ping_req without target and address")
            known = self._members.get(str(target))
            if known is not None and known.state in (ALIVE, SUSPECT) and len(self._relays) < 10_000:
                self._seq += 1
                self._relays[self._seq] = _Relay(sender, seq, now + self.timings.probe_timeout_s * 2 * self._scale())
                out.append(self._send(known, {"k": "ping", "seq": self._seq}))
        return out

    def leave(self, now: float) -> list[Send]:
        """Goodbye: every live member hears that we LEFT, at a new incarnation, and drops us at once."""
        self.incarnation += 1
        rumor = [LEFT, self.me, self.address, self.incarnation, self.me]
        return [Send(m.node_id, m.address, {"k": "ping", "seq": 0, "r": [rumor]}) for m in self.live()]

    # ------------------------------------------------------------------ internals

    def _stalled(self, now: float) -> None:
        """A stimulus far past our own next deadline: our loop stalled; no peer is to blame for it."""
        lag = now - self._expected
        if lag > self.timings.lag_tolerance_s:
            for suspicion in self._suspicions.values():
                suspicion.deadline += lag
            if self._probe is not None:
                self._probe = None  # its timeouts ran out while we slept: probe again
                self._next_probe = now
            for relay in self._relays.values():
                relay.deadline += lag
            self._raise_health()
        self._expected = max(self._expected, now)

    def _raise_health(self) -> None:
        self.local_health = min(self.timings.max_local_health, self.local_health + 1)

    def _acked(self, now: float) -> None:
        self._probe = None
        if self.local_health > 0:
            self.local_health -= 1

    def _start_probe(self, now: float) -> list[Action]:
        self._next_probe = now + self.timings.probe_interval_s * self._scale()
        while self._order:
            node_id = self._order.pop(0)
            member = self._members.get(node_id)
            if member is not None and member.state in (ALIVE, SUSPECT):
                break
        else:
            self._order = [m.node_id for m in self.live()]
            self._rng.shuffle(self._order)
            if not self._order:
                return []
            member = self._members[self._order.pop(0)]
        self._seq += 1
        scale = self._scale()
        self._probe = _Probe(
            member.node_id, self._seq, now + self.timings.probe_timeout_s * scale, now + self.timings.probe_interval_s * scale
        )
        return [self._send(member, {"k": "ping", "seq": self._seq})]

    def _send(self, member: Member, message: dict[str, Any]) -> Send:
        message["r"] = self._piggyback()
        return Send(member.node_id, member.address, message)

    def _retransmits(self) -> int:
        return max(3, math.ceil(self.timings.retransmit_mult * math.log10(len(self._members) + 2)) + 1)

    def _piggyback(self) -> list[Any]:
        if not self._rumors:
            return []
        limit = self._retransmits()
        chosen = sorted(self._rumors.items(), key=lambda item: item[1][1])[:_MAX_RUMORS]
        out = []
        for node_id, (rumor, sent) in chosen:
            out.append(rumor)
            if sent + 1 >= limit:
                del self._rumors[node_id]
            else:
                self._rumors[node_id] = (rumor, sent + 1)
        return out

    def _spread(self, rumor: list[Any]) -> None:
        self._rumors[rumor[1]] = (rumor, 0)

    def _apply(self, rumor: list[Any], now: float, *, direct: bool) -> list[Action]:
        state, node_id, address, incarnation, accuser = rumor
        if node_id == self.me:
            return self._about_me(state, incarnation, now)
        member = self._members.get(node_id)
        if member is None:
            if state not in (ALIVE, SUSPECT) or len(self._members) >= _MAX_MEMBERS:
                return []  # a death of someone we never knew: nothing to bury
            member = Member(node_id, address, incarnation, state, now)
            self._members[node_id] = member
            self._order.insert(self._rng.randrange(len(self._order) + 1), node_id)
            self._spread(rumor)
            if state == SUSPECT:
                self._suspect(member, incarnation, accuser, now)
            return [Changed(node_id, address, state, None, incarnation)]
        if not _overrides(state, incarnation, member.state, member.incarnation):
            if state == SUSPECT and member.state == SUSPECT and incarnation == member.incarnation:
                self._confirm(node_id, accuser, now)
            return []
        previous = member.state
        member.incarnation = incarnation
        if state != previous:
            member.state = state
            member.since = now
        if address and state == ALIVE:
            member.address = address
        self._spread(rumor)
        if state == SUSPECT:
            self._suspect(member, incarnation, accuser, now)
        else:
            self._suspicions.pop(node_id, None)
        if state in (ALIVE, SUSPECT) and node_id not in self._order:
            self._order.insert(self._rng.randrange(len(self._order) + 1), node_id)
        if state == previous:
            return []
        return [Changed(node_id, member.address, state, previous, incarnation)]

    def _about_me(self, state: str, incarnation: int, now: float) -> list[Action]:
        if state in (ALIVE, LEFT) or incarnation < self.incarnation:
            return []
        # Refute: a higher incarnation than any accusation, told at once to everyone (a woken node's
        # suspectors must hear it before their timers end), and spread as a rumor for the rest.
        if state == DEAD:
            self.declared_dead += 1
        self.incarnation = incarnation + 1
        self._raise_health()
        rumor = [ALIVE, self.me, self.address, self.incarnation, self.me]
        self._spread(rumor)
        return [Send(m.node_id, m.address, {"k": "ping", "seq": 0, "r": [rumor]}) for m in self.live()]

    def _suspect(self, member: Member, incarnation: int, accuser: str, now: float) -> None:
        self._suspicions[member.node_id] = _Suspicion(incarnation, now, now + self.timings.suspicion_max_s, {accuser})
        self._confirm(member.node_id, accuser, now)

    def _confirm(self, node_id: str, accuser: str, now: float) -> None:
        suspicion = self._suspicions.get(node_id)
        if suspicion is None:
            return
        suspicion.accusers.add(accuser)
        t = self.timings
        wanted = min(t.suspicion_confirmations, max(0, len(self.live()) - 1))
        confirmations = len(suspicion.accusers) - 1
        if wanted <= 0:
            timeout = t.suspicion_min_s
        else:
            fraction = math.log(min(confirmations, wanted) + 1) / math.log(wanted + 1)
            timeout = max(t.suspicion_min_s, t.suspicion_max_s - (t.suspicion_max_s - t.suspicion_min_s) * fraction)
        suspicion.deadline = min(suspicion.deadline, suspicion.start + timeout)


_NO_SUSPICION = _Suspicion(0, 0.0, 0.0, set())


def _overrides(state: str, incarnation: int, old_state: str, old_incarnation: int) -> bool:
    """SWIM's precedence as one total order, (incarnation, ALIVE < SUSPECT < DEAD < LEFT), so any delivery order agrees.

    DEAD at an incarnation buries every news at or below it (a tombstone); only the node itself
    can outbid it, by coming back with a higher incarnation.
    """
    return (incarnation, _RANK[state]) > (old_incarnation, _RANK[old_state])


def _valid_rumor(rumor: Any) -> list[Any]:
    _check(isinstance(rumor, list | tuple) and len(rumor) == 5, "a rumor is not [state, node, address, incarnation, accuser]")
    state, node_id, address, incarnation, accuser = rumor
    _check(state in _STATES, f"unknown member state {str(state)[:20]!r}")
    _check(isinstance(node_id, str) and 0 < len(node_id) <= 64, "a rumor's node id is not a short str")
    _check(isinstance(address, str) and len(address) <= 300, "a rumor's address is not a str")
    _check(isinstance(incarnation, int) and not isinstance(incarnation, bool) and 0 <= incarnation < 2**62, "bad incarnation")
    _check(isinstance(accuser, str) and len(accuser) <= 64, "a rumor's accuser is not a str")
    return [state, node_id, address, incarnation, accuser]
