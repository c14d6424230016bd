"""What the mesh looks like from a driver: nodes, resources, membership events, the runtime context."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from zmesh.runtime import Runtime

logger = logging.getLogger(__name__)


def _require() -> Runtime:
    from zmesh.api import _require as require

    return require()


def _members() -> list[dict[str, Any]]:
    members: list[dict[str, Any]] = _require().request("members")
    return members


def nodes() -> list[dict[str, Any]]:
    """Every member the connected node knows, in Ray's shape (``NodeID``, ``Alive``, ``Resources``...)."""
    out = []
    for m in _members():
        host, _, port = m["address"].removeprefix("tcp://").rpartition(":")
        alive = m["state"] in ("ALIVE", "SUSPECT")
        out.append(
            {
                "NodeID": m["node_id"],
                "Alive": alive,
                "alive": alive,
                "State": m["state"],
                "NodeManagerAddress": host,
                "NodeManagerHostname": host,
                "NodeManagerPort": int(port) if port.isdigit() else 0,
                "NodeName": host,
                "Resources": dict(m["resources_total"]) if alive else {},
                "AvailableResources": dict(m["resources_available"]) if alive else {},
                "Incarnation": m["incarnation"],
                "Draining": m["draining"],
            }
        )
    return out


def _summed(field: str) -> dict[str, float]:
    total: dict[str, float] = {}
    for m in _members():
        if m["state"] in ("ALIVE", "SUSPECT"):
            for key, value in m[field].items():
                total[key] = total.get(key, 0.0) + float(value)
    return total


def cluster_resources() -> dict[str, float]:
    """Resources of every live member, summed."""
    return _summed("resources_total")


def available_resources() -> dict[str, float]:
    """Resources not reserved by actors, summed over live members (as gossip last told this node)."""
    return _summed("resources_available")


class MembershipEvent(dict[str, str]):
    """``{"node_id", "address", "state"}``; state is ALIVE (joined or refuted), SUSPECT, DEAD or LEFT."""


class _Feed:
    """Membership news from the node, handed to callbacks on a thread of their own (never the I/O thread)."""

    def __init__(self, rt: Runtime) -> None:
        self._queue: queue.SimpleQueue[MembershipEvent | None] = queue.SimpleQueue()
        self._callbacks: list[Callable[[MembershipEvent], None]] = []
        self._iterators: list[queue.SimpleQueue[MembershipEvent | None]] = []
        self._lock = threading.Lock()
        rt.membership_feed = self._arrived
        rt.request("subscribe_membership")
        self._thread = threading.Thread(target=self._run, name="zmesh-membership", daemon=True)
        self._thread.start()
        rt.on_close_hooks.append(self.close)

    def _arrived(self, event: tuple[str, ...]) -> None:
        self._queue.put(MembershipEvent(node_id=event[0], address=event[1], state=event[2]))

    def _run(self) -> None:
        while (event := self._queue.get()) is not None:
            with self._lock:
                callbacks, iterators = list(self._callbacks), list(self._iterators)
            for callback in callbacks:
                try:
                    callback(event)
                except Exception:
                    logger.exception("a zmesh.on_membership callback raised; it stays subscribed")
            for q in iterators:
                q.put(event)
        with self._lock:
            for q in self._iterators:
                q.put(None)

    def add(self, callback: Callable[[MembershipEvent], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def iterator(self) -> queue.SimpleQueue[MembershipEvent | None]:
        q: queue.SimpleQueue[MembershipEvent | None] = queue.SimpleQueue()
        with self._lock:
            self._iterators.append(q)
        return q

    def close(self) -> None:
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(5)


def _feed() -> _Feed:
    rt = _require()
    feed = getattr(rt, "_zmesh_feed", None)
    if feed is None:
        feed = _Feed(rt)
        rt._zmesh_feed = feed  # type: ignore[attr-defined]
    return feed


def on_membership(callback: Callable[[MembershipEvent], None]) -> None:
    """Call ``callback(event)`` for every join, suspicion, death and leave the node sees from now on."""
    _feed().add(callback)


def membership_events(timeout: float | None = None) -> Iterator[MembershipEvent]:
    """Iterate over membership events as they come; stops after ``timeout`` s without one, or at shutdown."""
    q = _feed().iterator()
    while True:
        try:
            event = q.get(timeout=timeout)
        except queue.Empty:
            return
        if event is None:
            return
        yield event


class RuntimeContext:
    """Where the calling code runs: ``zmesh.get_runtime_context()``, as Ray's."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt

    def get_node_id(self) -> str:
        return str(self._rt.node_info.get("node_id"))

    def get_actor_id(self) -> str | None:
        return self._rt.actor_id

    def get_task_id(self) -> str | None:
        """The id of the task running now (in a task worker), as hex; None elsewhere."""
        task_id = self._rt.task_id
        return task_id.hex() if task_id is not None else None

    def get_actor_name(self) -> str | None:
        return self._rt.actor_name

    def get_job_id(self) -> str:
        return self._rt.client_id.hex()

    @property
    def namespace(self) -> str:
        return self._rt.namespace

    def get_namespace(self) -> str:
        return self._rt.namespace

    @property
    def was_current_actor_reconstructed(self) -> bool:
        return self._rt.actor_incarnation > 0

    @property
    def current_actor(self) -> Any:
        parts = self._rt.actor_handle_parts
        if parts is None:
            raise RuntimeError("current_actor is only available inside an actor")
        from zmesh.actor import ActorHandle
        from zmesh.transport.ids import ActorId

        return ActorHandle(ActorId(parts[0]), parts[1], parts[2])

    def get_gpu_ids(self) -> list[int]:
        from zmesh.api import get_gpu_ids

        return get_gpu_ids()


def get_runtime_context() -> RuntimeContext:
    return RuntimeContext(_require())
