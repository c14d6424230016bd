"""Gossip core: unit tests, and simulated meshes with a fake clock (gossip alone, or with membership), deltas included.

Pure: no sockets, no threads, no sleeps. Run with ``-s`` to see the figures printed.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from zmesh.node.core import entry as en
from zmesh.node.core import gossip as gs
from zmesh.node.core import membership as ms
from zmesh.node.core.gossip import EntryChange, Gossip, GossipTimings
from zmesh.node.core.membership import Changed, Membership, MembershipTimings, Send

TICK = 0.02
FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
GOSSIP_KINDS = {"push", "sync", "sync_reply"}  # the daemon routes these to gossip, the rest to membership


class Sim:
    """N gossip cores, optionally with a membership core each (then the live members are the peers)."""

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        delay: tuple[float, float] = (0.001, 0.01),
        loss: float = 0.0,
        dup: float = 0.0,
        membership: bool = False,
        timings: GossipTimings | None = None,
        data: Callable[[str], dict[str, Any]] = lambda node: {"v": 0},
    ) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.delay, self.loss, self.dup = delay, loss, dup
        self.ids = [f"n{i}" for i in range(n)]
        timings = timings or GossipTimings()
        self.queue: list[tuple[float, int, str, str, dict[str, Any]]] = []
        self.counter = itertools.count()
        self.killed: set[str] = set()
        self.cut: set[str] = set()  # nodes that neither send nor receive (a partition)
        self.sent = {"gossip": 0, "swim": 0}
        self.wire: list[tuple[str, str, str, list[Any]]] = []  # (sender, to, kind, deltas) of every message with deltas
        self.changed: list[tuple[float, str, EntryChange]] = []  # (when, observer, what changed)
        self.gossip = {i: Gossip(i, 0, data(i), timings, 0.0, random.Random(seed * 7919 + k)) for k, i in enumerate(self.ids)}
        self.members: dict[str, Membership] = {}
        if membership:
            self.members = {
                i: Membership(i, f"addr-{i}", MembershipTimings(), 0.0, random.Random(seed * 1000 + k)) for k, i in enumerate(self.ids)
            }
            for a, b in itertools.combinations(self.ids, 2):  # every join handshake done
                self.route(a, self.members[a].add(b, f"addr-{b}", 0, 0.0))
                self.route(b, self.members[b].add(a, f"addr-{a}", 0, 0.0))

    def route(self, sender: str, actions: Iterable[Any]) -> None:
        for action in actions:
            if isinstance(action, Changed):
                if action.state in (ms.DEAD, ms.LEFT):  # as the daemon does
                    self.gossip[sender].forget(action.node_id, action.incarnation)
                continue
            assert isinstance(action, Send)
            self.sent["gossip" if action.message["k"] in GOSSIP_KINDS else "swim"] += 1
            if "deltas" in action.message:
                self.wire.append((sender, action.to, action.message["k"], action.message["deltas"]))
            if self.rng.random() < self.loss or sender in self.cut or action.to in self.cut:
                continue
            for _ in range(2 if self.rng.random() < self.dup else 1):  # a duplicate arrives at its own (random) time
                when = self.now + self.rng.uniform(*self.delay)
                heapq.heappush(self.queue, (when, next(self.counter), sender, action.to, action.message))

    def peers(self, node: str) -> list[tuple[str, str]]:
        if self.members:
            return [(m.node_id, m.address) for m in self.members[node].live()]
        return [(i, f"addr-{i}") for i in self.ids if i != node and i not in self.killed]

    def step(self) -> None:
        self.now = round(self.now + TICK, 6)
        while self.queue and self.queue[0][0] <= self.now:
            _, _, sender, to, message = heapq.heappop(self.queue)
            if to in self.killed:
                continue
            if message["k"] in GOSSIP_KINDS:
                if self.members:
                    self.route(to, self.members[to].heard_from(sender, self.now))
                replies, changed = self.gossip[to].receive(sender, message, self.now)
                self.changed += [(self.now, to, c) for c in changed]
                self.route(to, replies)
            else:
                self.route(to, self.members[to].heard_from(sender, self.now))
                self.route(to, self.members[to].receive(sender, message, self.now))
                self.gossip[to].set_incarnation(self.members[to].incarnation)
        for node in self.ids:
            if node in self.killed:
                continue
            if self.members:
                self.route(node, self.members[node].tick(self.now))
                self.gossip[node].set_incarnation(self.members[node].incarnation)
            self.route(node, self.gossip[node].tick(self.now, self.peers(node)))

    def run(self, seconds: float) -> None:
        end = self.now + seconds - TICK / 2
        while self.now < end:
            self.step()

    def run_until(self, predicate: Callable[[], bool], limit: float) -> float:
        start = self.now
        while not predicate():
            assert self.now - start < limit, f"not within {limit} s"
            self.step()
        return self.now - start

    def everyone_has(self, node: str, data: dict[str, Any]) -> bool:
        return all((e := self.gossip[o].entry(node)) is not None and e.data == data for o in self.ids if o not in self.killed)

    def converged(self) -> bool:
        """Every node holds every owner's entry exactly: same version, same data."""
        owners = {n: self.gossip[n].entry(n) for n in self.ids}
        return all(
            (e := self.gossip[o].entry(n)) is not None and e.key() == own.key() and e.data == own.data  # type: ignore[union-attr]
            for o in self.ids
            for n, own in owners.items()
        )


