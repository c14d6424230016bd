"""Who is alive: SWIM failure detection with Lifeguard's refinements. Sans I/O.

Events in (``tick``, ``receive``, ``heard_from``, ``add``, ``disconnected``,
``leave``), each with the clock passed in; actions out (``Send`` a message,
``Changed`` a member's state). Randomness comes from the ``random.Random``
given to the constructor, so a simulation replays exactly.

- Each protocol period this node probes one member, round-robin over a
  shuffled list (re-shuffled each pass). No ack within the probe timeout: it
  asks ``indirect_probes`` others to probe it. No ack by the period's end: the
  member is SUSPECT.
- A suspicion ends in DEAD unless the suspect refutes it by raising its
  incarnation. Lifeguard: the timeout starts at ``suspicion_max_s`` and
  shrinks toward ``suspicion_min_s`` with each independent accuser.
- Membership changes travel as rumors piggybacked on every message, each
  carried a bounded number of times. Precedence is one total order,
  ``(incarnation, ALIVE < SUSPECT < DEAD < LEFT)``, which is SWIM's rule made
  order-independent: DEAD and LEFT are tombstones that nothing at or below
  their incarnation resurrects.
- Local health (Lifeguard): a probe that failed without the helpers' nacks,
  or a suspicion of ourselves, hints that *we* are the slow one, so the
  multiplier stretches our own probe interval and timeouts. A stimulus that
  comes much later than this core's own next deadline means our loop stalled
  (GC, a busy interpreter, SIGSTOP): the probe in flight is restarted rather
  than failed, and every running suspicion is extended by the stall.

The messages and rumors are ``swim``'s.
"""

from __future__ import annotations

import math
import random
from typing import Any

from zmesh.node.core.swim import (
    _LIVE,
    _MAX_MEMBERS,
    _MAX_RELAYS,
    _SWEEP_S,
    ALIVE,
    DEAD,
    LEFT,
    SUSPECT,
    Action,
    Burials,
    Buried,
    Changed,
    Member,
    MembershipTimings,
    Rumor,
    RumorQueue,
    Send,
    _overrides,
    _parse,
    _Probe,
    _Relay,
    _Suspicion,
    suspicion_timeout,
    wire,
)

__all__ = ["ALIVE", "DEAD", "LEFT", "SUSPECT", "Action", "Buried", "Changed", "Member", "Membership", "MembershipTimings", "Send"]


