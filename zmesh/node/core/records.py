"""What the node knows about each client process and each actor it hosts."""

from __future__ import annotations

import dataclasses
from typing import Any

from zmesh.node.core.resources import Reservation
from zmesh.transport.ids import ActorId, ClientId

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
    keeper: str | None = None  # the node that re-creates it elsewhere if its host dies
    watchers: set[str] = dataclasses.field(default_factory=set)  # nodes relaying its state to their clients
    created_at: float = 0.0  # wall clock of creation: breaks a name tie after a partition heals
    tried: set[str] = dataclasses.field(default_factory=set)  # members that refused it this round
    pending_replies: list[Any] = dataclasses.field(default_factory=list)  # (identity, req id) of deferred creates

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

    def describe(self) -> dict[str, Any]:
        # Detached is the lifetime the creator asked for (Ray's lifetime="detached"). ``owner`` is None on
        # every node but the owner's, so it cannot tell; the mesh's rule (no owner client, no owner node)
        # stands for records whose spec does not say (stubs mirrored from gossip).
        detached = self.spec.get("detached")
        return {
            "node_id": self.host,
            "actor_id": self.actor_id,
            "class_name": self.class_name,
            "name": self.name,
            "namespace": self.namespace,
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "detached": bool(detached) if detached is not None else self.owner is None and not self.owner_node,
            "resources": self.demand,
            "error": self.error,
        }