def core(me: str = "me", timings: GossipTimings | None = None) -> Gossip:
    return Gossip(me, 0, {"mine": True}, timings or GossipTimings(), 0.0, random.Random(0))


def full(node: str, incarnation: int, version: int, data: dict[str, Any]) -> list[Any]:
    """A whole entry on the wire."""
    fields = {k: v for k, v in data.items() if k != "actors"}
    return [node, incarnation, 0, version, fields, {"actors": data["actors"]} if "actors" in data else {}, {}]


def delta(node: str, incarnation: int, since: int, version: int, fields: Any = None, items: Any = None, deleted: Any = None) -> list[Any]:
    return [node, incarnation, since, version, fields or {}, items or {}, deleted or {}]


def push(*deltas: list[Any]) -> dict[str, Any]:
    return {"k": "push", "deltas": list(deltas)}


def keys(g: Gossip) -> dict[str, tuple[int, int]]:
    return {n: e.key() for n, e in g.entries().items()}


def state(g: Gossip, node: str) -> tuple[int, int, dict[str, Any]] | None:
    e = g.entry(node)
    return None if e is None else (e.incarnation, e.version, e.data)


def ids(changes: list[EntryChange]) -> list[str]:
    return [c.node_id for c in changes]


def new(node: str) -> EntryChange:
    return EntryChange(node, True)


# ---------------------------------------------------------------------- simulated meshes


def test_a_delta_reaches_everyone_in_a_few_rounds_by_pushes_alone() -> None:
    sim = Sim(30, seed=1, timings=GossipTimings(sync_interval_s=1e9))
    sim.run(2)
    sim.gossip["n7"].set_own({"v": 42}, sim.now)
    took = sim.run_until(lambda: sim.everyone_has("n7", {"v": 42}), 3)
    rounds = round(took / 0.1)
    print(f"\n30 nodes, fanout 3, no sync: a delta reached everyone in {rounds} rounds")
    assert rounds <= 10


def test_deltas_lost_on_the_way_are_repaired_by_the_periodic_sync() -> None:
    sim = Sim(20, seed=2, loss=0.3, timings=GossipTimings(fanout=1, delta_rounds=1, sync_interval_s=0.5))
    sim.run(3)
    sim.gossip["n7"].set_own({"v": 42}, sim.now)
    sim.run(0.3)
    assert not sim.everyone_has("n7", {"v": 42})  # one lossy push cannot have done it
    took = sim.run_until(lambda: sim.everyone_has("n7", {"v": 42}), 20)
    print(f"\n20 nodes, 30% loss, one push per delta: sync repaired it after {took + 0.3:.1f} s")


def test_entries_seen_by_every_node_only_ever_move_forward() -> None:
    sim = Sim(8, seed=3, delay=(0.001, 0.2), loss=0.1, timings=GossipTimings(sync_interval_s=0.3))
    seen: dict[tuple[str, str], tuple[int, int]] = {}
    for version in range(2, 40):
        sim.gossip[f"n{version % 8}"].set_own({"v": version}, sim.now)
        for _ in range(5):
            sim.step()
            for observer, node in itertools.product(sim.ids, sim.ids):
                entry = sim.gossip[observer].entry(node)
                if entry is None:
                    assert (observer, node) not in seen  # once known, a live node's entry never vanishes
                    continue
                assert entry.key() >= seen.get((observer, node), (0, 0))
                seen[observer, node] = entry.key()
    sim.run(10)
    assert all(keys(sim.gossip[o]) == keys(sim.gossip["n0"]) for o in sim.ids)


def test_a_dead_members_entry_is_forgotten_everywhere_and_stays_forgotten() -> None:
    sim = Sim(6, seed=4, membership=True)
    sim.run(2)
    assert all(sim.gossip[o].entry("n5") is not None for o in sim.ids)
    sim.killed.add("n5")
    sim.run_until(lambda: all(sim.gossip[o].entry("n5") is None for o in sim.ids[:5]), 5)
    sim.run(10)  # many syncs later
    assert all(sim.gossip[o].entry("n5") is None for o in sim.ids[:5])


