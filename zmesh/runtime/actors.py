"""The caller's view of each actor it talks to: where it lives, queued and in-flight calls."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, deque
from typing import Any, Generic, TypeVar

from zmesh.exceptions import ActorDiedError, ActorUnavailableError
from zmesh.transport.ids import ActorId, ObjectId

PENDING = "PENDING"  # address not known yet, or restarting: calls queue here
ALIVE = "ALIVE"
DEAD = "DEAD"


K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """The last ``limit`` keys remembered, oldest forgotten first: state about the dead must not grow for ever."""

    __slots__ = ("_items", "_limit")

    def __init__(self, limit: int) -> None:
        self._items: OrderedDict[K, V] = OrderedDict()
        self._limit = limit

    def add(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._limit:
            self._items.popitem(last=False)

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


class Call:
    """One submitted method call, kept until its result arrives so it can be failed or retried."""

    __slots__ = ("frames", "header", "keep", "oids", "retries_left")

    def __init__(
        self, oids: tuple[ObjectId, ...], header: tuple[Any, ...], frames: list[Any], retries_left: int, keep: list[Any] | None = None
    ) -> None:
        self.oids = oids
        self.header = header  # (oids, method, group, frame count): one entry of a CALL batch
        self.frames = frames
        self.retries_left = retries_left
        self.keep = keep  # the refs pickled into the arguments, alive until the result (see ownership)


class ActorConn:
    __slots__ = ("actor_id", "address", "error", "incarnation", "inflight", "keep_args", "queue", "resolving", "state")

    def __init__(self, actor_id: ActorId) -> None:
        self.actor_id = actor_id
        self.state = PENDING
        self.address: str | None = None
        self.incarnation = -1
        self.queue: deque[Call] = deque()
        self.inflight: dict[ObjectId, Call] = {}
        self.error: BaseException | None = None
        self.resolving = False
        self.keep_args: list[Any] | None = None  # refs in the constructor's arguments: a restart needs them

    def take_inflight(self) -> list[Call]:
        """In-flight calls in submission order (dicts keep insertion order)."""
        calls = list(self.inflight.values())
        self.inflight.clear()
        return calls


@dataclasses.dataclass
class Transition:
    """What applying the node's news to a connection asks the runtime to do."""

    send: list[Call] = dataclasses.field(default_factory=list)  # to the new address, in this order
    fail: list[tuple[tuple[ObjectId, ...], BaseException]] = dataclasses.field(default_factory=list)
    gone: str | None = None  # the address of a worker that no longer serves this actor


def apply_state(conn: ActorConn, state: str, incarnation: int, address: str | None, error: str | None) -> Transition | None:
    """Move ``conn`` to the state the node reports (sans I/O); None when the news is stale.

    A worker that went away loses its calls in flight: they fail (``ActorUnavailableError``
    while the actor restarts, ``ActorDiedError`` when it is dead), or queue again while
    they have retries left. Once alive at a new address, everything queued is sent there.
    """
    if conn.state is DEAD or incarnation < conn.incarnation:
        return None
    step = Transition()
    old = conn.address
    if old is not None and (state != ALIVE or address != old):
        step.gone = old
        lost_error: BaseException
        if state == DEAD:
            lost_error = ActorDiedError(error or f"actor {conn.actor_id} is dead")
        else:
            lost_error = ActorUnavailableError(
                f"actor {conn.actor_id} became unavailable while this call was in flight: its worker died and is restarting"
            )
        retry = []
        for call in conn.take_inflight():
            if call.retries_left == 0 or state == DEAD:
                step.fail.append((call.oids, lost_error))
            else:
                call.retries_left -= 1 if call.retries_left > 0 else 0
                retry.append(call)
        conn.queue.extendleft(reversed(retry))
        conn.address = None
    conn.incarnation = max(conn.incarnation, incarnation)
    if state == ALIVE and address is not None:
        conn.state = ALIVE
        conn.address = address
        while conn.queue:
            call = conn.queue.popleft()
            conn.inflight[call.oids[0]] = call
            step.send.append(call)
    elif state == DEAD:
        conn.state = DEAD
        conn.keep_args = None
        conn.error = ActorDiedError(error or f"actor {conn.actor_id} is dead")
        step.fail.extend((call.oids, conn.error) for call in conn.queue)
        step.fail.extend((call.oids, conn.error) for call in conn.take_inflight())
        conn.queue.clear()
    else:
        conn.state = PENDING
    return step
