"""Placement over the mesh view: which member should host a new actor. Pure: no I/O, no clock.

The chosen member is only a guess from gossip, which may be stale; the target
reserves and is the authority on its own capacity, and a refusal makes the
caller try the next one (``tried``), so a stale view costs a round trip, never
an over-booking.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

_EPS = 1e-9

DEFAULT = "DEFAULT"
SPREAD = "SPREAD"
AFFINITY = "NODE_AFFINITY"
# Hard affinity to a member not in the view yet: how long a creation waits for its entry before failing.
AFFINITY_WAIT_S = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class NodeView:
    node_id: str
    total: Mapping[str, float]
    available: Mapping[str, float]
    actors: int = 0
    draining: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Place:
    node_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class Wait:
    """Nothing fits now; ``infeasible`` when no member could ever host it."""

    infeasible: bool
    reason: str
    until: float | None = None  # seconds from now when waiting must be decided again (even with no news)


@dataclasses.dataclass(frozen=True, slots=True)
class Fail:
    reason: str


Decision = Place | Wait | Fail


def fits(demand: Mapping[str, float], amounts: Mapping[str, float]) -> bool:
    return all(amounts.get(k, 0.0) + _EPS >= v for k, v in demand.items())


def parse_strategy(value: Any) -> tuple[str, str | None, bool]:
    """``(kind, node_id, soft)`` from the wire form: ``"DEFAULT"``, ``"SPREAD"`` or ``[AFFINITY, node_id, soft]``."""
    if value is None or value == DEFAULT:
        return DEFAULT, None, False
    if value == SPREAD:
        return SPREAD, None, False
    if isinstance(value, list | tuple) and len(value) == 3 and value[0] == AFFINITY and isinstance(value[1], str):
        return AFFINITY, value[1], bool(value[2])
    raise ValueError(f"unknown scheduling strategy {value!r}")


def place(
    demand: Mapping[str, float],
    strategy: Any,
    me: str,
    view: Sequence[NodeView],
    tried: frozenset[str] | set[str] = frozenset(),
    placed_recently: Mapping[str, int] | None = None,
    members: Mapping[str, str] | None = None,
    waited_s: float = 0.0,
    affinity_wait_s: float = AFFINITY_WAIT_S,
) -> Decision:
    """Where to create an actor needing ``demand``; ``view`` holds live members whose resources are known, ``me`` among them.

    ``members``: membership's state of every member it knows (``ALIVE``, ``SUSPECT``, ``DEAD``, ``LEFT``), which
    runs ahead of the view: a member that just joined has no resources in it until its entry arrives by gossip.
    ``waited_s``: how long this creation has waited; hard affinity to a member not in the view waits for it
    up to ``affinity_wait_s``, then fails (as Ray fails it only for dead or unknown nodes).
    """
    kind, target, soft = parse_strategy(strategy)
    recent = placed_recently or {}
    open_nodes = [n for n in view if not n.draining]
    if kind == AFFINITY:
        decision = _affinity(demand, target, soft, view, tried, members or {}, waited_s, affinity_wait_s)
        if decision is not None:
            return decision
        kind = DEFAULT
    candidates = [n for n in open_nodes if n.node_id not in tried and fits(demand, n.available)]
    if not candidates:
        if any(fits(demand, n.total) for n in open_nodes):
            return Wait(False, f"no member has {dict(demand)} available now")
        return Wait(True, f"no member could ever fit {dict(demand)}")
    if kind == DEFAULT:
        local = next((n for n in candidates if n.node_id == me), None)
        if local is not None:
            return Place(me)
        # Least loaded by CPU share, so a busy mesh fills evenly; ties broken by id for a stable choice.
        return Place(min(candidates, key=lambda n: (_load(n, recent), n.node_id)).node_id)
    # SPREAD: fewest actors, counting the ones this node sent that gossip may not show yet.
    return Place(min(candidates, key=lambda n: (n.actors + recent.get(n.node_id, 0), _load(n, recent), n.node_id)).node_id)


def spread_after(demand: Mapping[str, float], view: Sequence[NodeView], tried: frozenset[str] | set[str], last: str) -> Place | None:
    """SPREAD for task leases, as Ray spreads tasks: round robin over the members that fit now, the next one by id after
    ``last``. Fewest-actors (``place``) would read each member's load from gossip, a round or more behind a burst;
    None when no member fits now (``place`` then says whether to wait or fail)."""
    fit = sorted(n.node_id for n in view if not n.draining and n.node_id not in tried and fits(demand, n.available))
    if not fit:
        return None
    return Place(next((n for n in fit if n > last), fit[0]))


def _affinity(
    demand: Mapping[str, float],
    target: str | None,
    soft: bool,
    view: Sequence[NodeView],
    tried: frozenset[str] | set[str],
    members: Mapping[str, str],
    waited_s: float,
    wait_s: float,
) -> Decision | None:
    """Hard or soft affinity to ``target``; None: fall back to DEFAULT (soft affinity that cannot be met now)."""
    node = next((n for n in view if n.node_id == target), None)
    if node is not None and not node.draining and fits(demand, node.total):
        if target not in tried and fits(demand, node.available):
            return Place(node.node_id)
        return None if soft else Wait(False, f"node {target} has no room for {dict(demand)} now")
    if soft:
        return None
    prefix = f"NodeAffinitySchedulingStrategy(soft=False): node {target}"
    if node is not None:
        if node.draining:
            return Fail(f"{prefix} is draining")
        return Fail(f"{prefix} can never fit {dict(demand)} (it has {dict(node.total)})")
    state = members.get(target or "")
    if state in ("DEAD", "LEFT"):
        return Fail(f"{prefix} is {state.lower()}")
    if waited_s >= wait_s:
        why = "is not a member" if state is None else "is a member whose resources never arrived"
        return Fail(f"{prefix} {why} (waited {waited_s:.0f} s)")
    # Alive but its entry has not arrived by gossip yet, or not heard of yet here: it may be joining.
    return Wait(False, f"{prefix} is not known here yet; waiting up to {wait_s:g} s for it", until=wait_s - waited_s)


def _load(node: NodeView, recent: Mapping[str, int]) -> float:
    total = node.total.get("CPU", 0.0)
    used = total - node.available.get("CPU", 0.0)
    return (used / total if total > 0 else 1.0) + 0.01 * recent.get(node.node_id, 0)