def test_a_refuted_suspicion_restarts_the_entry_at_the_new_incarnation_and_it_wins() -> None:
    sim = Sim(5, seed=5, membership=True)
    sim.run(2)
    sim.gossip["n3"].set_own({"v": "before"}, sim.now)
    sim.run(1)
    # Someone suspects n3: it refutes with incarnation 1 and its entry restarts at (1, 1).
    sim.route("n0", [Send("n3", "addr-n3", {"k": "ping", "seq": 0, "r": [[ms.SUSPECT, "n3", "addr-n3", 0, "n0"]]})])
    sim.run(0.5)
    assert sim.gossip["n3"].entry("n3").key() == (1, 1)  # type: ignore[union-attr]
    sim.gossip["n3"].set_own({"v": "after"}, sim.now)
    sim.run_until(lambda: sim.everyone_has("n3", {"v": "after"}), 3)


def test_two_hundred_nodes_converge_in_a_few_rounds_at_a_few_messages_per_node() -> None:
    """Membership and gossip together; every node changes its entry at once. Prints the figures."""
    n = 200
    sim = Sim(n, seed=9, membership=True, delay=(0.001, 0.01))
    sim.run(0.5)
    before = dict(sim.sent)
    for i in sim.ids:
        sim.gossip[i].set_own({"v": 1}, sim.now)
    rounds = 0
    while not all(e.data == {"v": 1} for g in sim.gossip.values() for e in g.entries().values()):
        sim.run(0.1)
        rounds += 1
        assert rounds < 60, "no convergence in 60 gossip rounds"
    gossip_rate = (sim.sent["gossip"] - before["gossip"]) / n / rounds
    swim_rate = (sim.sent["swim"] - before["swim"]) / n / rounds
    print(f"\n200 nodes, every entry changed at once: everywhere after {rounds} rounds of 0.1 s;", end=" ")
    print(f"per node per round: {gossip_rate:.1f} gossip + {swim_rate:.1f} membership messages")
    assert rounds <= 30 and gossip_rate + swim_rate < 20


# ---------------------------------------------------------------------- one core


def test_a_push_pull_sync_leaves_both_sides_with_the_newest_of_everything() -> None:
    a, b = core("a"), core("b")
    a.receive("x", push(full("x", 0, 5, {"v": "a"}), full("y", 0, 1, {"v": "a"})), 0.0)
    b.receive("x", push(full("x", 0, 2, {"v": "b"}), full("z", 0, 1, {"v": "b"})), 0.0)
    request = a.sync_with("b", "addr-b")
    assert request.message == {"k": "sync", "digest": {"a": [0, 1], "x": [0, 5], "y": [0, 1]}}
    (reply,), changed = b.receive("a", request.message, 0.1)
    assert changed == [] and reply.to == "a" and reply.message["k"] == "sync_reply"
    # b sends what a lacks or has older (its own entry, z) and asks, with its versions, for what it lacks (a's own, x, y).
    assert [e[0] for e in reply.message["deltas"]] == ["b", "z"]
    assert reply.message["want"] == {"a": [0, 0], "x": [0, 2], "y": [0, 0]}
    (answer,), changed = a.receive("b", reply.message, 0.2)
    assert changed == [new("b"), new("z")] and [e[0] for e in answer.message["deltas"]] == ["a", "x", "y"]
    _, changed = b.receive("a", answer.message, 0.3)
    assert changed == [new("a"), new("x"), new("y")]
    assert keys(a) == keys(b) == {"a": (0, 1), "b": (0, 1), "x": (0, 5), "y": (0, 1), "z": (0, 1)}


def test_an_entry_never_goes_backwards() -> None:
    g = core()
    assert g.receive("p", push(full("x", 1, 5, {"v": 5})), 0.0) == ([], [new("x")])
    stale = [full("x", 1, 4, {"v": 4}), full("x", 0, 9, {"v": 9}), full("x", 1, 5, {"v": "same key"}), delta("x", 1, 3, 5, {"v": 3})]
    assert g.receive("p", push(*stale), 0.0) == ([], [])
    assert state(g, "x") == (1, 5, {"v": 5})
    assert g.receive("p", push(full("x", 2, 1, {"v": "new life"})), 0.0) == ([], [new("x")])


def test_a_node_never_takes_its_own_entry_from_others_nor_is_sent_it() -> None:
    g = core()
    g.receive("p", push(full("me", 9, 9, {"forged": True}), delta("me", 0, 1, 2, {"mine": False})), 0.0)
    assert state(g, "me") == (0, 1, {"mine": True})
    (reply,), _ = g.receive("p", {"k": "sync", "digest": {"me": [5, 5]}}, 0.0)
    assert "me" not in reply.message["want"]
    g.receive("p", push(full("p", 0, 3, {}), full("q", 0, 3, {})), 0.0)
    for s in g.tick(0.0, [("p", "addr-p"), ("q", "addr-q")]):
        if s.message["k"] == "push":
            assert s.to not in [e[0] for e in s.message["deltas"]]


