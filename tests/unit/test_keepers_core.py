"""Keepers (node/core/keepers.py): who holds a restartable actor's creation and who re-creates it. Pure."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from zmesh.node.core import keepers

NODES = [f"n{i}" for i in range(8)]


@given(st.lists(st.sampled_from(NODES), min_size=2, unique=True), st.text(min_size=1, max_size=10), st.integers(1, 4))
def test_keepers_are_k_live_members_other_than_the_host_in_an_order_all_agree_on(live: list[str], actor_id: str, k: int) -> None:
    host = live[0]
    chosen = keepers.keepers_of(actor_id, live, host, k)
    assert host not in chosen and len(chosen) == min(k, len(live) - 1) and set(chosen) <= set(live)
    for order in itertools.islice(itertools.permutations(live), 5):
        assert keepers.keepers_of(actor_id, order, host, k) == chosen


@given(st.lists(st.sampled_from(NODES), min_size=4, unique=True), st.text(min_size=1, max_size=10), st.data())
def test_any_two_nodes_lost_together_leave_a_keeper_that_acts(live: list[str], actor_id: str, data: st.DataObject) -> None:
    """Issue 14, 5: host and origin (or any two) die at once; with k = 3 someone still holds the creation."""
    host = live[0]
    chosen = keepers.keepers_of(actor_id, live, host)
    lost = set(data.draw(st.lists(st.sampled_from(live), min_size=2, max_size=2, unique=True)))
    survivors = [m for m in live if m not in lost]
    acting = keepers.recreator(chosen, survivors)
    assert acting is not None and acting in chosen and acting not in lost
    # Exactly one keeper acts when the survivors agree on who is alive.
    assert [m for m in chosen if keepers.recreator(chosen, survivors) == m] == [acting]


@given(st.integers(0, 10_000), st.lists(st.integers(0, keepers.STRIDE - 1), min_size=2, max_size=3, unique=True))
def test_two_keepers_acting_at_once_never_share_an_incarnation(current: int, ranks: list[int]) -> None:
    made = [keepers.next_incarnation(current, r) for r in ranks]
    assert len(set(made)) == len(made) and all(m > current for m in made)
    assert all(keepers.next_incarnation(m, 0) > max(made) for m in made)  # the next restart outranks both copies
