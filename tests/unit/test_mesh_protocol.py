"""Membership and gossip cores on a simulated mesh: a fake clock, message delay and loss, kills, stalls, partitions.

Pure: no sockets, no processes. The simulator delivers each ``Send`` after a
drawn delay unless the link is cut or the receiver is dead; a stalled node's
inbound messages wait until it wakes, and its clock jumps, as a SIGSTOPped
process sees it.
"""

from __future__ import annotations

import heapq
import itertools
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.node.core import membership as ms
from zmesh.node.core.gossip import Gossip, GossipTimings
from zmesh.node.core.membership import Changed, Membership, MembershipTimings, Send
from zmesh.node.mesh.actors import membership_event

TICK = 0.02


class Sim:
    def __init__(self, n: int, *, seed: int = 0, delay: tuple[float, float] = (0.001, 0.01), loss: float = 0.0, **timings: Any) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.delay, self.loss = delay, loss
        self.timings = MembershipTimings(**timings)
        self.ids = [f"n{i}" for i in range(n)]
        self.members = {i: Membership(i, f"addr-{i}", self.timings, 0.0, random.Random(seed * 1000 + k)) for k, i in enumerate(self.ids)}
        self.gossip = {
            i: Gossip(i, 0, {"v": 0}, GossipTimings(round_s=0.1, sync_interval_s=1.0), 0.0, random.Random(seed * 7 + k))
            for k, i in enumerate(self.ids)
        }
        self.queue: list[tuple[float, int, str, str, str, dict[str, Any]]] = []
        self.counter = itertools.count()
        self.dead: set[str] = set()
        self.stalled_until: dict[str, float] = {}
        self.cut: set[frozenset[str]] = set()
        self.events: list[tuple[float, str, Changed]] = []
        self.sent = 0

    def join_all(self) -> None:
        """Every node learns every other (as the handshake would tell it), then time runs."""
        for a in self.ids:
            for b in self.ids:
                if a != b:
                    self.route(a, self.members[a].add(b, f"addr-{b}", 0, self.now))

    def route(self, sender: str, actions: list[Any], channel: str = "swim") -> None:
        for action in actions:
            if isinstance(action, Changed):
                self.events.append((self.now, sender, action))
            elif isinstance(action, Send):
                self.sent += 1
                if self.rng.random() < self.loss:
                    continue
                at = self.now + self.rng.uniform(*self.delay)
                heapq.heappush(self.queue, (at, next(self.counter), sender, action.to, channel, action.message))

    def awake(self, node: str) -> bool:
        return node not in self.dead and self.stalled_until.get(node, -1.0) <= self.now

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + TICK, 6)
            pending = []
            while self.queue and self.queue[0][0] <= self.now:
                item = heapq.heappop(self.queue)
                _, _, sender, to, channel, message = item
                if to in self.dead or frozenset((sender, to)) in self.cut:
                    continue
                if not self.awake(to):
                    pending.append(item)  # queued in its socket until it wakes
                    continue
                self.route(to, self.members[to].heard_from(sender, self.now))
                if channel == "swim":
                    self.route(to, self.members[to].receive(sender, message, self.now))
                else:
                    replies, _ = self.gossip[to].receive(sender, message, self.now)
                    self.route(to, list(replies), "gossip")
            for item in pending:
                heapq.heappush(self.queue, (self.now + TICK / 2, *item[1:]))
            for node in self.ids:
                if self.awake(node):
                    self.route(node, self.members[node].tick(self.now))
                    peers = [(m.node_id, m.address) for m in self.members[node].live()]
                    self.route(node, list(self.gossip[node].tick(self.now, peers)), "gossip")

    def state(self, observer: str, node: str) -> str | None:
        member = self.members[observer].get(node)
        return member.state if member is not None else None

    def declared_dead(self, node: str) -> list[tuple[float, str]]:
        return [(t, who) for t, who, c in self.events if c.node_id == node and c.state == ms.DEAD]