def test_forgotten_nodes_stay_forgotten_until_a_higher_incarnation() -> None:
    g = core()
    g.receive("p", push(full("x", 1, 5, {"v": 5})), 0.0)
    assert g.forget("x", 1) is True and g.entry("x") is None
    assert g.forget("x", 0) is False  # the tombstone keeps the highest incarnation
    assert g.receive("p", push(full("x", 1, 99, {"v": 99})), 0.0) == ([], [])
    assert g.receive("p", {"k": "sync_reply", "deltas": [full("x", 0, 100, {})], "want": {}}, 0.0) == ([], [])
    (reply,), _ = g.receive("p", {"k": "sync", "digest": {"x": [1, 100]}}, 0.0)
    assert reply.message["want"] == {}  # we do not even ask for it
    assert g.entry("x") is None
    assert g.receive("p", push(full("x", 2, 1, {"v": "reborn"})), 0.0) == ([], [new("x")])
    assert g.forget("x", 1) is False and g.entry("x") is not None  # a stale death does not take the new life
    assert g.forget("me", 5) is False and g.entry("me") is not None


def test_set_incarnation_restarts_our_version_and_pushes_it() -> None:
    g = core()
    g.set_own({"v": 2}, 0.0)
    g.set_own({"v": 3}, 0.0)
    assert g.entry("me").key() == (0, 3)  # type: ignore[union-attr]
    g.set_incarnation(4)
    assert g.entry("me").key() == (4, 1)  # type: ignore[union-attr]
    g.set_incarnation(2)
    assert g.entry("me").key() == (4, 1)  # type: ignore[union-attr]
    (sent,) = [s for s in g.tick(0.0, [("p", "addr-p")]) if s.message["k"] == "push"]
    assert sent.message["deltas"] == [["me", 4, 0, 1, {"v": 3}, {}, {}]]  # a new incarnation goes whole


def test_a_delta_is_pushed_to_fanout_peers_for_a_bounded_number_of_rounds() -> None:
    g = core(timings=GossipTimings(fanout=2, delta_rounds=3, sync_interval_s=1e9))
    peers = [(f"p{i}", f"addr-p{i}") for i in range(10)]
    pushes = []
    for r in range(10):
        pushes.append([s.to for s in g.tick(r * 0.1, peers)])
    assert [len(p) for p in pushes] == [2, 2, 2] + [0] * 7
    assert g.next_deadline() > 1.0  # nothing fresh: only the (far) sync is due


def test_a_push_carries_a_bounded_number_of_entries_newest_first() -> None:
    g = core(timings=GossipTimings(fanout=1, delta_rounds=2, sync_interval_s=1e9))
    g.receive("p", push(*(full(f"x{i}", 0, 1, {}) for i in range(300))), 0.0)
    pushed: dict[str, int] = {}
    now = 0.0
    while (out := g.tick(now, [("p", "addr-p")])) or now < 0.2:
        for s in out:
            assert len(s.message["deltas"]) <= gs._MAX_PUSH
            for e in s.message["deltas"]:
                pushed[e[0]] = pushed.get(e[0], 0) + 1
        now += 0.1
    assert len(pushed) == 301 and set(pushed.values()) == {2}


def test_without_peers_the_deadlines_still_move_on() -> None:
    g = core()
    for t in (0.0, 5.0, 10.0):
        assert g.tick(t, []) == []
        assert g.next_deadline() > t
    g.set_own({"v": 2}, 10.0)
    assert g.next_deadline() == 10.0
    assert [s.message["k"] for s in g.tick(10.0, [("p", "addr-p")])] == ["push"]


def test_replies_go_to_the_address_last_seen_for_the_sender() -> None:
    g = core()
    g.tick(0.0, [("p", "tcp://p")])
    (reply,), _ = g.receive("p", {"k": "sync", "digest": {}}, 0.0)
    assert reply.address == "tcp://p"
    (reply,), _ = g.receive("stranger", {"k": "sync", "digest": {}}, 0.0)
    assert reply.address == ""  # the daemon looks it up


# ---------------------------------------------------------------------- deltas, one core


def test_set_own_bumps_the_version_once_per_change_and_a_delta_carries_only_what_changed() -> None:
    g = Gossip("me", 0, {"f": 1, "actors": {"a": 1, "b": 2}}, GossipTimings(), 0.0, random.Random(0))
    g.set_own({"f": 1, "actors": {"a": 1, "b": 2}}, 0.0)
    assert keys(g) == {"me": (0, 1)}  # nothing changed: no new version
    g.set_own({"f": 2, "actors": {"a": 1, "b": 3, "c": 4}}, 0.0)
    g.set_own({"f": 2, "actors": {"a": 1, "c": 4}}, 0.0)
    own = g.entry("me")
    assert own is not None and own.key() == (0, 3) and own.data == {"f": 2, "actors": {"a": 1, "c": 4}}
    assert own.delta(2).wire() == ["me", 0, 2, 3, {}, {}, {"actors": ["b"]}]
    assert own.delta(1).wire() == ["me", 0, 1, 3, {"f": 2}, {"actors": {"c": 4}}, {"actors": ["b"]}]
    assert own.delta(0).wire() == ["me", 0, 0, 3, {"f": 2}, {"actors": {"a": 1, "c": 4}}, {}]
    # A field that goes away has no marker: that version goes whole to anyone older.
    g.set_own({"actors": {"a": 1, "c": 4}}, 0.0)
    assert own.key() == (0, 4) and own.horizon == 4 and own.delta(3).since == 0
    g.set_own({"actors": {"a": 1, "c": 5}, "new": 1}, 0.0)
    assert own.delta(4).wire() == ["me", 0, 4, 5, {"new": 1}, {"actors": {"c": 5}}, {}]


