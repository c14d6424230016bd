"""Gossip core: unit tests, and simulated meshes with a fake clock (gossip alone, or with membership).

Pure: no sockets, no threads, no sleeps. Run with ``-s`` to see the figures printed.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmesh.node.core import gossip as gs
from zmesh.node.core import membership as ms
from zmesh.node.core.gossip import Entry, Gossip, GossipTimings
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
        membership: bool = False,
        timings: GossipTimings | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.delay, self.loss = delay, loss
        self.ids = [f"n{i}" for i in range(n)]
        timings = timings or GossipTimings()
        self.queue: list[tuple[float, int, str, str, dict[str, Any]]] = []
        self.counter = itertools.count()
        self.killed: set[str] = set()
        self.sent = {"gossip": 0, "swim": 0}
        self.changed: list[tuple[float, str, str]] = []  # (when, observer, node whose entry changed)
        self.gossip = {i: Gossip(i, 0, {"v": 0}, timings, 0.0, random.Random(seed * 7919 + k)) for k, i in enumerate(self.ids)}
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
            if self.rng.random() < self.loss:
                continue
            heapq.heappush(self.queue, (self.now + self.rng.uniform(*self.delay), next(self.counter), sender, action.to, action.message))

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


def core(me: str = "me", timings: GossipTimings | None = None) -> Gossip:
    return Gossip(me, 0, {"mine": True}, timings or GossipTimings(), 0.0, random.Random(0))


def push(*entries: list[Any]) -> dict[str, Any]:
    return {"k": "push", "entries": list(entries)}


def keys(g: Gossip) -> dict[str, tuple[int, int]]:
    return {n: e.key() for n, e in g.entries().items()}


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
    a.receive("x", push(["x", 0, 5, {"v": "a"}], ["y", 0, 1, {"v": "a"}]), 0.0)
    b.receive("x", push(["x", 0, 2, {"v": "b"}], ["z", 0, 1, {"v": "b"}]), 0.0)
    request = a.sync_with("b", "addr-b")
    assert request.message == {"k": "sync", "digest": {"a": [0, 1], "x": [0, 5], "y": [0, 1]}}
    (reply,), changed = b.receive("a", request.message, 0.1)
    assert changed == [] and reply.to == "a" and reply.message["k"] == "sync_reply"
    # b sends what a lacks or has older (its own entry, z) and asks for what it lacks (a's own, x, y).
    assert [e[0] for e in reply.message["entries"]] == ["b", "z"] and reply.message["want"] == ["a", "x", "y"]
    (answer,), changed = a.receive("b", reply.message, 0.2)
    assert changed == ["b", "z"] and [e[0] for e in answer.message["entries"]] == ["a", "x", "y"]
    _, changed = b.receive("a", answer.message, 0.3)
    assert changed == ["a", "x", "y"]
    assert keys(a) == keys(b) == {"a": (0, 1), "b": (0, 1), "x": (0, 5), "y": (0, 1), "z": (0, 1)}


def test_an_entry_never_goes_backwards() -> None:
    g = core()
    assert g.receive("p", push(["x", 1, 5, {"v": 5}]), 0.0) == ([], ["x"])
    assert g.receive("p", push(["x", 1, 4, {"v": 4}], ["x", 0, 9, {"v": 9}], ["x", 1, 5, {"v": "same key"}]), 0.0) == ([], [])
    assert g.entry("x") == Entry("x", 1, 5, {"v": 5})
    assert g.receive("p", push(["x", 2, 0, {"v": "new life"}]), 0.0) == ([], ["x"])


def test_a_node_never_takes_its_own_entry_from_others_nor_is_sent_it() -> None:
    g = core()
    g.receive("p", push(["me", 9, 9, {"forged": True}]), 0.0)
    assert g.entry("me") == Entry("me", 0, 1, {"mine": True})
    (reply,), _ = g.receive("p", {"k": "sync", "digest": {}}, 0.0)
    assert "me" not in reply.message["want"]
    g.receive("p", push(["p", 0, 3, {}], ["q", 0, 3, {}]), 0.0)
    for s in g.tick(0.0, [("p", "addr-p"), ("q", "addr-q")]):
        if s.message["k"] == "push":
            assert s.to not in [e[0] for e in s.message["entries"]]


def test_forgotten_nodes_stay_forgotten_until_a_higher_incarnation() -> None:
    g = core()
    g.receive("p", push(["x", 1, 5, {"v": 5}]), 0.0)
    assert g.forget("x", 1) is True and g.entry("x") is None
    assert g.forget("x", 0) is False  # the tombstone keeps the highest incarnation
    assert g.receive("p", push(["x", 1, 99, {"v": 99}]), 0.0) == ([], [])
    assert g.receive("p", {"k": "sync_reply", "entries": [["x", 0, 100, {}]], "want": []}, 0.0) == ([], [])
    (reply,), _ = g.receive("p", {"k": "sync", "digest": {"x": [1, 100]}}, 0.0)
    assert reply.message["want"] == []  # we do not even ask for it
    assert g.entry("x") is None
    assert g.receive("p", push(["x", 2, 1, {"v": "reborn"}]), 0.0) == ([], ["x"])
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
    assert sent.message["entries"] == [["me", 4, 1, {"v": 3}]]


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
    g.receive("p", push(*([f"x{i}", 0, 1, {}] for i in range(300))), 0.0)
    pushed: dict[str, int] = {}
    now = 0.0
    while (out := g.tick(now, [("p", "addr-p")])) or now < 0.2:
        for s in out:
            assert len(s.message["entries"]) <= gs._MAX_PUSH
            for e in s.message["entries"]:
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


# ---------------------------------------------------------------------- bad input

ops = st.lists(
    st.tuples(
        st.sampled_from(["push", "sync_reply", "forget"]),
        st.sampled_from(["x", "y", "me"]),
        st.integers(0, 3),
        st.integers(0, 5),
    ),
    max_size=30,
)


@FAST
@given(ops)
def test_any_sequence_of_news_and_deaths_only_moves_entries_forward(operations: list[tuple[str, str, int, int]]) -> None:
    g = core()
    tombstone: dict[str, int] = {}
    for op, node, incarnation, version in operations:
        before = g.entry(node)
        if op == "forget":
            g.forget(node, incarnation)
            if node != "me":
                tombstone[node] = max(incarnation, tombstone.get(node, -1))
            continue
        item = [node, incarnation, version, {"v": [incarnation, version]}]
        message = push(item) if op == "push" else {"k": "sync_reply", "entries": [item], "want": []}
        _, changed = g.receive("p", message, 0.0)
        after = g.entry(node)
        if node == "me":
            assert after == Entry("me", 0, 1, {"mine": True}) and changed == []
        elif incarnation <= tombstone.get(node, -1) or (before is not None and (incarnation, version) <= before.key()):
            assert after == before and changed == []
        else:
            assert after == Entry(node, incarnation, version, {"v": [incarnation, version]}) and changed == [node]
        for name, entry in g.entries().items():
            assert entry.incarnation > tombstone.get(name, -1)


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=5) | st.tuples(children, children) | st.dictionaries(st.text(max_size=4), children, max_size=5)
    ),
    max_leaves=15,
)
fields = st.dictionaries(st.sampled_from(["k", "entries", "digest", "want"]), junk, max_size=4)
near_entry = st.lists(junk | st.sampled_from(["x", "me", 0, 1, -1, 2**70, {}]), min_size=3, max_size=5)


def snapshot(g: Gossip) -> Any:
    return (keys(g), dict(g._fresh), dict(g._tombstones), g.next_deadline())


@FAST
@given(junk | fields, fields, st.sampled_from(["push", "sync", "sync_reply", "nope"]), st.lists(near_entry, max_size=3), junk)
def test_garbage_raises_value_error_and_changes_nothing(anything: Any, some: dict[str, Any], kind: str, entries: Any, other: Any) -> None:
    g = core()
    g.receive("p", push(["x", 0, 1, {}]), 0.0)
    for message in (
        anything,
        some,
        {**some, "k": kind},
        {"k": kind, "entries": entries, "digest": other, "want": other},
        {"k": kind, "entries": entries, "digest": {"x": other}, "want": [other]},
    ):
        before = snapshot(g)
        try:
            g.receive("p", message, 0.1)
        except ValueError:
            assert snapshot(g) == before


@pytest.mark.parametrize(
    "message",
    [
        None,
        [],
        {},
        {"k": "pull"},
        {"k": "push"},
        {"k": "push", "entries": {}},
        {"k": "push", "entries": [["y", 0, 1]]},
        {"k": "push", "entries": [["y", 0, 1, []]]},
        {"k": "push", "entries": [["y", "0", 1, {}]]},
        {"k": "push", "entries": [["y", 0, 1.5, {}]]},
        {"k": "push", "entries": [["y", True, 1, {}]]},
        {"k": "push", "entries": [["y", -1, 1, {}]]},
        {"k": "push", "entries": [["", 0, 1, {}]]},
        {"k": "push", "entries": [[None, 0, 1, {}]]},
        {"k": "push", "entries": [["y", 0, 1, {}], ["z", 0, 2**70, {}]]},
        {"k": "sync"},
        {"k": "sync", "digest": [["y", 0, 1]]},
        {"k": "sync", "digest": {"y": [0]}},
        {"k": "sync", "digest": {"y": ["0", 1]}},
        {"k": "sync", "digest": {"": [0, 1]}},
        {"k": "sync_reply", "entries": [["y", 0, 1, {}]]},
        {"k": "sync_reply", "entries": [["y", 0, 1, {}]], "want": "x"},
        {"k": "sync_reply", "entries": [["y", 0, 1, {}]], "want": [1]},
        {"k": "sync_reply", "entries": "y", "want": []},
    ],
)
def test_malformed_messages_are_refused_before_anything_is_applied(message: Any) -> None:
    g = core()
    g.receive("p", push(["x", 0, 1, {}]), 0.0)
    before = snapshot(g)
    with pytest.raises(ValueError):
        g.receive("p", message, 0.1)
    assert snapshot(g) == before and g.entry("y") is None


def test_a_flood_of_entries_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gs, "_MAX_ENTRIES", 500)
    g = core()
    for i in range(10):
        g.receive("p", push(*([f"s{i}-{j}", 0, 1, {}] for j in range(100))), 0.0)
    assert len(g.entries()) == 500
    with pytest.raises(ValueError):
        g.receive("p", push(*([f"t{j}", 0, 1, {}] for j in range(501))), 0.0)
    for i in range(600):
        g.forget(f"dead{i}", 0)
    assert len(g._tombstones) == 500


def test_timings_are_validated() -> None:
    with pytest.raises(ValueError):
        GossipTimings(fanout=0)
    with pytest.raises(ValueError):
        GossipTimings(round_s=0)