def test_a_silent_node_is_declared_dead_by_everyone_within_the_target() -> None:
    times = []
    for seed in range(10):
        sim = Sim(5, seed=seed)
        sim.join_all()
        sim.run(2)
        sim.dead.add("n4")
        killed = sim.now
        sim.run(6)
        dead = sim.declared_dead("n4")
        assert {who for _, who in dead} == {"n0", "n1", "n2", "n3"}
        times.append(max(t for t, _ in dead) - killed)
    print(f"\nsimulated SIGKILL, 5 nodes, default timings: every peer declares it dead after {sorted(times)} s")
    assert max(times) < 3.0


def test_a_node_stalled_for_1_5_s_every_20_s_is_never_declared_dead() -> None:
    sim = Sim(5, seed=3, delay=(0.001, 0.03))
    sim.join_all()
    for _stall in range(30):  # 10 simulated minutes
        sim.run(18.5)
        sim.stalled_until["n2"] = sim.now + 1.5
        sim.run(1.5)
    assert not [e for e in sim.events if e[2].state in (ms.DEAD, ms.LEFT)], [e for e in sim.events if e[2].state != ms.ALIVE][:5]
    suspicions = sum(1 for e in sim.events if e[2].state == ms.SUSPECT)
    print(f"\n30 stalls of 1.5 s: {suspicions} suspicions raised and refuted, no death")


def test_the_stalled_node_itself_accuses_nobody() -> None:
    sim = Sim(4, seed=5)
    sim.join_all()
    sim.run(2)
    sim.stalled_until["n0"] = sim.now + 3.0
    sim.run(8)
    accused_by_n0 = [e for e in sim.events if e[1] == "n0" and e[2].state in (ms.SUSPECT, ms.DEAD)]
    assert not accused_by_n0
    assert sim.members["n0"].local_health > 0 or sim.members["n0"].incarnation > 0


def test_a_graceful_leave_is_known_at_once_and_stays() -> None:
    sim = Sim(4, seed=1)
    sim.join_all()
    sim.run(1)
    sim.route("n3", list(sim.members["n3"].leave(sim.now)))
    sim.dead.add("n3")
    sim.run(0.1)
    assert all(sim.state(o, "n3") == ms.LEFT for o in ("n0", "n1", "n2"))
    sim.run(5)
    assert all(sim.state(o, "n3") == ms.LEFT for o in ("n0", "n1", "n2"))


def test_a_buried_node_comes_back_only_with_a_higher_incarnation() -> None:
    core = Membership("me", "addr-me", MembershipTimings(), 0.0, random.Random(0))
    core.add("x", "addr-x", 3, 0.0)
    core.receive("x", {"k": "ping", "seq": 1, "r": [[ms.DEAD, "x", "addr-x", 3, "y"]]}, 0.1)
    assert core.get("x").state == ms.DEAD  # type: ignore[union-attr]
    for stale in ([ms.ALIVE, "x", "addr-x", 3, "x"], [ms.SUSPECT, "x", "addr-x", 2, "y"]):
        core.receive("y", {"k": "ping", "seq": 2, "r": [stale]}, 0.2)
        assert core.get("x").state == ms.DEAD  # type: ignore[union-attr]
    core.add("x", "addr-x", 3, 0.3)  # a hello at the buried incarnation does not resurrect it either
    assert core.get("x").state == ms.DEAD  # type: ignore[union-attr]
    core.receive("y", {"k": "ping", "seq": 3, "r": [[ms.ALIVE, "x", "addr-x", 4, "x"]]}, 0.4)
    assert core.get("x").state == ms.ALIVE  # type: ignore[union-attr]