def test_own_data_that_peers_would_refuse_is_refused_at_once_and_changes_nothing() -> None:
    g = Gossip("me", 0, {"actors": {}}, GossipTimings(), 0.0, random.Random(0))
    for bad in ({"actors": [1]}, {"actors": {"k" * 1025: 1}}, {"actors": {7: 1}}, {1: "x"}):
        with pytest.raises(ValueError):
            g.set_own(bad, 0.0)
    assert state(g, "me") == (0, 1, {"actors": {}})
    with pytest.raises(ValueError):
        Gossip("me", 0, {}, GossipTimings(), 0.0, random.Random(0), sections=("",))


def test_a_receiver_applies_a_delta_that_starts_at_or_before_its_version_and_ignores_one_with_a_gap() -> None:
    g = core()
    g.receive("p", push(full("x", 0, 3, {"f": 1, "actors": {"a": 1, "b": 2}})), 0.0)
    assert g.receive("p", push(delta("x", 0, 4, 5, {"f": 9})), 0.0) == ([], [])  # a gap: anti-entropy repairs it
    assert g.receive("p", push(delta("x", 1, 2, 9, {"f": 9})), 0.0) == ([], [])  # another incarnation must come whole
    d = delta("x", 0, 2, 5, {"f": 2}, {"actors": {"c": 3}}, {"actors": ["b", "gone-long-ago"]})
    _, changes = g.receive("p", push(d), 0.0)
    assert changes == [EntryChange("x", False, frozenset({"f"}), {"actors": frozenset({"b", "c", "gone-long-ago"})})]
    assert state(g, "x") == (0, 5, {"f": 2, "actors": {"a": 1, "c": 3}})
    assert g.receive("p", push(d, d), 0.0) == ([], [])  # idempotent: seen already
    # What it learned it forwards from its own version: what changed in (3, 5].
    e = g.entry("x")
    assert e is not None and e.delta(3).wire() == ["x", 0, 3, 5, {"f": 2}, {"actors": {"c": 3}}, {"actors": ["gone-long-ago", "b"]}]
    assert e.delta(2).since == 0  # before the whole entry it started from: it can only send all of it
    # Two deltas for one entry in one message: one change naming both.
    _, changes = g.receive("p", push(delta("x", 0, 5, 6, {"g": 1}), delta("x", 0, 6, 7, None, {"actors": {"a": 2}})), 0.0)
    assert changes == [EntryChange("x", False, frozenset({"g"}), {"actors": frozenset({"a"})})]


def test_sync_answers_with_the_delta_since_the_askers_version_or_the_whole_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(en, "KEEP_VERSIONS", 3)
    b = Gossip("b", 1, {"actors": {f"a{i}": i for i in range(50)}}, GossipTimings(), 0.0, random.Random(0))
    b.set_own({"actors": {**{f"a{i}": i for i in range(50)}, "a7": "changed"}}, 0.0)
    (reply,), _ = b.receive("a", {"k": "sync", "digest": {"b": [1, 1]}}, 0.0)
    assert reply.message["deltas"] == [["b", 1, 1, 2, {}, {"actors": {"a7": "changed"}}, {}]]
    (reply,), _ = b.receive("a", {"k": "sync", "digest": {"b": [0, 9]}}, 0.0)  # an older incarnation
    assert reply.message["deltas"][0][2] == 0 and len(reply.message["deltas"][0][5]["actors"]) == 50
    for i in range(5):  # five deletions, one per version: the oldest markers expire
        b.set_own({"actors": {f"a{j}": j for j in range(i + 1, 50)}}, 0.0)
    own = b.entry("b")
    assert own is not None and own.key() == (1, 7) and own.horizon == 4
    (reply,), _ = b.receive("a", {"k": "sync", "digest": {"b": [1, 4]}}, 0.0)
    assert reply.message["deltas"] == [["b", 1, 4, 7, {}, {}, {"actors": ["a4", "a3", "a2"]}]]
    (reply,), _ = b.receive("a", {"k": "sync", "digest": {"b": [1, 3]}}, 0.0)
    assert reply.message["deltas"][0][2] == 0  # older than the markers kept: the whole entry
    # The want list carries the answerer's versions, and the asker answers it the same way.
    (push_back,), _ = b.receive("a", {"k": "sync_reply", "deltas": [], "want": {"b": [1, 6]}}, 0.0)
    assert push_back.message == {"k": "push", "deltas": [["b", 1, 6, 7, {}, {}, {"actors": ["a4"]}]]}


