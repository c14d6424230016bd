"""SWIM/Lifeguard membership core: unit tests, and a simulated mesh with a fake clock.

Pure: no sockets, no threads, no sleeps. ``Sim`` delivers each ``Send`` after a
drawn delay unless the link is cut or lossy or the receiver is killed; a
stalled node's inbound messages wait in its inbox until it wakes, and its
clock jumps, as a SIGSTOPped process sees it. Run with ``-s`` to see the
figures printed.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmesh.node.core import membership as ms
from zmesh.node.core import swim
from zmesh.node.core.membership import ALIVE, DEAD, LEFT, SUSPECT, Action, Changed, Membership, MembershipTimings, Send

TICK = 0.02
FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


class Sim:
    """N membership cores on a fake clock; links with delay, loss and cuts; kills and stalls."""

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        delay: tuple[float, float] = (0.001, 0.01),
        loss: float = 0.0,
        on_deadline: bool = False,
        timings: MembershipTimings | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.delay, self.loss = delay, loss
        self.link_delay: dict[frozenset[str], tuple[float, float]] = {}
        self.link_loss: dict[frozenset[str], float] = {}
        self.on_deadline = on_deadline  # tick a node only when its next_deadline has come, as a sleeping daemon would
        self.timings = timings or MembershipTimings()
        self.ids = [f"n{i}" for i in range(n)]
        self.nodes = {i: Membership(i, f"addr-{i}", self.timings, 0.0, random.Random(seed * 1000 + k)) for k, i in enumerate(self.ids)}
        self.queue: list[tuple[float, int, str, str, dict[str, Any]]] = []
        self.inbox: dict[str, list[tuple[str, dict[str, Any]]]] = {i: [] for i in self.ids}
        self.counter = itertools.count()
        self.killed: set[str] = set()
        self.stalled_until: dict[str, float] = {}
        self.cut: set[frozenset[str]] = set()
        self.events: list[tuple[float, str, Changed]] = []
        self.buried: list[tuple[float, str, ms.Buried]] = []
        self.sent = 0

    # ------------------------------------------------------------------ set-up

    def hello(self, a: str, b: str) -> None:
        """The authenticated handshake: each side adds the other."""
        self.route(a, self.nodes[a].add(b, f"addr-{b}", self.nodes[b].incarnation, self.now))
        self.route(b, self.nodes[b].add(a, f"addr-{a}", self.nodes[a].incarnation, self.now))

    def join_all(self) -> None:
        for a, b in itertools.combinations(self.ids, 2):
            self.hello(a, b)

    def partition(self, side_a: Iterable[str], side_b: Iterable[str]) -> None:
        self.cut |= {frozenset(p) for p in itertools.product(side_a, side_b)}

    def stall(self, node: str, seconds: float) -> None:
        self.stalled_until[node] = self.now + seconds

    # ------------------------------------------------------------------ running

    def route(self, sender: str, actions: Iterable[Action]) -> None:
        for action in actions:
            if isinstance(action, Changed):
                self.events.append((self.now, sender, action))
                continue
            if isinstance(action, ms.Buried):
                self.buried.append((self.now, sender, action))
                continue
            self.sent += 1
            link = frozenset((sender, action.to))
            if self.rng.random() < self.link_loss.get(link, self.loss):
                continue
            at = self.now + self.rng.uniform(*self.link_delay.get(link, self.delay))
            heapq.heappush(self.queue, (at, next(self.counter), sender, action.to, action.message))

    def awake(self, node: str) -> bool:
        return node not in self.killed and self.stalled_until.get(node, -1.0) <= self.now

    def deliver(self, sender: str, to: str, message: dict[str, Any]) -> None:
        core = self.nodes[to]
        self.route(to, core.heard_from(sender, self.now))  # as the daemon does for every message
        self.route(to, core.receive(sender, message, self.now))

    def step(self) -> None:
        self.now = round(self.now + TICK, 6)
        while self.queue and self.queue[0][0] <= self.now:
            _, _, sender, to, message = heapq.heappop(self.queue)
            if to in self.killed or frozenset((sender, to)) in self.cut:
                continue  # (what a killed node sent before it died still arrives)
            self.inbox[to].append((sender, message))  # in the socket until the node reads it
        for node in self.ids:
            if not self.awake(node):
                continue
            # Read what arrived before acting on timers, as the daemon should: an ack that came
            # during a stall must count before the probe it answers times out.
            inbox, self.inbox[node] = self.inbox[node], []
            for sender, message in inbox:
                self.deliver(sender, node, message)
            core = self.nodes[node]
            if not self.on_deadline or inbox or self.now >= core.next_deadline():
                self.route(node, core.tick(self.now))

    def run(self, seconds: float) -> None:
        end = self.now + seconds - TICK / 2
        while self.now < end:
            self.step()

    def run_until(self, predicate: Callable[[], bool], limit: float) -> float:
        """Seconds until ``predicate`` holds; fails after ``limit``."""
        start = self.now
        while not predicate():
            assert self.now - start < limit, f"not within {limit} s"
            self.step()
        return self.now - start

    # ------------------------------------------------------------------ views

    def state(self, observer: str, node: str) -> str | None:
        member = self.nodes[observer].get(node)
        return member.state if member is not None else None

    def all_see(self, state: str, nodes: Iterable[str] | None = None) -> bool:
        nodes = list(self.ids if nodes is None else nodes)
        return all(self.state(o, n) == state for o in self.ids if o not in self.killed for n in nodes if n != o)

    def changes(self, state: str, node: str | None = None, since: float = 0.0) -> list[tuple[float, str, Changed]]:
        return [e for e in self.events if e[2].state == state and (node is None or e[2].node_id == node) and e[0] >= since]


def ping(seq: int, *rumors: list[Any]) -> dict[str, Any]:
    return {"k": "ping", "seq": seq, "r": list(rumors)}


def core_with(peers: Iterable[str], timings: MembershipTimings | None = None, now: float = 0.0) -> Membership:
    core = Membership("me", "addr-me", timings or MembershipTimings(), now, random.Random(0))
    for peer in peers:
        core.add(peer, f"addr-{peer}", 0, now)
    return core


def sends(actions: Iterable[Action], kind: str | None = None) -> list[Send]:
    return [a for a in actions if isinstance(a, Send) and (kind is None or a.message["k"] == kind)]


def changed(actions: Iterable[Action]) -> list[Changed]:
    return [a for a in actions if isinstance(a, Changed)]


# ---------------------------------------------------------------------- the simulated mesh


def test_nodes_that_each_greet_one_seed_learn_the_whole_mesh() -> None:
    sim = Sim(12, seed=1)
    for node in sim.ids[1:]:
        sim.hello("n0", node)
    took = sim.run_until(lambda: sim.all_see(ALIVE), 10)
    print(f"\n12 nodes joined through one seed: everyone knows everyone after {took:.2f} s")
    assert not sim.changes(SUSPECT) and not sim.changes(DEAD)


def test_a_killed_node_is_declared_dead_by_everyone_within_three_seconds() -> None:
    times = []
    for seed in range(8):
        sim = Sim(5, seed=seed, delay=(0.001, 0.02))
        sim.join_all()
        sim.run(2)
        sim.killed.add("n4")
        killed = sim.now
        took = sim.run_until(lambda: sim.all_see(DEAD, ["n4"]), 5)  # noqa: B023 (called in this iteration only)
        times.append(round(took, 2))
        assert {who for _, who, _ in sim.changes(DEAD, "n4")} == set(sim.ids[:4])
        assert not [e for e in sim.changes(DEAD) if e[2].node_id != "n4"]
        first_suspicion = min(t for t, _, _ in sim.changes(SUSPECT, "n4", since=killed))
        assert first_suspicion - killed < 1.0  # each of the 4 probers reaches it within one pass
    print(f"\nSIGKILL, 5 nodes, default timings: declared dead by all after {sorted(times)} s")
    assert max(times) < 3.0


def test_a_node_stalled_for_1_5_s_every_20_s_for_ten_minutes_is_never_declared_dead() -> None:
    sim = Sim(5, seed=3, delay=(0.001, 0.03), loss=0.01)
    sim.join_all()
    stalled = "n2"
    for _ in range(30):  # 10 simulated minutes
        sim.run(18.5)
        sim.stall(stalled, 1.5)
        sim.run(1.5)
    sim.run(5)
    assert not sim.changes(DEAD) and not sim.changes(LEFT), sim.changes(DEAD)[:3]
    assert sim.all_see(ALIVE)
    core = sim.nodes[stalled]
    assert core.stalls == 30
    suspicions = len(sim.changes(SUSPECT, stalled))
    others = len(sim.changes(SUSPECT)) - suspicions
    print(f"\n30 stalls of 1.5 s: {suspicions} suspicions of the stalled node, {core.refutations} refutations,", end=" ")
    print(f"{others} suspicions of others, no death")


def test_the_stalled_node_accuses_nobody_and_its_local_health_rises_then_recovers() -> None:
    sim = Sim(4, seed=5)
    sim.join_all()
    sim.run(2)
    core = sim.nodes["n0"]
    assert core.local_health == 0 and core.stalls == 0
    sim.stall("n0", 3.0)
    sim.run(3.0 + TICK)
    assert core.stalls == 1 and core.local_health >= 1
    sim.run(8)
    assert not [e for e in sim.events if e[1] == "n0" and e[2].state in (SUSPECT, DEAD)]
    assert core.local_health == 0  # successful probes brought it back down
    assert sim.all_see(ALIVE)  # buried while it slept (3 s), it refuted and came back


def test_a_daemon_that_sleeps_until_next_deadline_sees_no_false_stall_and_still_detects_deaths() -> None:
    sim = Sim(5, seed=7, on_deadline=True)
    sim.join_all()
    sim.run(30)
    assert all(core.stalls == 0 and core.local_health == 0 for core in sim.nodes.values())
    assert not sim.changes(SUSPECT)
    sim.killed.add("n1")
    assert sim.run_until(lambda: sim.all_see(DEAD, ["n1"]), 5) < 3.0


def test_a_graceful_leave_is_known_at_once_and_nothing_brings_it_back() -> None:
    sim = Sim(5, seed=1)
    sim.join_all()
    sim.run(1)
    leaving = sim.nodes["n4"]
    sim.route("n4", leaving.leave(sim.now))
    assert leaving.tick(sim.now + 0.01) == []  # a node that left sends nothing more
    sim.killed.add("n4")
    sim.run(0.1)
    assert sim.all_see(LEFT, ["n4"])
    assert not sim.changes(SUSPECT, "n4")
    sim.run(5)
    assert sim.all_see(LEFT, ["n4"])


def test_a_partition_buries_each_side_and_heals_through_refutation() -> None:
    sim = Sim(5, seed=4)
    sim.join_all()
    sim.run(1)
    left, right = ["n0", "n1"], ["n2", "n3", "n4"]
    sim.partition(left, right)
    sim.run(8)
    assert all(sim.state(a, b) == DEAD and sim.state(b, a) == DEAD for a in left for b in right)
    assert sim.state("n0", "n1") == ALIVE and sim.state("n2", "n4") == ALIVE
    sim.cut.clear()
    # What the daemon does for a buried member it finds again: tell it that it is buried; it refutes
    # with a higher incarnation; then a hello at that incarnation brings it back.
    for a, b in itertools.product(left + right, repeat=2):
        member = sim.nodes[a].get(b)
        if member is not None and member.state == DEAD:
            sim.route(a, [Send(b, member.address, ping(0, [DEAD, b, member.address, member.incarnation, a]))])
    sim.run(0.5)
    for a, b in itertools.product(left, right):
        sim.hello(a, b)
    assert sim.run_until(lambda: sim.all_see(ALIVE), 5) < 2


def test_a_link_that_loses_everything_kills_nobody_thanks_to_indirect_probes() -> None:
    sim = Sim(5, seed=11)
    sim.link_loss[frozenset(("n0", "n1"))] = 1.0  # n0 and n1 cannot talk directly; the others relay
    sim.join_all()
    sim.run(30)
    assert not sim.changes(DEAD)
    assert sim.nodes["n0"].local_health <= 1 and sim.nodes["n1"].local_health <= 1


# ---------------------------------------------------------------------- refutation


def test_a_suspected_node_refutes_at_once_to_every_live_member() -> None:
    core = core_with("abc")
    out = core.receive("a", ping(1, [SUSPECT, "me", "addr-me", 0, "a"]), 0.1)
    assert core.incarnation == 1 and core.refutations == 1 and core.local_health == 1
    refutation = [ALIVE, "me", "addr-me", 1, "me"]
    assert {s.to for s in sends(out, "ping") if s.message["r"] == [refutation]} == {"a", "b", "c"}
    assert [s.to for s in sends(out, "ack")] == ["a"]
    # It is also queued as a rumor, so it rides on later messages.
    assert any(refutation in s.message["r"] for s in sends(core.tick(0.2)))


def test_a_refutation_outbids_the_accusation_and_stale_accusations_are_ignored() -> None:
    core = core_with("ab")
    core.receive("a", ping(1, [DEAD, "me", "addr-me", 5, "a"]), 0.1)
    assert core.incarnation == 6
    assert sends(core.receive("b", ping(2, [SUSPECT, "me", "addr-me", 5, "b"]), 0.2), "ping") == []
    assert core.incarnation == 6
    # An ALIVE about us newer than ours (a stale life of this id) is outbid too; our own echo is not.
    core.receive("b", ping(3, [ALIVE, "me", "x", 9, "me"]), 0.3)
    assert core.incarnation == 10
    core.receive("b", ping(4, [ALIVE, "me", "addr-me", 10, "me"]), 0.4)
    assert core.incarnation == 10 and core.refutations == 1


def test_a_woken_node_refutes_before_its_suspectors_time_out() -> None:
    sim = Sim(5, seed=2)
    sim.join_all()
    sim.run(2)
    sim.stall("n3", 1.5)
    sim.run(1.5)
    assert sim.changes(SUSPECT, "n3")  # they did suspect it
    sim.run(0.2)
    assert sim.all_see(ALIVE, ["n3"])
    assert sim.nodes["n3"].incarnation >= 1
    sim.run(5)
    assert not sim.changes(DEAD)


# ---------------------------------------------------------------------- tombstones and precedence


def test_a_tombstone_resists_stale_news_and_yields_to_a_higher_incarnation() -> None:
    core = core_with([])
    core.add("x", "addr-x", 3, 0.0)
    out = core.receive("y", ping(1, [DEAD, "x", "addr-x", 3, "y"]), 0.1)
    assert changed(out) == [Changed("x", "addr-x", DEAD, ALIVE, 3)]
    for stale in ([ALIVE, "x", "addr-x", 3, "x"], [SUSPECT, "x", "addr-x", 2, "y"], [ALIVE, "x", "addr-x", 0, "x"]):
        assert not changed(core.receive("y", ping(2, stale), 0.2))
        assert core.get("x").state == DEAD  # type: ignore[union-attr]
    assert not changed(core.add("x", "addr-x", 3, 0.3))  # nor a hello at the buried incarnation
    out = core.receive("y", ping(3, [ALIVE, "x", "addr-x2", 4, "x"]), 0.4)
    assert changed(out) == [Changed("x", "addr-x2", ALIVE, DEAD, 4)]
    core.add("z", "addr-z", 0, 0.5)
    core.receive("y", ping(4, [LEFT, "z", "addr-z", 1, "z"]), 0.6)
    assert not changed(core.add("z", "addr-z", 1, 0.65))
    assert changed(core.add("z", "addr-z", 2, 0.7)) == [Changed("z", "addr-z", ALIVE, LEFT, 2)]


def test_a_death_of_a_stranger_is_a_tombstone_too() -> None:
    core = core_with(["y"])
    out = core.receive("y", ping(1, [DEAD, "x", "addr-x", 2, "y"]), 0.0)
    assert changed(out) == [Changed("x", "addr-x", DEAD, None, 2)]
    assert not changed(core.receive("y", ping(2, [ALIVE, "x", "addr-x", 1, "x"]), 0.1))
    assert core.get("x").state == DEAD and "x" not in {m.node_id for m in core.live()}  # type: ignore[union-attr]


def test_tombstones_are_forgotten_after_tombstone_s() -> None:
    core = core_with(["y"], MembershipTimings(tombstone_s=10.0))
    core.receive("y", ping(1, [DEAD, "x", "addr-x", 0, "y"]), 0.0)
    t = 0.0
    while t < 9.5:
        t += 0.1
        core.heard_from("y", t)
        core.tick(t)
    assert core.get("x") is not None
    while t < 12:
        t += 0.1
        core.heard_from("y", t)
        core.tick(t)
    assert core.get("x") is None and core.get("y") is not None


def test_a_leave_is_immediate_and_final_for_the_receiver() -> None:
    core = core_with("ab")
    out = core.receive("a", ping(0, [LEFT, "a", "addr-a", 1, "a"]), 0.0)
    assert changed(out) == [Changed("a", "addr-a", LEFT, ALIVE, 1)]
    assert [m.node_id for m in core.live()] == ["b"]
    core.receive("b", ping(1, [SUSPECT, "a", "addr-a", 1, "b"], [ALIVE, "a", "addr-a", 1, "a"]), 0.1)
    assert core.get("a").state == LEFT  # type: ignore[union-attr]


_RANK = {ALIVE: 0, SUSPECT: 1, DEAD: 2, LEFT: 3}
rumor_lists = st.lists(
    st.tuples(st.sampled_from(list(_RANK)), st.integers(0, 3), st.sampled_from(["a", "b", "c"]), st.sampled_from("xy")).map(
        lambda r: [r[0], r[3], f"addr-{r[3]}", r[1], r[2]]
    ),
    max_size=10,
)


@FAST
@given(rumor_lists, st.booleans(), st.randoms(use_true_random=False))
def test_any_delivery_order_of_the_same_rumors_ends_in_the_same_state(rumors: list[list[Any]], known: bool, rng: random.Random) -> None:
    def final(order: list[list[Any]]) -> dict[str, tuple[str, int] | None]:
        core = core_with(["a", "b", "c"])
        if known:
            core.add("x", "addr-x", 0, 0.0)
        for rumor in order:
            core.receive(rng.choice("abc"), ping(1, rumor), 0.0)
        return {n: (m.state, m.incarnation) if (m := core.get(n)) is not None else None for n in "xy"}

    shuffled = list(rumors)
    rng.shuffle(shuffled)
    result = final(rumors)
    assert result == final(shuffled)
    for node in "xy":  # and it is the greatest by (incarnation, ALIVE < SUSPECT < DEAD < LEFT)
        candidates = [(r[3], _RANK[r[0]]) for r in rumors if r[1] == node] + ([(0, 0)] if known and node == "x" else [])
        if candidates:
            incarnation, rank = max(candidates)
            assert result[node] == (list(_RANK)[rank], incarnation)
        else:
            assert result[node] is None


# ---------------------------------------------------------------------- suspicion (Lifeguard)


def dead_at(core: Membership, suspect: str, start: float, alive: Iterable[str]) -> float:
    """Tick a core whose other peers answer everything until ``suspect`` is DEAD; seconds after ``start``."""
    alive = list(alive)
    for step in range(1, 1000):
        now = start + step * 0.01
        for peer in alive:
            core.heard_from(peer, now)
        if any(c.node_id == suspect and c.state == DEAD for c in changed(core.tick(now))):
            return round(now - start, 2)
    return math.inf


@pytest.mark.parametrize("confirmations", [0, 1, 2, 3, 5])
def test_independent_confirmations_shorten_a_suspicion_on_a_log_scale(confirmations: int) -> None:
    timings = MembershipTimings(suspicion_min_s=1.0, suspicion_max_s=4.0, probe_interval_s=100.0)  # no probe of ours in the way
    core = core_with("abcdefg", timings)
    core.receive("a", ping(1, [SUSPECT, "g", "addr-g", 0, "a"]), 0.0)
    for accuser in "bcdef"[:confirmations]:
        core.receive(accuser, ping(1, [SUSPECT, "g", "addr-g", 0, accuser]), 0.0)
        core.receive(accuser, ping(1, [SUSPECT, "g", "addr-g", 0, accuser]), 0.0)  # a repeat is no new confirmation
    k = 3
    expected = max(1.0, 4.0 - 3.0 * math.log(min(confirmations, k) + 1) / math.log(k + 1))
    assert dead_at(core, "g", 0.0, "abcdef") == pytest.approx(expected, abs=0.015)


def test_a_small_mesh_reaches_the_minimum_with_fewer_confirmations() -> None:
    timings = MembershipTimings(suspicion_min_s=1.0, suspicion_max_s=4.0, probe_interval_s=100.0)
    core = core_with("ab", timings)  # live peers a, b: K = min(3, 2 - 1) = 1
    core.receive("a", ping(1, [SUSPECT, "b", "addr-b", 0, "a"]), 0.0)
    core.receive("a", ping(1, [SUSPECT, "b", "addr-b", 0, "me"]), 0.0)
    assert dead_at(core, "b", 0.0, "a") == pytest.approx(1.0, abs=0.015)


def test_a_suspicion_is_refuted_by_a_higher_incarnation() -> None:
    core = core_with("ab", MembershipTimings(probe_interval_s=100.0))
    assert changed(core.receive("a", ping(1, [SUSPECT, "b", "addr-b", 0, "a"]), 0.0)) == [Changed("b", "addr-b", SUSPECT, ALIVE, 0)]
    assert changed(core.receive("b", ping(2, [ALIVE, "b", "addr-b", 1, "b"]), 1.0)) == [Changed("b", "addr-b", ALIVE, SUSPECT, 1)]
    assert dead_at(core, "b", 1.0, "ab") == math.inf


@pytest.mark.parametrize("confirmed", [False, True])
def test_our_own_stall_extends_running_suspicions_by_the_lag(confirmed: bool) -> None:
    timings = MembershipTimings(suspicion_min_s=1.0, suspicion_max_s=4.0)
    core = core_with("abcd", timings)  # K = min(3, 4 - 1) = 3
    core.receive("a", ping(1, [SUSPECT, "d", "addr-d", 0, "a"]), 0.0)
    now = 0.0
    while now < 0.999:
        now = round(now + 0.01, 6)
        for peer in "abcd":
            core.heard_from(peer, now)
        core.tick(now)
    now = 2.0  # our loop stalls for about a second: not the suspect's fault
    if confirmed:  # and a confirmation after it shortens from the shifted start
        core.receive("b", ping(2, [SUSPECT, "d", "addr-d", 0, "b"]), now)
    died = now + dead_at(core, "d", now, "abcd")  # d answers our probes too: no confirmation of ours
    assert core.stalls == 1
    timeout = 4.0 - 3.0 * math.log(2) / math.log(4) if confirmed else 4.0
    # Late by the stall less what was left until the deadline this core expected to run at (a probe's, <= 0.2 s).
    assert timeout + 0.75 < died <= timeout + 1.01


def test_a_probe_that_times_out_during_our_stall_is_restarted_not_failed() -> None:
    core = core_with("abc")
    out = core.tick(0.0)
    (first,) = sends(out, "ping")
    out = core.tick(1.0)  # woke long after the probe's deadlines
    assert not changed(out) and not sends(out, "ping_req")
    (again,) = sends(out, "ping")
    assert again.to == first.to and again.message["seq"] != first.message["seq"]
    assert core.stalls == 1 and core.local_health == 1
    core.receive(again.to, {"k": "ack", "seq": again.message["seq"]}, 1.01)
    assert core.local_health == 0


# ---------------------------------------------------------------------- probing and local health


def probe_until_indirect(core: Membership) -> tuple[Send, list[Send]]:
    (probe,) = sends(core.tick(0.0), "ping")
    requests = sends(core.tick(0.1), "ping_req")
    return probe, requests


def test_a_silent_target_with_nacking_helpers_is_suspected_without_blaming_ourselves() -> None:
    core = core_with("abcd")
    probe, requests = probe_until_indirect(core)
    assert len(requests) == 3 and probe.to not in {r.to for r in requests}
    assert all(r.message["target"] == probe.to and r.message["address"] == probe.address for r in requests)
    for r in requests:
        core.receive(r.to, {"k": "nack", "seq": r.message["seq"]}, 0.15)
    out = core.tick(0.2)
    assert changed(out) == [Changed(probe.to, probe.address, SUSPECT, ALIVE, 0)]
    assert core.local_health == 0


def test_helpers_that_do_not_even_nack_raise_our_local_health_and_stretch_our_probes() -> None:
    core = core_with("abcd")
    probe, requests = probe_until_indirect(core)
    core.receive(requests[0].to, {"k": "nack", "seq": probe.message["seq"]}, 0.15)
    out = core.tick(0.2)
    assert core.local_health == 2  # two of three helpers silent: we may be the slow one
    (next_probe,) = sends(out, "ping")  # the next period starts at once
    assert core.next_deadline() == pytest.approx(0.2 + 0.1 * 3)  # the timeout x (1 + LHM)
    core.receive(next_probe.to, {"k": "ack", "seq": next_probe.message["seq"]}, 0.21)
    assert core.local_health == 1
    assert core.next_deadline() == pytest.approx(0.2 + 0.2 * 3)  # and the period


def test_an_ack_relayed_by_a_helper_answers_the_probe_and_a_strangers_does_not() -> None:
    core = core_with("abcde")
    probe, requests = probe_until_indirect(core)
    core.receive(requests[0].to, {"k": "ack", "seq": probe.message["seq"]}, 0.15)
    assert not changed(core.tick(0.2)) and core.get(probe.to).state == ALIVE  # type: ignore[union-attr]
    core = core_with("abcde")
    probe, requests = probe_until_indirect(core)
    (stranger,) = set("abcde") - {probe.to} - {r.to for r in requests}
    core.receive(stranger, {"k": "ack", "seq": probe.message["seq"]}, 0.15)  # the right seq, from someone not asked
    assert changed(core.tick(0.2)) == [Changed(probe.to, probe.address, SUSPECT, ALIVE, 0)]


def test_any_message_from_the_target_counts_as_its_ack() -> None:
    core = core_with("abcd")
    (probe,) = sends(core.tick(0.0), "ping")
    core.heard_from(probe.to, 0.05)
    assert not sends(core.tick(0.1), "ping_req") and not changed(core.tick(0.2))
    assert core.get(probe.to).state == ALIVE  # type: ignore[union-attr]


def test_a_helper_relays_the_ack_or_nacks_in_time() -> None:
    helper = core_with("rt")
    (relay,) = sends(helper.receive("r", {"k": "ping_req", "seq": 7, "target": "t", "address": "addr-t"}, 0.0), "ping")
    assert relay.to == "t"
    out = helper.receive("t", {"k": "ack", "seq": relay.message["seq"]}, 0.01)
    assert [(s.to, s.message["k"], s.message["seq"]) for s in sends(out)] == [("r", "ack", 7)]
    # A silent target: the nack comes within the requester's indirect window (period - timeout = 0.1 s).
    (relay,) = sends(helper.receive("r", {"k": "ping_req", "seq": 8, "target": "t", "address": "addr-t"}, 1.0), "ping")
    nacks = [s for t in (1.02, 1.04, 1.06, 1.08) for s in sends(helper.tick(t), "nack")]
    assert [(s.to, s.message["seq"]) for s in nacks] == [("r", 8)]
    # A target we do not know: we cannot help, and say so at once.
    out = helper.receive("r", {"k": "ping_req", "seq": 9, "target": "ghost", "address": "addr-ghost"}, 1.09)
    assert [(s.to, s.message["k"], s.message["seq"]) for s in sends(out)] == [("r", "nack", 9)]


def test_a_dropped_connection_only_moves_the_member_to_the_front_of_the_probe_order() -> None:
    core = core_with("abcdefgh")
    (first,) = sends(core.tick(0.0), "ping")
    core.heard_from(first.to, 0.01)
    dropped = "e" if first.to != "e" else "f"
    assert core.disconnected(dropped, 0.02) == []
    (probe,) = sends(core.tick(0.02), "ping")
    assert probe.to == dropped and core.get(dropped).state == ALIVE  # type: ignore[union-attr]
    core.receive(dropped, {"k": "ack", "seq": probe.message["seq"]}, 0.03)
    assert not changed(core.tick(0.2)) and core.get(dropped).state == ALIVE  # type: ignore[union-attr]


def test_the_probe_order_visits_every_member_once_per_pass() -> None:
    peers = [f"p{i}" for i in range(10)]
    core = core_with(peers)
    seen: list[str] = []
    now = 0.0
    for _ in range(30):
        (probe,) = sends(core.tick(now), "ping")
        seen.append(probe.to)
        core.receive(probe.to, {"k": "ack", "seq": probe.message["seq"]}, now + 0.001)
        now += 0.2
    assert sorted(seen[:10]) == sorted(seen[10:20]) == sorted(seen[20:]) == peers
    assert seen[:10] != seen[10:20]  # re-shuffled per pass


def test_a_suspect_that_we_probe_hears_of_its_suspicion_in_that_ping() -> None:
    core = core_with(["a"])
    core.receive("a", ping(1, [SUSPECT, "a", "addr-a", 0, "b"]), 0.0)
    (probe,) = sends(core.tick(0.0), "ping")
    assert probe.message["r"][:2] == [[ALIVE, "me", "addr-me", 0, "me"], [SUSPECT, "a", "addr-a", 0, "b"]]


def test_a_member_that_never_heard_of_us_learns_us_from_our_probe() -> None:
    prober, probed = core_with(["x"]), Membership("x", "addr-x", MembershipTimings(), 0.0, random.Random(1))
    (probe,) = sends(prober.tick(0.0), "ping")
    out = probed.receive("me", probe.message, 0.01)
    assert changed(out) == [Changed("me", "addr-me", ALIVE, None, 0)]
    assert [(s.to, s.address, s.message["k"]) for s in sends(out)] == [("me", "addr-me", "ack")]


def test_rumors_ride_a_bounded_number_of_messages_at_most_twenty_at_a_time() -> None:
    core = core_with([f"p{i}" for i in range(50)])
    carried: dict[str, int] = {}
    for i in range(200):
        for s in sends(core.receive("p0", ping(i), i * 0.001), "ack"):
            assert len(s.message["r"]) <= swim.MAX_RUMORS_PER_MESSAGE
            for rumor in s.message["r"]:
                carried[rumor[1]] = carried.get(rumor[1], 0) + 1
    limit = max(3, math.ceil(4 * math.log10(52)) + 1)  # n = 51 nodes
    assert len(carried) == 50 and set(carried.values()) == {limit}


# ---------------------------------------------------------------------- bad input


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.binary(max_size=4),
    lambda children: (
        st.lists(children, max_size=5) | st.tuples(children, children) | st.dictionaries(st.text(max_size=4), children, max_size=5)
    ),
    max_leaves=15,
)
fields = st.dictionaries(st.sampled_from(["k", "seq", "r", "target", "address"]), junk, max_size=5)
kinds = st.sampled_from(["ping", "ack", "ping_req", "nack", "pong", ""])
near_rumor = st.lists(junk | st.sampled_from([ALIVE, SUSPECT, DEAD, LEFT, "me", "p", "addr-p", 1, -1, 2**70]), min_size=3, max_size=6)


def snapshot(core: Membership) -> Any:
    return (
        [(m.node_id, m.address, m.incarnation, m.state) for m in core.members()],
        core.incarnation,
        core.local_health,
        core._rumors.snapshot(),
        core.next_deadline(),
    )


@FAST
@given(junk | fields, fields, kinds, st.lists(near_rumor, max_size=3))
def test_garbage_raises_value_error_and_changes_nothing(anything: Any, some: dict[str, Any], kind: str, rumors: list[Any]) -> None:
    core = core_with(["p", "q"])
    core.tick(0.0)
    for message in (anything, some, {**some, "k": kind}, {"k": kind, "seq": 1, "r": rumors}, {**some, "k": kind, "r": rumors}):
        before = snapshot(core)
        try:
            core.receive("p", message, 0.01)
        except ValueError:
            assert snapshot(core) == before
    assert core.get("p") is not None


@pytest.mark.parametrize(
    "message",
    [
        None,
        [],
        "ping",
        {},
        {"k": "ping"},
        {"k": "pong", "seq": 1},
        {"k": ["ping"], "seq": 1},
        {"k": "ping", "seq": "1"},
        {"k": "ping", "seq": 1.0},
        {"k": "ping", "seq": True},
        {"k": "ping", "seq": -1},
        {"k": "ping", "seq": 2**70},
        {"k": "ping", "seq": 1, "r": "x"},
        {"k": "ping", "seq": 1, "r": {"a": 1}},
        {"k": "ping", "seq": 1, "r": [[ALIVE, "x", "addr-x", 0, "x"]] * 101},
        {"k": "ping", "seq": 1, "r": [[ALIVE, "x", "addr-x"]]},
        {"k": "ping", "seq": 1, "r": [["ZOMBIE", "x", "addr-x", 0, "x"]]},
        {"k": "ping", "seq": 1, "r": [[ALIVE, "", "addr-x", 0, "x"]]},
        {"k": "ping", "seq": 1, "r": [[ALIVE, 7, "addr-x", 0, "x"]]},
        {"k": "ping", "seq": 1, "r": [[ALIVE, "x" * 500, "addr-x", 0, "x"]]},
        {"k": "ping", "seq": 1, "r": [[ALIVE, "x", None, 0, "x"]]},
        {"k": "ping", "seq": 1, "r": [[ALIVE, "x", "", 0, "x"]]},
        {"k": "ping", "seq": 1, "r": [[ALIVE, "x", "addr-x", "0", "x"]]},
        {"k": "ping", "seq": 1, "r": [[ALIVE, "x", "addr-x", -3, "x"]]},
        {"k": "ping", "seq": 1, "r": [[ALIVE, "x", "addr-x", 0, 5]]},
        {"k": "ping", "seq": 1, "r": [[ALIVE, "ok", "addr-ok", 0, "ok"], [DEAD, "p", "addr-p", 9, {}]]},
        {"k": "ping_req", "seq": 1},
        {"k": "ping_req", "seq": 1, "target": "q"},
        {"k": "ping_req", "seq": 1, "target": 3, "address": "addr-q"},
        {"k": "ping_req", "seq": 1, "target": "q", "address": ["addr-q"]},
    ],
)
def test_malformed_messages_are_refused_before_anything_is_applied(message: Any) -> None:
    core = core_with(["p", "q"])
    before = snapshot(core)
    with pytest.raises(ValueError):
        core.receive("p", message, 0.01)
    assert snapshot(core) == before and core.get("ok") is None


def test_a_flood_of_strangers_accusers_and_relay_requests_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ms, "_MAX_MEMBERS", 300)
    monkeypatch.setattr(ms, "_MAX_RELAYS", 50)
    core = core_with(["p", "q"])
    for i in range(20):
        core.receive("p", ping(i, *([ALIVE, f"s{i}-{j}", "addr", 0, "p"] for j in range(100))), 0.0)
    assert len(core.members()) == 300
    core.receive("p", ping(1, [SUSPECT, "q", "addr-q", 0, "p"]), 0.0)
    for i in range(20):
        core.receive("p", ping(i, *([SUSPECT, "q", "addr-q", 0, f"acc{i}-{j}"] for j in range(100))), 0.0)
    assert len(core._suspicions["q"].accusers) == MembershipTimings().suspicion_confirmations + 1
    for i in range(200):
        core.receive("p", {"k": "ping_req", "seq": i, "target": "q", "address": "addr-q"}, 0.0)
    assert len(core._relays) == 50


def test_timings_are_validated() -> None:
    with pytest.raises(ValueError):
        MembershipTimings(suspicion_min_s=5.0, suspicion_max_s=1.0)
    with pytest.raises(ValueError):
        MembershipTimings(probe_interval_s=0)


# ---------------------------------------------------------------------- burial (issue 14, 6)


@pytest.mark.parametrize("seed", range(6))
def test_a_node_that_stalled_past_its_death_learns_it_was_buried_and_no_one_else_thinks_so(seed: int) -> None:
    """A frozen node is declared dead; thawed, it hears so from a member it still counts alive: Buried, there only."""
    sim = Sim(5, seed=seed)
    sim.join_all()
    sim.run(1.0)
    sim.stall("n4", 8.0)
    sim.run_until(lambda: all(sim.nodes[n].get("n4") is not None and sim.nodes[n].get("n4").state == DEAD for n in sim.ids[:4]), 8)
    sim.run(9.0)
    assert [(who, b.incarnation) for _, who, b in sim.buried] == [("n4", 0)]
    sim.run_until(lambda: sim.all_see(ALIVE), 10)


def test_a_member_we_buried_hears_so_at_once_and_at_most_once_per_probe_interval() -> None:
    core = core_with(["a", "b"])
    core.receive("b", {"k": "ping", "seq": 0, "r": [[DEAD, "a", "addr-a", 0, "b"]]}, 0.0)
    assert core.get("a").state == DEAD
    told = sends(core.receive("a", {"k": "ping", "seq": 7, "r": []}, 0.01))
    assert [(s.to, s.message["r"]) for s in told] == [("a", [[DEAD, "a", "addr-a", 0, "me", 1]])]
    assert not sends(core.receive("a", {"k": "ping", "seq": 8, "r": []}, 0.02))  # not again so soon
    assert sends(core.receive("a", {"k": "ping", "seq": 9, "r": []}, 0.02 + core.timings.probe_interval_s))


def test_news_of_our_death_from_a_member_we_buried_ourselves_refutes_but_does_not_bury() -> None:
    """Both sides of a healed partition buried each other: neither is the mesh, nothing is fenced."""
    core = core_with(["a", "b"])
    core.receive("b", {"k": "ping", "seq": 0, "r": [[DEAD, "a", "addr-a", 0, "b"]]}, 0.0)
    actions = core.receive("a", {"k": "ping", "seq": 0, "r": [[DEAD, "me", "addr-me", 0, "a"]]}, 0.1)
    assert not [a for a in actions if isinstance(a, ms.Buried)] and core.incarnation == 1
    actions = core.receive("b", {"k": "ping", "seq": 0, "r": [[DEAD, "me", "addr-me", 1, "b"]]}, 0.2)
    assert [a for a in actions if isinstance(a, ms.Buried)] == [ms.Buried(1)] and core.incarnation == 2


def test_when_both_sides_buried_each_other_the_lighter_side_is_buried() -> None:
    """A node cut off alone suspects everyone at once: its declarations weigh 1, the larger side's more."""
    alone = core_with(["a", "b", "c"])
    for peer in "abc":
        alone.receive("x", ping(0, [DEAD, peer, f"addr-{peer}", 0, "me", 1]), 0.0)
    heavy = alone.receive("a", ping(0, [DEAD, "me", "addr-me", 0, "a", 3]), 0.1)
    assert [a for a in heavy if isinstance(a, ms.Buried)] == [ms.Buried(0)]
    big = core_with(["a", "b", "c"])
    big.receive("b", ping(0, [DEAD, "a", "addr-a", 0, "b", 3]), 0.0)
    light = big.receive("a", ping(0, [DEAD, "me", "addr-me", 0, "a", 1]), 0.1)
    assert not [a for a in light if isinstance(a, ms.Buried)] and big.incarnation == 1  # refuted, not buried
    even = core_with(["a", "b", "c"])
    even.receive("b", ping(0, [DEAD, "a", "addr-a", 0, "b", 2]), 0.0)
    tie = even.receive("a", ping(0, [DEAD, "me", "addr-me", 0, "a", 2]), 0.1)
    assert not [a for a in tie if isinstance(a, ms.Buried)]


