"""Ground truth of a simulated history: what callers asked and were told, and which node holds which creation.

The actor layer reports here as a real node's logs would (never reading it back to decide anything); the
invariants read it. A creation is *held* by a node while it hosts it, waits to place it, or keeps it as a
keeper; a node that lets go of the last copy while alive must have a reason that ends the actor.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Reasons to let go of a copy. Any of them ends (or hands on) any actor; BURIED and EXHAUSTED end only what
# could not restart; anything else that drops the last copy of a restartable actor loses it.
KILLED, FAILED, PLACED, SUPERSEDED, RECREATING, MOVED = "killed", "failed", "placed", "superseded", "recreating", "moved"
BURIED, EXHAUSTED, GONE = "buried", "exhausted", "gone"
ENDING = frozenset({KILLED, FAILED, PLACED, SUPERSEDED, RECREATING, MOVED})


@dataclasses.dataclass
class Ticket:
    """One creation call: what the caller asked and what it was told."""

    actor_id: str
    name: str | None
    get_if_exists: bool
    origin: str
    asked_at: float
    restartable: bool
    strategy: Any = None
    outcome: str | None = None  # granted | resolved | exists | failed
    actor: str | None = None  # the actor the caller got a handle to
    answered_at: float | None = None

    def answer(self, outcome: str, actor: str | None, now: float) -> None:
        if self.outcome is None:
            self.outcome, self.actor, self.answered_at = outcome, actor, now


@dataclasses.dataclass
class Failure:
    actor_id: str
    origin: str
    reason: str
    strategy: Any
    waited_s: float
    at: float
    target_state: str | None = None  # the origin's membership state of an affinity target


@dataclasses.dataclass
class Loss:
    actor_id: str
    node: str
    reason: str
    at: float


class Ledger:
    def __init__(self) -> None:
        self.tickets: list[Ticket] = []
        self.restartable: dict[str, bool] = {}  # actor id -> whether it restarts (max_restarts == -1)
        self.accepted: dict[str, float] = {}  # actor id -> when its creation was taken
        self.kills: dict[str, float] = {}  # actor id -> when a caller first killed it
        self.kill_done: dict[str, float] = {}  # actor id -> when a node first carried out its kill
        self.holders: dict[str, set[str]] = {}
        self.failures: list[Failure] = []
        self.losses: list[Loss] = []  # the last copy dropped by a live node without a reason that ends the actor
        self.buried_stops: set[str] = set()  # actors some node stopped because membership said it was buried
        self.lost_to_deaths: dict[str, float] = {}  # actor id -> when its last holder died
        self.lookups: list[tuple[float, str, dict[str, str | None]]] = []
        self.started: list[tuple[float, str, str, int, int]] = []  # (when, node, actor, incarnation, node incarnation)

    def hold(self, node: str, actor_id: str) -> None:
        self.holders.setdefault(actor_id, set()).add(node)

    def let_go(self, node: str, actor_id: str, reason: str, still_holds: bool, now: float) -> None:
        if still_holds:
            return
        holders = self.holders.get(actor_id, set())
        holders.discard(node)
        if holders or reason in ENDING or actor_id in self.kills:
            return
        if self.restartable.get(actor_id, False) or reason not in (BURIED, EXHAUSTED):
            self.losses.append(Loss(actor_id, node, reason, now))

    def node_died(self, node: str, now: float) -> None:
        for actor_id, holders in self.holders.items():
            if node in holders:
                holders.discard(node)
                if not holders:
                    self.lost_to_deaths[actor_id] = now

    def held(self, actor_id: str) -> bool:
        return bool(self.holders.get(actor_id))