def test_a_suspected_node_refutes_with_a_higher_incarnation_told_to_everyone() -> None:
    core = Membership("me", "addr-me", MembershipTimings(), 0.0, random.Random(0))
    for peer in ("a", "b"):
        core.add(peer, f"addr-{peer}", 0, 0.0)
    out = core.receive("a", {"k": "ping", "seq": 1, "r": [[ms.SUSPECT, "me", "addr-me", 0, "a"]]}, 0.1)
    assert core.incarnation == 1
    told = {s.to for s in out if isinstance(s, Send) and [ms.ALIVE, "me", "addr-me", 1, "me"] in s.message["r"]}
    assert told == {"a", "b"}


def test_independent_confirmations_shorten_a_suspicion() -> None:
    timings = MembershipTimings(suspicion_min_s=1.0, suspicion_max_s=4.0)
    alone = Membership("me", "a-me", timings, 0.0, random.Random(0))
    confirmed = Membership("me", "a-me", timings, 0.0, random.Random(0))
    for core in (alone, confirmed):
        for peer in "abcde":
            core.add(peer, f"a-{peer}", 0, 0.0)
        core.receive("a", {"k": "ping", "seq": 1, "r": [[ms.SUSPECT, "e", "a-e", 0, "a"]]}, 0.0)
    for accuser in "bcd":
        confirmed.receive(accuser, {"k": "ping", "seq": 1, "r": [[ms.SUSPECT, "e", "a-e", 0, accuser]]}, 0.0)

    def dead_at(core: Membership) -> float:
        for step in range(1, 500):
            now = step * 0.01
            for peer in "abcd":
                core.heard_from(peer, now)
            if any(isinstance(a, Changed) and a.node_id == "e" and a.state == ms.DEAD for a in core.tick(now)):
                return now
        return float("inf")

    assert dead_at(confirmed) == pytest.approx(1.0, abs=0.05)
    # Alone, this node's own failed probe of the suspect is the one confirmation: halfway on the log scale (K=3).
    assert dead_at(alone) == pytest.approx(2.5, abs=0.05)


rumor_states = st.sampled_from([ms.ALIVE, ms.SUSPECT, ms.DEAD, ms.LEFT])
rumors = st.lists(
    st.tuples(rumor_states, st.integers(0, 3), st.sampled_from("abc")).map(lambda r: [r[0], "x", "addr-x", r[1], r[2]]), max_size=8
)


@settings(max_examples=200, deadline=None)
@given(rumors, st.randoms(use_true_random=False))
def test_any_delivery_order_of_the_same_rumors_ends_in_the_same_state(items: list[list[Any]], rng: random.Random) -> None:
    def final(order: list[list[Any]]) -> tuple[str, int] | None:
        core = Membership("me", "a-me", MembershipTimings(), 0.0, random.Random(0))
        core.add("x", "addr-x", 0, 0.0)
        for rumor in order:
            core.receive("x", {"k": "ping", "seq": 1, "r": [rumor]}, 0.0)
        member = core.get("x")
        return (member.state, member.incarnation) if member is not None else None

    shuffled = list(items)
    rng.shuffle(shuffled)
    assert final(items) == final(shuffled)


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5) | st.binary(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=12,
)


@given(junk, st.dictionaries(st.sampled_from(["k", "seq", "r", "target", "address", "deltas", "digest", "want"]), junk, max_size=5))
def test_garbage_is_refused_with_a_value_error_and_changes_nothing(anything: Any, fields: dict[str, Any]) -> None:
    core = Membership("me", "a-me", MembershipTimings(), 0.0, random.Random(0))
    core.add("p", "a-p", 0, 0.0)
    gossip = Gossip("me", 0, {}, GossipTimings(), 0.0, random.Random(0))
    for message in (anything, fields, {**fields, "k": "ping"}, {**fields, "k": "push"}, {**fields, "k": "sync"}):
        for receive in (core.receive, gossip.receive):
            try:
                receive("p", message, 0.1)
            except ValueError:
                pass
    assert core.get("p") is not None and core.get("p").state == ms.ALIVE  # type: ignore[union-attr]
    assert gossip.entry("me") is not None