def test_deletion_markers_are_bounded_in_number_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(en, "MAX_MARKERS", 3)
    g = Gossip("me", 0, {"actors": {f"a{i}": i for i in range(10)}}, GossipTimings(), 0.0, random.Random(0))
    g.set_own({"actors": {"a9": 9}}, 0.0)  # nine deletions in one version: more than the markers kept
    own = g.entry("me")
    assert own is not None and own.horizon == 2 and own.delta(1).since == 0


# ---------------------------------------------------------------------- deltas, simulated meshes


def test_a_steady_two_thousand_item_entry_with_one_change_per_round_pushes_a_few_items() -> None:
    """Counts the items on the wire in every push: what changed lately, never the entry's 2,000 rows."""
    rows = {f"actor-{i:04}": ["Counter", "ALIVE", i] for i in range(2000)}
    sim = Sim(5, seed=11, data=lambda n: {"address": n, "actors": dict(rows) if n == "n0" else {}})
    sim.run_until(sim.converged, 5)
    sim.run(1)
    sim.wire.clear()
    for r in range(50):
        rows = {**rows, f"actor-{r:04}": ["Counter", "RESTARTING", r]}
        sim.gossip["n0"].set_own({"address": "n0", "actors": rows}, sim.now)
        sim.run(0.1)
    sim.run_until(sim.converged, 5)
    pushes = [deltas for _, _, kind, deltas in sim.wire if kind == "push"]
    counts = [sum(en.parse(d, {"actors"}).count() for d in deltas) for deltas in pushes]
    whole = [d for deltas in pushes for d in deltas if d[2] == 0]
    print(f"\n5 nodes, a 2,000-item entry, one item changed per round: {len(counts)} pushes,", end=" ")
    print(f"{sum(counts) / len(counts):.1f} items per push on average, {max(counts)} at most")
    assert counts and max(counts) <= 8 and not whole


def test_expired_deletion_markers_force_a_whole_entry_that_still_converges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(en, "KEEP_VERSIONS", 5)
    items = {f"a{i}": i for i in range(100)}
    sim = Sim(5, seed=12, data=lambda n: {"actors": dict(items) if n == "n0" else {}}, timings=GossipTimings(sync_interval_s=0.3))
    sim.run_until(sim.converged, 5)
    sim.cut.add("n4")
    for r in range(20):  # n4 misses twenty versions, each a deletion and an addition
        del items[f"a{r}"]
        items[f"b{r}"] = r
        sim.gossip["n0"].set_own({"actors": dict(items)}, sim.now)
        sim.run(0.1)
    sim.wire.clear()
    sim.cut.clear()
    sim.run_until(sim.converged, 10)
    assert any(to == "n4" and d[0] == "n0" and d[2] == 0 for _, to, _, deltas in sim.wire for d in deltas)
    assert sim.gossip["n4"].entry("n0").data == {"actors": items}  # type: ignore[union-attr]


change = st.one_of(
    st.tuples(st.just("put"), st.integers(0, 5), st.integers(0, 3)),  # add or modify an item
    st.tuples(st.just("delete"), st.integers(0, 5), st.just(0)),
    st.tuples(st.just("field"), st.integers(0, 2), st.integers(0, 3)),
    st.tuples(st.just("drop_field"), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("incarnation"), st.just(0), st.just(0)),
)


def scenario(n: int, steps: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            # (node, its changes, each followed by set_own, then ticks of the clock)
            "steps": st.lists(
                st.tuples(st.integers(0, n - 1), st.lists(change, min_size=1, max_size=4), st.integers(0, 8)), min_size=1, max_size=steps
            ),
            "loss": st.floats(0, 0.3),
            "dup": st.floats(0, 0.3),
            "delay": st.floats(0.001, 0.3),  # up to 15 rounds of jitter: messages overtake each other
            "seed": st.integers(0, 2**16),
        }
    )


def converge_under_faults(n: int, plan: dict[str, Any]) -> None:
    sim = Sim(n, seed=plan["seed"], delay=(0.001, plan["delay"]), loss=plan["loss"], dup=plan["dup"], data=lambda _: {"actors": {}})
    model: dict[str, dict[str, Any]] = {i: {"actors": {}} for i in sim.ids}
    for node_index, changes, ticks in plan["steps"]:
        node = sim.ids[node_index]
        g, data = sim.gossip[node], model[node]
        for op, k, value in changes:
            data = {**data, "actors": dict(data["actors"])}
            if op == "put":
                data["actors"][f"a{k}"] = [value, k]
            elif op == "delete":
                data["actors"].pop(f"a{k}", None)
            elif op == "field":
                data[f"f{k}"] = {"x": value}
            elif op == "drop_field":
                data.pop(f"f{k}", None)
            else:
                g.set_incarnation(g.entry(node).incarnation + 1)  # type: ignore[union-attr]
            g.set_own(data, sim.now)
        model[node] = data
        for _ in range(ticks):
            sim.step()
    sim.run_until(sim.converged, 60)
    for observer in sim.ids:
        assert {node: e.data for node, e in sim.gossip[observer].entries().items()} == model


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario(5, 40))
def test_five_nodes_end_with_exactly_the_owners_data_whatever_the_changes_and_the_network(plan: dict[str, Any]) -> None:
    converge_under_faults(5, plan)


