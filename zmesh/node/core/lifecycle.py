"""An actor's life as decisions: what a worker exit, a kill, a start report or a node's death leads to.

Pure: each function looks at (and for transitions, updates) one ``ActorRecord``
and returns what the node must do; the node runs it (spawn, signal, notify).
"""

from __future__ import annotations

import dataclasses

from zmesh.node.core import records
from zmesh.node.core.records import ActorRecord


@dataclasses.dataclass(frozen=True, slots=True)
class Ignore:
    """Nothing to do: a stale report (an older incarnation, a worker already replaced, an actor already dead)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Restart:
    """Start a new worker for the next incarnation, here."""


@dataclasses.dataclass(frozen=True, slots=True)
class Replace:
    """Create it again on another member (its host died or is draining): wait for placement."""


@dataclasses.dataclass(frozen=True, slots=True)
class Pending:
    """Killed before it was started: the creation under way stands for the restart (one is counted), as in Ray."""


@dataclasses.dataclass(frozen=True, slots=True)
class Alive:
    address: str


@dataclasses.dataclass(frozen=True, slots=True)
class Bury:
    """The actor is dead for good; ``reason`` is what every later call raises."""

    reason: str


Decision = Ignore | Restart | Replace | Pending | Alive | Bury


def _limit(record: ActorRecord) -> str:
    return "unlimited" if record.max_restarts == -1 else str(record.max_restarts)


def worker_exited(record: ActorRecord, pid: int, code: int) -> Decision:
    if record.pid != pid or record.state == records.DEAD:
        return Ignore()  # a worker already replaced, or one killed on purpose
    if record.can_restart():
        return Restart()
    return Bury(
        f"the worker process of actor {record.class_name} ({record.actor_id}) died unexpectedly (exit code {code}) "
        f"and it has no restarts left (max_restarts={_limit(record)})"
    )


def killed(record: ActorRecord, why: str, *, no_restart: bool) -> Decision:
    if record.state == records.DEAD:
        return Ignore()
    if no_restart or not record.can_restart():
        return Bury(f"actor {record.class_name} ({record.actor_id}) is dead: {why}")
    if record.state in (records.WAITING, records.PLACING):
        # Ray cancels the scheduling and schedules it again, counting a restart; nothing runs yet, so
        # letting the placement go on is the same, without a second placement racing the first.
        record.restarts += 1
        return Pending()
    return Restart()


def started(record: ActorRecord, incarnation: int, ok: bool, error: str | None, address: str) -> Decision:
    if record.incarnation != incarnation or record.state not in (records.STARTING, records.RESTARTING):
        return Ignore()
    if ok:
        return Alive(address)
    return Bury(f"the actor's constructor failed: {error}")


def host_died(record: ActorRecord, node_id: str, how: str, *, keeper: bool) -> Decision:
    """The member hosting ``record`` died (``how``: dead or left); ``keeper``: this node must create it again."""
    if record.state == records.DEAD:
        return Ignore()
    if not record.can_restart():
        return Bury(
            f"actor {record.class_name} ({record.actor_id}) died with its node {node_id} ({how}) "
            f"and it has no restarts left (max_restarts={_limit(record)})"
        )
    return Replace() if keeper else Restart()


def next_incarnation(record: ActorRecord, state: str) -> None:
    """Count one restart: callers see the new incarnation and fail or retry what was in flight."""
    record.restarts += 1
    record.incarnation += 1
    record.address = None
    record.state = state
