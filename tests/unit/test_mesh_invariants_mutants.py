"""The invariant checker catches bugs: each test puts a mutant into one pure core and expects a violation.

Each mutant is played on a fixed history that holds every invariant with the real cores (the same histories
run as controls in test_mesh_invariants.py, on the same seeds), and must break the invariant named.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sim.history import Op, play
from sim.invariants import Violation
from test_mesh_invariants import (
    AFFINITY_TO_A_NEWCOMER,
    HOLDER_DIES,
    HOST_AND_KEEPER_DIE,
    KEEPER_FROZEN_AS_HOST_DIES,
    KILL_AND_RECLAIM,
    NAMED_TWICE,
    PARTITIONED_HOLDER,
)

from zmesh.node.core import keepers, registry, scheduler
from zmesh.node.core.membership import Buried, Membership

SEEDS = range(3)


def caught(history: list[Op], invariant: str) -> str:
    """The violation the mutant causes on ``history`` (any of ``SEEDS``); fails the test if none does."""
    for sim_seed in SEEDS:
        try:
            play(history, seed=sim_seed)
        except Violation as violation:
            message = str(violation).split("\n")[0]
            assert f"({invariant})" in message, message
            return message
    pytest.fail(f"no violation of ({invariant}) on {history}")


def release_nothing(self: registry.Claims, name: registry.Name, actor_id: str) -> bool:
    return False


def grant_always(self: registry.Claims, name: registry.Name, holder: registry.Holder, known: Any, now: float, card: Any = None) -> Any:
    self._set(name, registry._Claim(holder, card, now))
    return registry.Granted()


def prune_nothing(self: registry.Claims, live: Any, now: float, grace_s: float) -> list[registry.Name]:
    return []


def home_is_first(name: registry.Name, members: Any) -> str | None:
    # Each node lists itself first: every creator decides its own claims.
    return next(iter(members), None)


def last_keeper(chosen: Any, live: Any) -> str | None:
    return chosen[-1] if chosen else None


def one_keeper(actor_id: str, live: Any, host: str | None, k: int = keepers.DEFAULT_K) -> list[str]:
    return registry.ranked(actor_id, [m for m in live if m != host])[:1]


def plus_one(current: int, rank: int) -> int:
    return current + 1


REAL_ABOUT_ME = Membership._about_me


def bury_nothing(self: Membership, state: str, incarnation: int, accuser: str, weight: int) -> list[Any]:
    return [a for a in REAL_ABOUT_ME(self, state, incarnation, accuser, weight) if not isinstance(a, Buried)]


REAL_PLACE = scheduler.place


def affinity_fails_at_once(demand: Any, strategy: Any, me: str, view: Any, *args: Any, **kwargs: Any) -> scheduler.Decision:
    kind, target, soft = scheduler.parse_strategy(strategy)
    if kind == scheduler.AFFINITY and not soft and all(n.node_id != target for n in view):
        return scheduler.Fail(f"node {target} is not in the view")
    return REAL_PLACE(demand, strategy, me, view, *args, **kwargs)


def never_suspect_to_death(self: Membership, now: float) -> list[Any]:
    return []


MUTANTS: dict[str, tuple[Any, str, Callable[..., Any], list[Op], str]] = {
    "Claims.release does nothing": (registry.Claims, "release", release_nothing, KILL_AND_RECLAIM, "b"),
    "Claims.claim always grants": (registry.Claims, "claim", grant_always, NAMED_TWICE, "c"),
    "Claims.prune never frees": (registry.Claims, "prune", prune_nothing, HOLDER_DIES, "a"),
    "home_of is whoever asks": (registry, "home_of", home_is_first, NAMED_TWICE, "c"),
    "recreator picks the last keeper": (keepers, "recreator", last_keeper, HOST_AND_KEEPER_DIE, "d"),
    "keepers_of returns 1 keeper": (keepers, "keepers_of", one_keeper, HOST_AND_KEEPER_DIE, "d"),
    "next_incarnation is current + 1 for every rank": (keepers, "next_incarnation", plus_one, KEEPER_FROZEN_AS_HOST_DIES, "e"),
    "the Buried action is never emitted": (Membership, "_about_me", bury_nothing, PARTITIONED_HOLDER, "e"),
    "hard affinity fails at once for a member not in the view": (scheduler, "place", affinity_fails_at_once, AFFINITY_TO_A_NEWCOMER, "f"),
    "membership never declares a suspect dead": (Membership, "_expire_suspicions", never_suspect_to_death, HOST_AND_KEEPER_DIE, "e"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_the_checker_catches_the_mutant(mutant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    target, attribute, replacement, history, invariant = MUTANTS[mutant]
    monkeypatch.setattr(target, attribute, replacement)
    print(f"\n{mutant}: {caught(history, invariant)}")


@pytest.mark.timeout(120)
def test_the_mutant_histories_hold_with_the_real_cores() -> None:
    for history in {id(h): h for _, _, _, h, _ in MUTANTS.values()}.values():
        for sim_seed in SEEDS:
            play(history, seed=sim_seed)