class Membership:
    def __init__(self, me: str, address: str, timings: MembershipTimings, now: float, rng: random.Random, incarnation: int = 0) -> None:
        self.me = me
        self.address = address
        self.timings = timings
        self.incarnation = incarnation
        self.local_health = 0
        self.stalls = 0  # times our own loop was seen to stall
        self.refutations = 0  # times we had to refute a suspicion or death of ourselves
        self._rng = rng
        self._members: dict[str, Member] = {}
        self._order: list[str] = []  # probe order; the next target is at the end
        self._queued: set[str] = set()  # what _order holds, so nothing is queued twice
        self._next_probe = now
        self._probe: _Probe | None = None
        self._suspicions: dict[str, _Suspicion] = {}
        self._relays: dict[int, _Relay] = {}
        self._burials = Burials()
        self._seq = 0
        # node id -> (rumor, times sent, generation): one rumor per node, the newest replacing the older.
        self._rumors = RumorQueue()
        self._next_sweep = now + _SWEEP_S
        self._left = False
        # When this core next expects a stimulus; None until the first tick, so slow start-up is no stall.
        self._expected: float | None = None

    # ------------------------------------------------------------------ views

    def members(self) -> list[Member]:
        """Everyone known except this node, in any state (tombstones included)."""
        return list(self._members.values())

    def get(self, node_id: str) -> Member | None:
        return self._members.get(node_id)

    def live(self) -> list[Member]:
        """ALIVE or SUSPECT: a suspect still gets traffic, it may refute."""
        return [m for m in self._members.values() if m.state in _LIVE]

    def next_deadline(self) -> float:
        """When ``tick`` next has work: the daemon may sleep until then (or until a message comes)."""
        deadline = self._next_probe
        probe = self._probe
        if probe is not None:
            deadline = min(deadline, probe.period_end if probe.indirect else probe.direct_deadline)
        for suspicion in self._suspicions.values():
            deadline = min(deadline, suspicion.deadline)
        for relay in self._relays.values():
            deadline = min(deadline, relay.expires if relay.nack_at is None else relay.nack_at)
        return deadline

    # ------------------------------------------------------------------ stimuli

    def add(self, node_id: str, address: str, incarnation: int, now: float) -> list[Action]:
        """A peer proven by an authenticated hello; ignored if tombstoned at an incarnation >= this one."""
        self._check_lag(now)
        out: list[Action] = []
        if node_id != self.me and not self._left:
            out = self._apply((ALIVE, node_id, address, incarnation, node_id, 0), now)
        self._settle(now)
        return out

    def heard_from(self, sender: str, now: float) -> list[Action]:
        """Any message from a peer (a call, gossip) answers our probe of it."""
        self._check_lag(now)
        probe = self._probe
        if probe is not None and probe.target == sender:
            self._acked()
        self._settle(now)
        return []

    def disconnected(self, node_id: str, now: float) -> list[Action]:
        """The transport saw the connection drop: probe it next. Only a failed probe raises suspicion."""
        self._check_lag(now)
        member = self._members.get(node_id)
        probe = self._probe
        if member is not None and member.state in _LIVE and not self._left and (probe is None or probe.target != node_id):
            if node_id in self._queued:
                self._order.remove(node_id)
            self._order.append(node_id)
            self._queued.add(node_id)
            if probe is None:
                self._next_probe = min(self._next_probe, now)
        self._settle(now)
        return []

    def tick(self, now: float) -> list[Action]:
        self._check_lag(now)
        out: list[Action] = []
        if not self._left:
            out += self._advance_probe(now)
            if self._probe is None and now >= self._next_probe:
                out += self._start_probe(now)
            out += self._expire_suspicions(now)
            out += self._expire_relays(now)
        if now >= self._next_sweep:
            self._sweep(now)
        self._expected = max(self.next_deadline(), now)
        return out

    def receive(self, sender: str, message: dict[str, Any], now: float) -> list[Action]:
        """One SWIM message; raises ValueError, having changed nothing, if any part of it is malformed.

        Rumors are read even from a sender we do not count as live: a member we buried may be
        telling us that it buried us (a healed partition), and we must learn it to refute.
        """
        kind, seq, rumors, target = _parse(message)
        self._check_lag(now)
        out: list[Action] = []
        for rumor in rumors:
            out += self._apply(rumor, now)
        member = self._members.get(sender)
        if member is not None and member.state in _LIVE and not self._left:
            out += self._answer(member, kind, seq, target, now)
        elif member is not None and member.state == DEAD and not self._left:
            out += self._tell_buried(member, now)
        self._settle(now)
        return out

    def leave(self, now: float) -> list[Send]:
        """Goodbye: every live member hears that we LEFT, at a new incarnation, and drops us at once."""
        self._left = True
        self._probe = None
        self._relays.clear()
        self.incarnation += 1
        rumor: Rumor = (LEFT, self.me, self.address, self.incarnation, self.me, 0)
        return self._tell_everyone(rumor)

    # ------------------------------------------------------------------ probing

    def _answer(self, member: Member, kind: str, seq: int, target: str | None, now: float) -> list[Action]:
        if kind == "ping":
            return [self._send(member, {"k": "ack", "seq": seq})]
        if kind == "ack":
            probe = self._probe
            # Only the target or a helper we asked can answer our probe: a stray seq proves nothing.
            if probe is not None and probe.seq == seq and (member.node_id == probe.target or member.node_id in probe.helpers):
                self._acked()
            relay = self._relays.get(seq)
            if relay is not None and relay.target == member.node_id:
                del self._relays[seq]
                requester = self._members.get(relay.requester)
                if requester is not None and requester.state in _LIVE:
                    return [self._send(requester, {"k": "ack", "seq": relay.requester_seq})]
            return []
        if kind == "nack":
            probe = self._probe
            if probe is not None and probe.seq == seq and member.node_id in probe.helpers:
                probe.nacks.add(member.node_id)
            return []
        # ping_req: probe the target for the requester.
        assert target is not None
        if target == self.me:
            return [self._send(member, {"k": "ack", "seq": seq})]
        known = self._members.get(target)
        if known is None or known.state not in _LIVE or target == member.node_id or len(self._relays) >= _MAX_RELAYS:
            # We cannot help, but we are here and answering: a nack keeps the requester from blaming itself.
            return [self._send(member, {"k": "nack", "seq": seq})]
        t = self.timings
        # Half the requester's indirect window, so the nack lands inside it.
        nack_after = max(0.0, min(t.probe_timeout_s, t.probe_interval_s - t.probe_timeout_s)) / 2
        self._seq += 1
        self._relays[self._seq] = _Relay(member.node_id, seq, target, now + nack_after, now + t.probe_interval_s)
        return [self._send(known, {"k": "ping", "seq": self._seq})]

    def _advance_probe(self, now: float) -> list[Action]:
        probe = self._probe
        if probe is None:
            return []
        target = self._members.get(probe.target)
        if target is None or target.state not in _LIVE:
            self._probe = None
            return []
        if not probe.indirect:
            if now < probe.direct_deadline:
                return []
            probe.indirect = True
            helpers = [m for m in self._members.values() if m.state == ALIVE and m.node_id != target.node_id]
            chosen = self._rng.sample(helpers, min(len(helpers), self.timings.indirect_probes))
            probe.helpers = {m.node_id for m in chosen}
            request = {"k": "ping_req", "seq": probe.seq, "target": target.node_id, "address": target.address}
            return [self._send(m, dict(request)) for m in chosen]
        if now < probe.period_end:
            return []
        self._probe = None
        # Lifeguard: helpers that did not even nack suggest that our own messages are slow.
        self._raise_health(len(probe.helpers - probe.nacks) if probe.helpers else 1)
        accusation: Rumor = (SUSPECT, target.node_id, target.address, target.incarnation, self.me, 0)
        if target.state == ALIVE:
            return self._apply(accusation, now)
        # A suspect we could not reach either: our failed probe is an independent confirmation.
        suspicion = self._suspicions.get(target.node_id)
        if suspicion is not None and suspicion.incarnation == target.incarnation and self._confirm(suspicion, self.me):
            self._spread(accusation)
        return []

    def _start_probe(self, now: float) -> list[Action]:
        scale = 1 + self.local_health
        self._next_probe = now + self.timings.probe_interval_s * scale
        target = self._next_target()
        if target is None:
            return []
        self._seq += 1
        self._probe = _Probe(
            target.node_id, self._seq, now + self.timings.probe_timeout_s * scale, now + self.timings.probe_interval_s * scale
        )
        # Our own ALIVE rides on every probe, so a member that has not heard of us (a rumor that ran out
        # of retransmits before reaching it) learns us from our first ping and can answer it.
        first: list[Rumor] = [(ALIVE, self.me, self.address, self.incarnation, self.me, 0)]
        suspicion = self._suspicions.get(target.node_id)
        if target.state == SUSPECT and suspicion is not None:
            # Lifeguard's buddy system: a suspect we probe learns of the suspicion now, and can refute.
            first.append((SUSPECT, target.node_id, target.address, target.incarnation, next(iter(suspicion.accusers), ""), 0))
        return [self._send(target, {"k": "ping", "seq": self._seq}, first)]

    def _next_target(self) -> Member | None:
        for attempt in range(2):
            while self._order:
                node_id = self._order.pop()
                self._queued.discard(node_id)
                member = self._members.get(node_id)
                if member is not None and member.state in _LIVE:
                    return member
            if attempt == 0:
                self._order = [m.node_id for m in self.live()]
                self._rng.shuffle(self._order)
                self._queued = set(self._order)
        return None

    def _enqueue(self, node_id: str) -> None:
        """A new member goes to a random place in this pass, so all nodes do not probe it at once."""
        if node_id not in self._queued:
            self._order.insert(self._rng.randrange(len(self._order) + 1), node_id)
            self._queued.add(node_id)

    def _acked(self) -> None:
        self._probe = None
        self.local_health = max(0, self.local_health - 1)

    def _raise_health(self, by: int = 1) -> None:
        self.local_health = min(self.timings.max_local_health, self.local_health + by)

    def _settle(self, now: float) -> None:
        """After a stimulus: we expect the next tick at our next deadline, or at once if one is overdue."""
        if self._expected is not None:
            self._expected = max(self.next_deadline(), now)

    def _check_lag(self, now: float) -> None:
        """A stimulus far past our own next deadline: our loop stalled, and no peer is to blame for it."""
        if self._expected is None:
            return
        lag = now - self._expected
        if lag <= self.timings.lag_tolerance_s:
            return
        self.stalls += 1
        self._raise_health()
        self._expected = now
        for suspicion in self._suspicions.values():
            # The suspects had no chance to refute while we were not reading: they get the time back.
            suspicion.start += lag
            suspicion.deadline += lag
        probe = self._probe
        if probe is not None:
            # Its timeouts ran out while we slept, not while the target was silent: probe it again now.
            self._probe = None
            if probe.target in self._queued:
                self._order.remove(probe.target)
            self._order.append(probe.target)
            self._queued.add(probe.target)
        self._next_probe = min(self._next_probe, now)
        # Their requesters' windows are long gone; a late nack or ack would only mislead them.
        self._relays.clear()

    # ------------------------------------------------------------------ timers

    def _expire_suspicions(self, now: float) -> list[Action]:
        out: list[Action] = []
        for node_id, suspicion in list(self._suspicions.items()):
            if now < suspicion.deadline:
                continue
            del self._suspicions[node_id]
            member = self._members.get(node_id)
            if member is None or member.state != SUSPECT or member.incarnation != suspicion.incarnation:
                continue
            # Its weight: the members we still hold ALIVE, ourselves included. A node cut off alone suspects
            # everyone at once and declares with weight 1; the side that buries it, with its own size.
            weight = 1 + sum(1 for m in self._members.values() if m.state == ALIVE)
            rumor: Rumor = (DEAD, node_id, member.address, member.incarnation, self.me, weight)
            out += self._apply(rumor, now)
            # A death must not wait for piggybacks: every live member hears it now, so all agree within a timeout.
            out += self._tell_everyone(rumor)
        return out

    def _expire_relays(self, now: float) -> list[Action]:
        out: list[Action] = []
        for seq, relay in list(self._relays.items()):
            if relay.nack_at is not None and now >= relay.nack_at:
                relay.nack_at = None
                requester = self._members.get(relay.requester)
                if requester is not None and requester.state in _LIVE:
                    out.append(self._send(requester, {"k": "nack", "seq": relay.requester_seq}))
            if now >= relay.expires:
                del self._relays[seq]
        return out

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + _SWEEP_S
        for node_id, member in list(self._members.items()):
            if member.state not in _LIVE and now - member.since > self.timings.tombstone_s:
                del self._members[node_id]
                self._rumors.forget(node_id)

    # ------------------------------------------------------------------ rumors

    def _apply(self, rumor: Rumor, now: float) -> list[Action]:
        state, node_id, address, incarnation, accuser, weight = rumor
        if node_id == self.me:
            return self._about_me(state, incarnation, accuser, weight)
        member = self._members.get(node_id)
        if member is None:
            if len(self._members) >= _MAX_MEMBERS:
                return []
            # A death of someone we never knew is still kept: a tombstone, so stale news cannot bring it in.
            member = Member(node_id, address, incarnation, state, now)
            self._members[node_id] = member
            self._burials.saw(member, self.incarnation, 0)
            self._spread(rumor)
            if state in _LIVE:
                self._enqueue(node_id)
            if state == SUSPECT:
                self._suspect(member, accuser, now)
            return [Changed(node_id, address, state, None, incarnation)]
        if state == DEAD and self._burials.overruled(accuser, weight):
            # A verdict of a member we buried with more weight (the lighter side of a partition), made while it was
            # cut off and arriving after it came back: stale, not ours to adopt. We probe the subject ourselves.
            return []
        if not _overrides(state, incarnation, member.state, member.incarnation):
            if state == SUSPECT and member.state == SUSPECT and incarnation == member.incarnation:
                suspicion = self._suspicions.get(node_id)
                if suspicion is not None and self._confirm(suspicion, accuser):
                    self._spread(rumor)  # others may count this accuser too
            return []
        previous = member.state
        buried_at = member.incarnation
        member.incarnation = incarnation
        if state != previous:
            member.state = state
            member.since = now
        if state == ALIVE:
            member.address = address  # the node's own word on where it listens
        self._burials.saw(member, self.incarnation, weight)
        self._spread(rumor)
        out: list[Action] = []
        if previous == DEAD and state in _LIVE:
            # It refuted a suspicion we had already turned into its death (it stalled past it): its
            # refutation overrides the death, so tell it that it was buried, or it never learns.
            out.append(Send(node_id, member.address, {"k": "ping", "seq": 0, "r": [self.death_rumor(node_id, buried_at)]}))
        if state == SUSPECT:
            self._suspect(member, accuser, now)
        else:
            self._suspicions.pop(node_id, None)
        if state in _LIVE and previous not in _LIVE:
            self._enqueue(node_id)
        if state == previous:
            return out
        return [*out, Changed(node_id, member.address, state, previous, incarnation)]

    def death_rumor(self, node_id: str, incarnation: int) -> list[Any]:
        """The news that we buried ``node_id`` at ``incarnation``, to tell it (with the weight we buried it with)."""
        member = self._members.get(node_id)
        return self._burials.death_rumor(node_id, member.address if member is not None else "", incarnation, self.me)

    def _about_me(self, state: str, incarnation: int, accuser: str, weight: int) -> list[Action]:
        if self._left:
            return []
        buried: list[Action] = []
        if state == DEAD and accuser and self._burials.buries_us(accuser, incarnation, weight):
            buried.append(Buried(incarnation))
        if state == ALIVE:
            if incarnation <= self.incarnation:
                return []  # our own news coming back
            # An ALIVE of ours we never sent (a forged or stale one) would outrank us: outbid it too.
        elif incarnation < self.incarnation:
            return buried  # already refuted
        else:
            self.refutations += 1
            self._raise_health()  # they could not hear us: we may be the slow one
        self.incarnation = max(self.incarnation, incarnation) + 1
        rumor: Rumor = (ALIVE, self.me, self.address, self.incarnation, self.me, 0)
        self._spread(rumor)
        # Told at once to everyone, not only piggybacked: a node that just woke from a stall must
        # reach its suspectors before their timers run out.
        return buried + list(self._tell_everyone(rumor))

    def _suspect(self, member: Member, accuser: str, now: float) -> None:
        t = self.timings
        suspicion = _Suspicion(member.incarnation, now, now + t.suspicion_max_s, {accuser} if accuser else set())
        self._suspicions[member.node_id] = suspicion
        self._retime(suspicion)

    def _confirm(self, suspicion: _Suspicion, accuser: str) -> bool:
        """Count an independent accuser; False if it adds nothing (known, anonymous, or enough already)."""
        if not accuser or accuser in suspicion.accusers or len(suspicion.accusers) > self.timings.suspicion_confirmations:
            return False
        suspicion.accusers.add(accuser)
        self._retime(suspicion)
        return True

    def _retime(self, suspicion: _Suspicion) -> None:
        timeout = suspicion_timeout(self.timings, len(self.live()), len(suspicion.accusers))
        # Only ever shorter: a member joining later must not stretch a running suspicion.
        suspicion.deadline = min(suspicion.deadline, suspicion.start + timeout)

    def _spread(self, rumor: Rumor) -> None:
        self._rumors.spread(rumor)

    def _piggyback(self, first: list[Rumor]) -> list[list[Any]]:
        n = len(self.live()) + 1
        return self._rumors.take(first, max(3, math.ceil(self.timings.retransmit_mult * math.log10(n + 1)) + 1))

    def _send(self, member: Member, message: dict[str, Any], first: list[Rumor] | None = None) -> Send:
        message["r"] = self._piggyback(first or [])
        return Send(member.node_id, member.address, message)

    def _tell_everyone(self, rumor: Rumor) -> list[Send]:
        return [Send(m.node_id, m.address, {"k": "ping", "seq": 0, "r": [wire(rumor)]}) for m in self.live()]

    def _tell_buried(self, member: Member, now: float) -> list[Action]:
        """``member`` speaks though we buried it (it stalled, or was cut off): tell it, at most once per probe interval."""
        if not self._burials.may_tell(member.node_id, now, self.timings.probe_interval_s):
            return []
        return [Send(member.node_id, member.address, {"k": "ping", "seq": 0, "r": [self.death_rumor(member.node_id, member.incarnation)]})]