@pytest.mark.parametrize("seed", range(4))
def test_a_node_cut_off_alone_is_buried_when_it_heals_and_no_one_else_is(seed: int) -> None:
    sim = Sim(4, seed=seed)
    sim.join_all()
    sim.run(1.0)
    sim.partition(["n3"], ["n0", "n1", "n2"])
    sim.run(10.0)
    assert all(sim.nodes[n].get("n3").state == DEAD for n in ("n0", "n1", "n2"))
    sim.cut.clear()
    # Discovery knocks again once the network heals; a node knocked by one it holds dead tells it so (link.py).
    for peer in ("n0", "n1", "n2"):
        for teller, told in ((peer, "n3"), ("n3", peer)):
            news = {"k": "ping", "seq": 0, "r": [sim.nodes[teller].death_rumor(told, 0)]}
            sim.route(teller, [Send(told, f"addr-{told}", news)])
    sim.run(5.0)
    assert {who for _, who, _ in sim.buried} == {"n3"}


def test_a_stale_verdict_of_a_member_we_buried_with_more_weight_is_not_adopted() -> None:
    """Regression (the mesh invariant checker): a node cut off alone declares others dead while it is cut off;
    once it is back, those verdicts (weight 1) must not kill members of the side that buried it (weight 3)."""
    core = core_with(["a", "b", "c"])
    core.receive("x", ping(0, [DEAD, "a", "addr-a", 0, "me", 3]), 0.0)  # we buried the lone "a", weighing 3
    core.receive("a", ping(0, [ALIVE, "a", "addr-a", 1, "a"]), 0.1)  # it refuted and is back
    assert core.get("a").state == ALIVE
    assert not changed(core.receive("a", ping(0, [DEAD, "b", "addr-b", 0, "a", 1]), 0.2))  # made while it was cut off
    assert core.get("b").state == ALIVE
    # A verdict it makes back among us weighs the members it holds alive again: that one counts.
    assert [c.state for c in changed(core.receive("a", ping(0, [DEAD, "b", "addr-b", 0, "a", 4]), 0.3))] == [DEAD]
