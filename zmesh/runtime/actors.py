"""The caller's view of each actor it talks to: where it lives, queued and in-flight calls.

Each call is sent tagged with the actor incarnation the caller believes lives at
its address; a worker that hosts something else refuses it unrun (see calls.py),
and the refused call then ends as a call lost with its worker would.
"""

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

    def discard(self, key: K) -> None:
        self._items.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


class Call:
    """One submitted method call, kept until its result arrives so it can be failed or retried."""

    __slots__ = ("frames", "header", "keep", "oids", "retries_left", "target")

    def __init__(
        self, oids: tuple[ObjectId, ...], header: tuple[Any, ...], frames: list[Any], retries_left: int, keep: list[Any] | None = None
    ) -> None:
        self.oids = oids
        self.header = header  # (oids, method, group, frame count): one entry of a CALL batch
        self.frames = frames
        self.retries_left = retries_left
        self.keep = keep  # the refs pickled into the arguments, alive until the result (see ownership)
        # (actor id, incarnation) it was last sent to, set when its address is chosen: a retry is sent anew.
        self.target: tuple[str, int] = ("", -1)


class ActorConn:
    __slots__ = (
        "actor_id", "address", "error", "incarnation", "inflight", "keep_args", "queue", "refused", "refused_calls", "resolving", "state",
    )  # fmt: skip

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
        # (address, incarnation) whose worker refused our calls: the node's news must differ from it to be believed.
        self.refused: tuple[str, int] | None = None
        self.refused_calls: list[Call] = []  # refused unrun, waiting for the node's news to fail or retry them

    def send(self, call: Call) -> None:
        """``call`` leaves for the current address now: tag it with the incarnation believed to live there."""
        call.target = (self.actor_id, self.incarnation)
        self.inflight[call.oids[0]] = call

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
    detach: str | None = None  # an address where another worker refused this actor's calls: alive, not ours


def apply_state(conn: ActorConn, state: str, incarnation: int, address: str | None, error: str | None) -> Transition | None:
    """Move ``conn`` to the state the node reports (sans I/O); None when the news is stale.

    A worker that went away, or was replaced at its address by another incarnation,
    loses its calls in flight: they fail (``ActorUnavailableError`` while the actor
    restarts, ``ActorDiedError`` when it is dead), or queue again while they have
    retries left; so do the calls a worker refused. Once alive at a new address,
    everything queued is sent there.
    """
    if conn.state is DEAD or incarnation < conn.incarnation:
        return None
    if state == ALIVE and conn.refused == (address, incarnation):
        return None  # the worker there told us it is not that incarnation: wait for the node to learn it
    step = Transition()
    old = conn.address
    lost = [(call, True) for call in conn.refused_calls]
    conn.refused_calls = []
    if old is not None and (state != ALIVE or address != old or incarnation != conn.incarnation):
        if conn.refused is not None and conn.refused[0] == old:
            step.detach = old  # another worker serves that address now: it is not gone
        elif address != old:
            step.gone = old
        lost.extend((call, False) for call in conn.take_inflight())
        conn.address = None
    conn.refused = None
    if lost:
        _lose(conn, state, error, sorted(lost, key=lambda pair: pair[0].oids[0]), step)  # ids grow: submission order
    conn.incarnation = max(conn.incarnation, incarnation)
    if state == ALIVE and address is not None:
        conn.state = ALIVE
        conn.address = address
        while conn.queue:
            call = conn.queue.popleft()
            conn.send(call)
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


def _lose(conn: ActorConn, state: str, error: str | None, lost: list[tuple[Call, bool]], step: Transition) -> None:
    """Fail the calls lost with their worker (``True``: refused by the worker at their address), or queue them again."""
    died = ActorDiedError(error or f"actor {conn.actor_id} is dead") if state == DEAD else None
    unavailable = ActorUnavailableError(
        f"actor {conn.actor_id} became unavailable while this call was in flight: its worker died and is restarting"
    )
    refused = ActorUnavailableError(
        f"actor {conn.actor_id} did not run this call: the worker at its address hosts another actor or incarnation "
        "(the actor's worker died or was replaced)"
    )
    retry = []
    for call, was_refused in lost:
        if died is not None or call.retries_left == 0:
            step.fail.append((call.oids, died or (refused if was_refused else unavailable)))
        else:
            call.retries_left -= 1 if call.retries_left > 0 else 0
            retry.append(call)
    conn.queue.extendleft(reversed(retry))


def refuse(conn: ActorConn, address: str, incarnation: int, oids: list[ObjectId]) -> bool:
    """The worker at ``address`` refused these calls, sent for ``incarnation``: none of them ran (sans I/O).

    They wait for the node's next news of the actor, which fails or retries them as
    calls lost with their worker. If that worker is where this caller believes the actor
    lives, the belief is stale: calls queue until the node reports something else.
    Returns whether to ask the node for the actor's state.
    """
    calls = [conn.inflight.pop(oid) for oid in oids if oid in conn.inflight]
    if not calls:
        return False  # answered already: failed or retried with the news
    conn.refused_calls.extend(calls)
    if conn.address != address or conn.incarnation != incarnation:
        return True  # sent before the news we have: that news decides their fate, asked again
    if conn.refused == (address, incarnation):
        return False  # asked already
    conn.refused = (address, incarnation)
    conn.state = PENDING
    return True
