"""What the node knows about each client process and each actor it hosts."""

from __future__ import annotations

import dataclasses
from typing import Any

from zmesh.node.core.resources import Reservation
from zmesh.transport.ids import FINAL_INCARNATION, ActorId, ClientId

# Node-side actor states; clients see ALIVE, DEAD, or anything else as PENDING.
WAITING = "PENDING_CREATION"  # waiting for resources
PLACING = "PLACING"  # offered to another member, waiting for its answer
STARTING = "STARTING"
ALIVE = "ALIVE"
RESTARTING = "RESTARTING"
DEAD = "DEAD"


@dataclasses.dataclass
class Client:
    client_id: ClientId
    kind: str
    pid: int
    address: str
    pidfd: int | None = None
    membership: bool = False  # subscribed to membership events


# What a record's gossip row (``ActorRecord.row``) is made of, and whether its node lists it (``host``):
# setting one of these tells the table that keeps the record, so the node rebuilds only the rows that changed.
ROW_FIELDS = frozenset(
    {
        "class_name", "namespace", "name", "state", "address", "incarnation", "restarts", "max_restarts",
        "spec", "owner", "owner_node", "created_at", "meta_blob", "origin", "keepers", "host",
    }
)  # fmt: skip


@dataclasses.dataclass
class ActorRecord:
    actor_id: ActorId
    class_name: str
    class_key: str
    meta_blob: bytes
    args_frames: list[Any]
    spec: dict[str, Any]
    owner: ClientId | None  # None when detached
    creator: ClientId  # the process that created it (its print lines go there)
    owner_address: str
    name: str | None
    namespace: str
    demand: dict[str, float]
    max_restarts: int
    state: str = WAITING
    incarnation: int = 0
    restarts: int = 0
    pid: int | None = None
    address: str | None = None
    error: str | None = None
    reservation: Reservation | None = None
    subscribers: set[ClientId] = dataclasses.field(default_factory=set)
    waiting_since: float = 0.0
    warned: bool = False
    # ---- the mesh. A record is *hosted* when ``host`` is this node (its worker runs here), else
    # a *stub* that mirrors the host's state for this node's clients and watchers.
    host: str | None = None  # None while waiting to be placed
    origin: str = ""  # the node that took the creation (keeps the spec while the actor may restart)
    owner_node: str = ""  # the node of the owner client (non-detached actors die with it)
    keepers: list[str] = dataclasses.field(default_factory=list)  # nodes holding its creation, in the order they act
    node_incarnation: int = 0  # the host's membership incarnation when the worker started: fencing after a burial
    watchers: set[str] = dataclasses.field(default_factory=set)  # nodes relaying its state to their clients
    created_at: float = 0.0  # wall clock of creation: breaks a name tie after a partition heals
    tried: set[str] = dataclasses.field(default_factory=set)  # members that refused it this round
    # The changed-records set of the table that keeps it (``ActorTable.gossip_rows``); None until one does.
    changed_into: set[ActorId] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in ROW_FIELDS and (into := self.changed_into) is not None:
            into.add(self.actor_id)

    @property
    def token(self) -> str:
        return f"{self.actor_id}.{self.incarnation}"

    def can_restart(self) -> bool:
        return self.max_restarts == -1 or self.restarts < self.max_restarts

    def public_state(self) -> tuple[str, int, str | None, str | None]:
        """(state, incarnation, address, error) as callers understand it."""
        if self.state == ALIVE:
            return ALIVE, self.incarnation, self.address, None
        if self.state == DEAD:
            return DEAD, self.incarnation, None, self.error
        return "PENDING", self.incarnation, None, None

    def detached(self) -> bool:
        """Ray's lifetime="detached", as the creator asked for it.

        ``owner`` is None on every node but the owner's, so it cannot tell; the mesh's rule (no owner
        client, no owner node) stands for records whose spec does not say (stubs mirrored from gossip).
        """
        asked = self.spec.get("detached")
        return bool(asked) if asked is not None else self.owner is None and not self.owner_node

    def row(self) -> ActorRow:
        """What gossip tells the mesh of this actor."""
        return ActorRow(
            class_name=self.class_name,
            namespace=self.namespace,
            name=self.name,
            state=self.state,
            address=self.address,
            incarnation=self.incarnation,
            detached=self.detached(),
            restartable=self.can_restart(),
            created_at=self.created_at,
            meta=self.meta_blob if self.name is not None else None,
            origin=self.origin,
            keepers=tuple(self.keepers),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "node_id": self.host,
            "actor_id": self.actor_id,
            "class_name": self.class_name,
            "name": self.name,
            "namespace": self.namespace,
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "detached": self.detached(),
            "resources": self.demand,
            "error": self.error,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class ActorRow:
    """One actor in its node's gossip entry (and in a ``find`` answer): the facts every member may act on."""

    class_name: str
    namespace: str
    name: str | None
    state: str
    address: str | None
    incarnation: int
    detached: bool
    restartable: bool
    created_at: float
    meta: bytes | None  # named actors only: what get_actor needs to build a handle without asking
    origin: str
    keepers: tuple[str, ...] = ()

    def wire(self) -> list[Any]:
        return [
            self.class_name, self.namespace, self.name, self.state, self.address, self.incarnation,
            self.detached, self.restartable, self.created_at, self.meta, self.origin, list(self.keepers),
        ]  # fmt: skip

    @staticmethod
    def from_wire(raw: Any) -> ActorRow | None:
        """The row, or None when ``raw`` is not one (a peer's garbage is skipped, never trusted)."""
        if not isinstance(raw, list) or len(raw) != 12:
            return None
        cls, ns, name, state, address, inc, detached, restartable, created, meta, origin, keepers = raw
        ok = (
            isinstance(cls, str) and isinstance(ns, str) and (name is None or isinstance(name, str))
            and state in _STATES and (address is None or isinstance(address, str))
            and type(inc) is int and 0 <= inc <= FINAL_INCARNATION and isinstance(created, int | float)
            and (meta is None or isinstance(meta, bytes)) and isinstance(origin, str)
            and isinstance(keepers, list | tuple) and len(keepers) <= 16 and all(isinstance(k, str) for k in keepers)
        )  # fmt: skip
        if not ok:
            return None
        return ActorRow(cls, ns, name, state, address, inc, bool(detached), bool(restartable), float(created), meta, origin, tuple(keepers))


_STATES = (WAITING, PLACING, STARTING, ALIVE, RESTARTING, DEAD)