BUSY = [(i, [("put", i % 6, i % 4), ("field", i % 3, i)], 2) for i in range(0, 50, 3)]
BUSY += [(i, [("delete", i % 6, 0), ("put", (i + 1) % 6, 9)], 3) for i in range(0, 50, 3)]
BUSY += [(i, [("drop_field", i % 3, 0)], 1) for i in range(0, 50, 4)]
BUSY += [(i, [("incarnation", 0, 0), ("delete", (i + 1) % 6, 0)], 1) for i in range(0, 50, 6)]


@pytest.mark.timeout(120)
@settings(max_examples=8, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario(50, 60))
@example({"steps": BUSY, "loss": 0.2, "dup": 0.2, "delay": 0.3, "seed": 1})
def test_fifty_nodes_end_with_exactly_the_owners_data_whatever_the_changes_and_the_network(plan: dict[str, Any]) -> None:
    converge_under_faults(50, plan)


# ---------------------------------------------------------------------- bad input

ops = st.lists(
    st.tuples(
        st.sampled_from(["push", "sync_reply", "forget"]),
        st.sampled_from(["x", "y", "me"]),
        st.integers(0, 3),
        st.integers(1, 5),
    ),
    max_size=30,
)


@FAST
@given(ops)
def test_any_sequence_of_news_and_deaths_only_moves_entries_forward(operations: list[tuple[str, str, int, int]]) -> None:
    g = core()
    tombstone: dict[str, int] = {}
    for op, node, incarnation, version in operations:
        before = state(g, node)
        if op == "forget":
            g.forget(node, incarnation)
            if node != "me":
                tombstone[node] = max(incarnation, tombstone.get(node, -1))
            continue
        item = full(node, incarnation, version, {"v": [incarnation, version]})
        message = push(item) if op == "push" else {"k": "sync_reply", "deltas": [item], "want": {}}
        _, changed = g.receive("p", message, 0.0)
        after = state(g, node)
        if node == "me":
            assert after == (0, 1, {"mine": True}) and changed == []
        elif incarnation <= tombstone.get(node, -1) or (before is not None and (incarnation, version) <= before[:2]):
            assert after == before and changed == []
        else:
            assert after == (incarnation, version, {"v": [incarnation, version]}) and changed == [new(node)]
        for name, entry in g.entries().items():
            assert entry.incarnation > tombstone.get(name, -1)


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=5) | st.tuples(children, children) | st.dictionaries(st.text(max_size=4), children, max_size=5)
    ),
    max_leaves=15,
)
fields = st.dictionaries(st.sampled_from(["k", "deltas", "digest", "want"]), junk, max_size=4)
near_values = st.sampled_from(["x", "me", "actors", 0, 1, 2, -1, 2**70, {}, {"actors": {}}, {"actors": ["a"]}])
near_delta = st.lists(junk | near_values, min_size=6, max_size=8)


def snapshot(g: Gossip) -> Any:
    entries = {n: (e.key(), e.horizon, repr(e.data), repr(e._stamps), repr(e._deleted)) for n, e in g.entries().items()}
    return (entries, repr(g._fresh), dict(g._tombstones), g.next_deadline())


@FAST
@given(junk | fields, fields, st.sampled_from(["push", "sync", "sync_reply", "nope"]), st.lists(near_delta, max_size=3), junk)
def test_garbage_raises_value_error_and_changes_nothing(anything: Any, some: dict[str, Any], kind: str, deltas: Any, other: Any) -> None:
    g = core()
    g.receive("p", push(full("x", 0, 2, {"f": 1, "actors": {"a": 1}})), 0.0)
    for message in (
        anything,
        some,
        {**some, "k": kind},
        {"k": kind, "deltas": deltas, "digest": other, "want": other},
        {"k": kind, "deltas": [full("x", 0, 9, {"f": 2}), *deltas], "digest": {"x": other}, "want": {"x": other}},
    ):
        before = snapshot(g)
        try:
            g.receive("p", message, 0.1)
        except ValueError:
            assert snapshot(g) == before


GOOD = ["y", 0, 1, 2, {}, {}, {}]


def bad(position: int, value: Any) -> dict[str, Any]:
    """A push of a good delta for x, then a delta for y with one field wrong."""
    wrong = list(GOOD)
    wrong[position] = value
    return push(delta("x", 0, 1, 5, {"f": "new"}), wrong)


