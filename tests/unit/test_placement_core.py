"""Placement (node/scheduler.py) and mesh-unique names (node/registry.py): pure, over drawn views."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zmesh.node.core import registry, scheduler
from zmesh.node.core.scheduler import NodeView, Place, Wait

NODES = [f"n{i}" for i in range(6)]
amounts = st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0])


@st.composite
def views(draw: st.DrawFn) -> list[NodeView]:
    out = []
    for node_id in draw(st.lists(st.sampled_from(NODES), min_size=1, max_size=6, unique=True)):
        total = {"CPU": draw(amounts), "special": draw(st.sampled_from([0.0, 1.0]))}
        available = {k: v - draw(st.sampled_from([0.0, v / 2, v])) for k, v in total.items()}
        out.append(NodeView(node_id, total, available, draw(st.integers(0, 5)), draw(st.booleans())))
    return out


demands = st.fixed_dictionaries({"CPU": amounts}, optional={"special": st.just(1.0)})
strategies = st.one_of(
    st.just("DEFAULT"), st.just("SPREAD"), st.tuples(st.just(scheduler.AFFINITY), st.sampled_from(NODES), st.booleans()).map(list)
)


@given(views(), demands, strategies, st.sets(st.sampled_from(NODES)))
def test_a_placement_is_a_live_open_untried_member_with_room(
    view: list[NodeView], demand: dict[str, float], strategy: object, tried: set[str]
) -> None:
    me = view[0].node_id
    decision = scheduler.place(demand, strategy, me, view, tried)
    if isinstance(decision, Place):
        node = next(n for n in view if n.node_id == decision.node_id)
        assert scheduler.fits(demand, node.available) and not node.draining and node.node_id not in tried
    elif isinstance(decision, Wait) and decision.infeasible:
        assert not any(scheduler.fits(demand, n.total) for n in view if not n.draining)


@given(views(), demands)
def test_default_placement_stays_on_this_node_when_it_fits(view: list[NodeView], demand: dict[str, float]) -> None:
    me = view[0]
    decision = scheduler.place(demand, "DEFAULT", me.node_id, view)
    if not me.draining and scheduler.fits(demand, me.available):
        assert decision == Place(me.node_id)


def test_spread_fills_members_evenly() -> None:
    view = [NodeView(n, {"CPU": 8}, {"CPU": 8}, 0) for n in NODES[:3]]
    recent: dict[str, int] = {}
    for _ in range(9):
        decision = scheduler.place({"CPU": 1}, "SPREAD", "n0", view, placed_recently=recent)
        assert isinstance(decision, Place)
        recent[decision.node_id] = recent.get(decision.node_id, 0) + 1
    assert recent == {"n0": 3, "n1": 3, "n2": 3}


def test_node_affinity_hard_waits_or_fails_and_soft_falls_back() -> None:
    view = [NodeView("n0", {"CPU": 2}, {"CPU": 2}), NodeView("n1", {"CPU": 2}, {"CPU": 0})]
    assert scheduler.place({"CPU": 1}, [scheduler.AFFINITY, "n1", False], "n0", view) == Wait(
        False, "node n1 has no room for {'CPU': 1} now"
    )
    assert scheduler.place({"CPU": 1}, [scheduler.AFFINITY, "n1", True], "n0", view) == Place("n0")
    assert scheduler.place({"CPU": 1}, [scheduler.AFFINITY, "gone", True], "n0", view) == Place("n0")
    failed = scheduler.place({"CPU": 1}, [scheduler.AFFINITY, "gone", False], "n0", view, members={"gone": "DEAD"})
    assert isinstance(failed, scheduler.Fail) and "is dead" in failed.reason


@given(st.sampled_from([None, "ALIVE", "SUSPECT"]), st.floats(0, 30), st.floats(0.1, 20))
def test_hard_affinity_to_a_member_not_in_the_view_waits_for_it_for_a_bounded_time(state: str | None, waited: float, limit: float) -> None:
    """A member that just joined is ALIVE before its resources arrive by gossip: wait for it, then fail (issue 14, 3)."""
    view = [NodeView("n0", {"CPU": 2}, {"CPU": 2})]
    members = {} if state is None else {"new": state}
    decision = scheduler.place(
        {"CPU": 1}, [scheduler.AFFINITY, "new", False], "n0", view, members=members, waited_s=waited, affinity_wait_s=limit
    )
    if waited < limit:
        assert isinstance(decision, Wait) and not decision.infeasible and decision.until == pytest.approx(limit - waited)
    else:
        assert isinstance(decision, scheduler.Fail) and "new" in decision.reason
    arrived = [*view, NodeView("new", {"CPU": 2}, {"CPU": 2})]
    assert scheduler.place({"CPU": 1}, [scheduler.AFFINITY, "new", False], "n0", arrived, members=members, waited_s=waited) == Place("new")


def test_nothing_fits_now_waits_and_nothing_could_ever_fit_says_so() -> None:
    view = [NodeView("n0", {"CPU": 2}, {"CPU": 0}), NodeView("n1", {"CPU": 1}, {"CPU": 1})]
    assert scheduler.place({"CPU": 2}, "DEFAULT", "n1", view) == Wait(False, "no member has {'CPU': 2} available now")
    waiting = scheduler.place({"CPU": 3}, "DEFAULT", "n1", view)
    assert isinstance(waiting, Wait) and waiting.infeasible


@given(st.lists(st.sampled_from(NODES), min_size=1, unique=True), st.text(min_size=1, max_size=8))
def test_every_member_agrees_on_a_names_home_whatever_order_it_lists_members_in(members: list[str], name: str) -> None:
    homes = {registry.home_of(("ns", name), order) for order in itertools.islice(itertools.permutations(members), 6)}
    assert len(homes) == 1 and homes.pop() in members


def test_a_member_leaving_moves_only_its_own_names() -> None:
    names = [("ns", f"actor-{i}") for i in range(2000)]
    before = {n: registry.home_of(n, NODES) for n in names}
    after = {n: registry.home_of(n, NODES[:-1]) for n in names}
    moved = [n for n in names if before[n] != after[n]]
    assert all(before[n] == NODES[-1] for n in moved)
    assert 0.1 < len(moved) / len(names) < 0.25  # about 1/6 of the names lived there


def test_the_home_grants_a_name_once_and_keeps_it_until_released() -> None:
    claims = registry.Claims()
    first, second = registry.Holder("a1", 1.0), registry.Holder("a2", 2.0)
    card = registry.Card("Counter", "n0", b"meta")
    assert claims.claim(("ns", "x"), first, None, now=0.0, card=card) == registry.Granted()
    assert claims.claim(("ns", "x"), second, None, now=0.1) == registry.Taken(first, card)  # get_if_exists can reach it
    assert claims.claim(("ns", "x"), first, None, now=0.2) == registry.Granted()  # a retry of the winner
    claims.release(("ns", "x"), "a2")  # only the holder releases
    assert claims.holder(("ns", "x")) == first
    claims.release(("ns", "x"), "a1")
    assert claims.claim(("ns", "x"), second, None, now=0.3) == registry.Granted()
    assert claims.release_actor("a2") == ("ns", "x") and claims.holder(("ns", "x")) is None
    assert claims.release_actor("a2") is None  # idempotent


def test_a_killed_name_is_free_at_its_home_at_once_even_while_gossip_still_shows_the_dead_holder() -> None:
    """Issue 14, 1: the release reaches the home; the view's stale holder must not block the next claim."""
    claims = registry.Claims()
    old, new = registry.Holder("a1", 1.0), registry.Holder("a2", 2.0)
    assert claims.claim(("ns", "x"), old, None, now=0.0) == registry.Granted()
    claims.release(("ns", "x"), "a1")
    assert claims.claim(("ns", "x"), new, None, now=0.1) == registry.Granted()