def test_gossip_spreads_deltas_and_sync_repairs_losses() -> None:
    sim = Sim(20, seed=2, loss=0.2)
    sim.join_all()
    sim.run(1)
    sim.gossip["n7"].set_own({"v": 42}, sim.now)
    sim.run(5)
    assert all(sim.gossip[i].entry("n7").data == {"v": 42} for i in sim.ids)  # type: ignore[union-attr]


def test_an_entry_never_goes_backwards_and_the_forgotten_stay_forgotten() -> None:
    g = Gossip("me", 0, {}, GossipTimings(), 0.0, random.Random(0))

    def whole(node: str, incarnation: int, version: int, data: dict[str, Any]) -> dict[str, Any]:
        return {"k": "push", "deltas": [[node, incarnation, 0, version, data, {}, {}]]}

    g.receive("p", whole("x", 1, 5, {"v": 5}), 0.0)
    g.receive("p", whole("x", 1, 4, {"v": 4}), 0.0)
    g.receive("p", whole("x", 0, 9, {"v": 9}), 0.0)
    assert g.entry("x").data == {"v": 5}  # type: ignore[union-attr]
    g.receive("p", whole("me", 9, 9, {"forged": True}), 0.0)
    assert g.entry("me").data == {}  # type: ignore[union-attr]
    g.forget("x", 1)
    g.receive("p", whole("x", 1, 99, {"v": 99}), 0.0)
    assert g.entry("x") is None
    g.receive("p", whole("x", 2, 1, {"v": "reborn"}), 0.0)
    assert g.entry("x").data == {"v": "reborn"}  # type: ignore[union-attr]


def test_a_partitioned_mesh_splits_and_each_side_goes_on() -> None:
    sim = Sim(5, seed=4)
    sim.join_all()
    sim.run(1)
    for a, b in itertools.product(["n0", "n1"], ["n2", "n3", "n4"]):
        sim.cut.add(frozenset((a, b)))
    sim.run(8)
    assert sim.state("n0", "n3") == ms.DEAD and sim.state("n3", "n0") == ms.DEAD
    assert sim.state("n0", "n1") == ms.ALIVE and sim.state("n2", "n4") == ms.ALIVE


def test_two_hundred_nodes_converge_in_a_few_rounds() -> None:
    """Every node changes its entry once; print the rounds until everyone has everything, and the cost."""
    n = 200
    sim = Sim(n, seed=9, probe_interval_s=0.2)
    # Each node knows every other, as after the join handshakes; gossip starts from there.
    sim.join_all()
    sim.run(0.5)
    sent_before = sim.sent
    for i in sim.ids:
        sim.gossip[i].set_own({"v": 1}, sim.now)
    start, rounds = sim.now, 0
    while True:
        sim.run(0.1)
        rounds += 1
        if all(e.data == {"v": 1} for i in sim.ids for e in sim.gossip[i].entries().values()):
            break
        assert rounds < 60, "no convergence in 60 gossip rounds"
    per_node_round = (sim.sent - sent_before) / n / rounds
    print(f"\n200 nodes: every entry everywhere after {rounds} gossip rounds ({sim.now - start:.1f} s),", end=" ")
    print(f"{per_node_round:.1f} messages per node per round")
    assert rounds <= 30 and per_node_round < 20


@given(
    st.sampled_from([None, ms.ALIVE, ms.SUSPECT, ms.DEAD, ms.LEFT]),
    st.sampled_from([ms.ALIVE, ms.SUSPECT, ms.DEAD, ms.LEFT]),
)
def test_users_hear_of_every_change_except_the_death_of_a_node_never_seen(previous: str | None, state: str) -> None:
    event = membership_event(Changed("n1", "tcp://127.0.0.1:1", state, previous, 3), 12.5)
    if previous is None and state in (ms.DEAD, ms.LEFT):
        assert event is None
    else:
        assert event == {"node_id": "n1", "address": "tcp://127.0.0.1:1", "state": state, "time": 12.5}