@pytest.mark.parametrize(
    "message",
    [
        None,
        [],
        {},
        {"k": "pull"},
        {"k": "push"},
        {"k": "push", "entries": [["y", 0, 1, {}]]},  # the old whole-entry format
        {"k": "push", "deltas": {}},
        {"k": "push", "deltas": "y"},
        push(["y", 0, 1, 2, {}, {}]),
        push(["y", 0, 1, 2, {}, {}, {}, {}]),
        push({"y": GOOD}),
        *(bad(0, v) for v in ("", None, 5, "y" * 129, ["y"])),
        *(bad(1, v) for v in ("0", True, -1, 1.5, 2**70, None)),
        *(bad(2, v) for v in ("1", -1, None, 2, 3, 2**70)),  # from must be an int below to
        *(bad(3, v) for v in ("2", 0, 1.5, 2**70, None)),
        *(bad(4, v) for v in (None, [], [["f", 1]], {1: "x"}, {"actors": {}}, {f"f{i}": i for i in range(257)})),
        *(bad(5, v) for v in (None, [], {"nope": {}}, {"actors": []}, {"actors": {1: 1}}, {"actors": {"k" * 1025: 1}})),
        *(bad(6, v) for v in (None, [], {"nope": []}, {"actors": "a"}, {"actors": {"a": 1}}, {"actors": [1]}, {"actors": [["a"]]})),
        push(["y", 0, 1, 2, {}, {"actors": {"a": 1}}, {"actors": ["a"]}]),  # changed and deleted at once
        push(["y", 0, 0, 2, {}, {}, {"actors": ["a"]}]),  # a whole entry has nothing to delete
        {"k": "sync"},
        {"k": "sync", "digest": [["y", 0, 1]]},
        {"k": "sync", "digest": {"y": [0]}},
        {"k": "sync", "digest": {"y": ["0", 1]}},
        {"k": "sync", "digest": {"": [0, 1]}},
        {"k": "sync_reply", "deltas": [GOOD]},
        {"k": "sync_reply", "deltas": [GOOD], "want": "x"},
        {"k": "sync_reply", "deltas": [GOOD], "want": ["x"]},
        {"k": "sync_reply", "deltas": [GOOD], "want": {"x": [0]}},
        {"k": "sync_reply", "deltas": [GOOD], "want": {"x": [0, -1]}},
        {"k": "sync_reply", "deltas": "y", "want": {}},
    ],
)
def test_malformed_messages_are_refused_before_anything_is_applied(message: Any) -> None:
    g = core()
    g.receive("p", push(full("x", 0, 1, {"f": "old"})), 0.0)
    before = snapshot(g)
    with pytest.raises(ValueError):
        g.receive("p", message, 0.1)
    assert snapshot(g) == before and g.entry("y") is None


def test_huge_sections_are_refused_and_cannot_grow_an_entry_past_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    g = Gossip("me", 0, {}, GossipTimings(), 0.0, random.Random(0), sections=("actors", "objects"))
    huge = {f"a{i}": 0 for i in range(en.MAX_ITEMS + 1)}
    with pytest.raises(ValueError):
        g.receive("p", push(["y", 0, 0, 1, {}, {"actors": huge}, {}]), 0.0)
    monkeypatch.setattr(en, "MAX_ITEMS", 50)
    half = {f"a{i}": 0 for i in range(30)}
    for message in (
        push(["y", 0, 0, 1, {}, {"actors": half, "objects": half}, {}]),  # all sections together
        push(["y", 0, 1, 2, {}, {"actors": half}, {"objects": list(half)}]),  # deletions count too
    ):
        before = snapshot(g)
        with pytest.raises(ValueError):
            g.receive("p", message, 0.0)
        assert snapshot(g) == before
    g.receive("p", push(["y", 0, 0, 1, {}, {"actors": half}, {}]), 0.0)
    before = snapshot(g)
    more = {f"b{i}": 0 for i in range(30)}
    assert g.receive("p", push(["y", 0, 1, 2, {}, {"objects": more}, {}]), 0.0) == ([], [])  # would hold 60: ignored
    assert snapshot(g) == before
    # Replacing items (or deleting some first) stays within it.
    _, changes = g.receive("p", push(["y", 0, 1, 2, {}, {"objects": dict(list(more.items())[:25])}, {"actors": list(half)[:10]}]), 0.0)
    assert ids(changes) == ["y"] and g.entry("y").size() == 45  # type: ignore[union-attr]


def test_a_flood_of_entries_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gs, "_MAX_ENTRIES", 500)
    g = core()
    for i in range(10):
        g.receive("p", push(*(full(f"s{i}-{j}", 0, 1, {}) for j in range(100))), 0.0)
    assert len(g.entries()) == 500
    with pytest.raises(ValueError):
        g.receive("p", push(*(full(f"t{j}", 0, 1, {}) for j in range(501))), 0.0)
    for i in range(600):
        g.forget(f"dead{i}", 0)
    assert len(g._tombstones) == 500


def test_timings_are_validated() -> None:
    with pytest.raises(ValueError):
        GossipTimings(fanout=0)
    with pytest.raises(ValueError):
        GossipTimings(round_s=0)