def test_a_new_home_refuses_names_that_gossip_shows_taken() -> None:
    claims = registry.Claims()
    known = registry.Holder("a1", 1.0)
    assert claims.claim(("ns", "x"), registry.Holder("a2", 2.0), known, now=0.0) == registry.Taken(known)


def test_claims_the_view_never_shows_are_forgotten_after_the_grace() -> None:
    claims = registry.Claims()
    claims.claim(("ns", "x"), registry.Holder("a1", 1.0), None, now=0.0)
    assert claims.prune({}, now=5.0, grace_s=10.0) == []
    assert claims.holder(("ns", "x")) is not None
    assert claims.prune({("ns", "x"): registry.Holder("a1", 1.0)}, now=9.0, grace_s=10.0) == []  # seen: the grace restarts
    assert claims.prune({}, now=18.0, grace_s=10.0) == []
    assert claims.prune({}, now=19.5, grace_s=10.0) == [("ns", "x")]
    assert claims.holder(("ns", "x")) is None


@given(st.lists(st.tuples(st.floats(0, 100), st.text(min_size=1, max_size=4)), min_size=1, max_size=6))
def test_after_a_partition_every_member_picks_the_same_winner(holders: list[tuple[float, str]]) -> None:
    items = [registry.Holder(actor_id, created) for created, actor_id in holders]
    winner = registry.pick_winner(items)
    assert all(registry.pick_winner(list(order)) == winner for order in itertools.islice(itertools.permutations(items), 10))


@given(
    st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=1, max_size=6),
    st.integers(0, 5),
)
def test_spread_for_tasks_takes_every_member_that_fits_in_turn(nodes: list[tuple[int, bool]], start: int) -> None:
    """Round robin over the members with room, by id, from the one after the last: a burst of SPREAD leases lands on
    each member in turn, whatever gossip says of their load."""
    view = [scheduler.NodeView(f"n{i}", {"CPU": 4}, {"CPU": float(free)}, draining=draining) for i, (free, draining) in enumerate(nodes)]
    fit = sorted(v.node_id for v in view if not v.draining and v.available["CPU"] >= 1)
    last = f"n{start}"
    seen = []
    for _ in range(len(fit)):
        pick = scheduler.spread_after({"CPU": 1}, view, set(), last)
        if not fit:
            assert pick is None
            return
        assert pick is not None and pick.node_id in fit
        seen.append(pick.node_id)
        last = pick.node_id
    assert sorted(seen) == fit
