"""The caller's view of each actor it talks to: where it lives, queued and in-flight calls."""

from __future__ import annotations

from collections import deque
from typing import Any

from zmesh.transport.ids import ActorId, ObjectId

PENDING = "PENDING"  # address not known yet, or restarting: calls queue here
ALIVE = "ALIVE"
DEAD = "DEAD"


class Call:
    """One submitted method call, kept until its result arrives so it can be failed or retried."""

    __slots__ = ("frames", "header", "oids", "retries_left")

    def __init__(self, oids: tuple[ObjectId, ...], header: tuple[Any, ...], frames: list[Any], retries_left: int) -> None:
        self.oids = oids
        self.header = header  # (oids, method, group, frame count): one entry of a CALL batch
        self.frames = frames
        self.retries_left = retries_left


class ActorConn:
    __slots__ = ("actor_id", "address", "error", "incarnation", "inflight", "queue", "resolving", "state")

    def __init__(self, actor_id: ActorId) -> None:
        self.actor_id = actor_id
        self.state = PENDING
        self.address: str | None = None
        self.incarnation = -1
        self.queue: deque[Call] = deque()
        self.inflight: dict[ObjectId, Call] = {}
        self.error: BaseException | None = None
        self.resolving = False

    def take_inflight(self) -> list[Call]:
        """In-flight calls in submission order (dicts keep insertion order)."""
        calls = list(self.inflight.values())
        self.inflight.clear()
        return calls
