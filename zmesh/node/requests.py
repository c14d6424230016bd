"""What drivers, workers and tools ask a node, and how each request is answered.

Every request gets a ``Reply``, its answer token: an op answers through it at once, or
keeps it and answers when another member has (a name's home, a placement). An op
that finds the request wrong raises ``ReplyError``, answered as that error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from zmesh.node.config import NodeConfig
from zmesh.node.core import records, scheduler
from zmesh.node.core.records import ActorRecord, Client
from zmesh.node.core.registry import Card, Granted
from zmesh.node.core.table import ActorTable
from zmesh.node.hosted import HostedActors
from zmesh.node.leases import Leases
from zmesh.node.mesh.actors import MeshActors
from zmesh.node.mesh.names import Verdict
from zmesh.node.pool.workers import InitRefused
from zmesh.transport import protocol
from zmesh.transport.ids import FINAL_INCARNATION, ActorId, ClientId

logger = logging.getLogger(__name__)


class ReplyError(Exception):
    """An error the node reports back to the requester as ``(kind, message)``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Reply:
    """The answer token of one request: answered once, now or later."""

    __slots__ = ("_identity", "_req_id", "_send", "answered")

    def __init__(self, send: Callable[[bytes, list[Any]], bool], identity: bytes, req_id: Any) -> None:
        self._send = send
        self._identity = identity
        self._req_id = req_id
        self.answered = False

    @property
    def identity(self) -> bytes:
        return self._identity

    @property
    def req_id(self) -> Any:
        return self._req_id

    def ok(self, value: Any, payload: list[Any] | None = None) -> None:
        self._answer(True, value, payload or [])

    def error(self, kind: str, message: str) -> None:
        self._answer(False, (kind, message), [])

    def _answer(self, ok: bool, value: Any, payload: list[Any]) -> None:
        if self.answered:
            return
        self.answered = True
        self._send(self._identity, protocol.encode(protocol.REPLY, (self._req_id, ok, value), payload))


Op = Callable[[Client, tuple[Any, ...], list[Any], Reply], None]

_KILLED = "it was killed with zmesh.kill()"


class Requests:
    def __init__(
        self,
        node_id: str,
        config: NodeConfig,
        table: ActorTable,
        hosted: HostedActors,
        actors: MeshActors,
        leases: Leases,
        status: Callable[[], dict[str, Any]],
        stop: Callable[[], None],
    ) -> None:
        self._me = node_id
        self._config = config
        self._table = table
        self._hosted = hosted
        self._actors = actors
        self._leases = leases
        self._status = status
        self._stop = stop
        self._dropped_by_workers: dict[ClientId, int] = {}  # kept after a worker exits: the count is history
        self.ops: dict[str, Op] = {
            "create": self._create,
            "resolve": self._resolve,
            "lookup": self._lookup,
            "kill": self._kill,
            "kill_named": self._kill_named,
            "status": lambda c, a, p, r: r.ok(self._status()),
            "stop": self._stop_op,
            "init": self._init,
            "started": self._started,
            "dropped": self._dropped,
            "gone": lambda c, a, p, r: r.ok(self._actors.gone_addresses(a[0])),
            "members": lambda c, a, p, r: r.ok(self._actors.members()),
            "list_actors": lambda c, a, p, r: r.ok(self._actors.list_actors(None if a[0] is None else str(a[0]))),
            "drain": self._drain,
            "subscribe_membership": self._subscribe_membership,
            "lease": self._lease,
            "return_lease": lambda c, a, p, r: self._then_ok(r, self._leases.hand_back, str(a[0])),
            "kill_lease": lambda c, a, p, r: self._then_ok(r, self._leases.kill_worker, str(a[0])),
            "blocked": lambda c, a, p, r: self._then_ok(r, self._leases.blocked, c, bool(a[0])),
        }

    @staticmethod
    def _then_ok(reply: Reply, op: Callable[..., None], *args: Any) -> None:
        op(*args)
        reply.ok(None)

    def dropped_by_workers(self) -> int:
        return sum(self._dropped_by_workers.values())

    # ------------------------------------------------------------------ actors

    def _create(self, client: Client, args: tuple[Any, ...], payload: list[Any], reply: Reply) -> None:
        spec, class_key = args
        if len(payload) < 2:
            raise ReplyError("ValueError", "create needs the class and its metadata")
        class_blob, meta_blob, args_frames = payload[0], payload[1], list(payload[2:])
        if class_blob:
            self._table.classes[class_key] = bytes(class_blob)
        elif class_key not in self._table.classes:
            raise ReplyError("ValueError", "the actor's class was never sent to this node")
        if self._actors.placement.draining:
            raise ReplyError("ZmeshError", f"node {self._me} is draining: connect to another node to create actors")
        actor_id = ActorId(spec["actor_id"])
        if actor_id in self._table:
            raise ReplyError("ValueError", f"actor id {actor_id} is already taken")
        scheduler.parse_strategy(spec.get("strategy"))  # a ValueError names a bad one
        record = ActorRecord(
            actor_id=actor_id,
            class_name=str(spec["class_name"]),
            class_key=class_key,
            meta_blob=bytes(meta_blob),
            args_frames=args_frames,
            spec=spec,
            owner=None if spec.get("detached") else client.client_id,
            creator=client.client_id,
            owner_address=client.address,
            name=spec.get("name"),
            namespace=spec["namespace"],
            demand={str(k): float(v) for k, v in spec["resources"].items()},
            max_restarts=int(spec.get("max_restarts", 0)),
            waiting_since=time.monotonic(),
        )
        record.origin = self._me
        record.owner_node = "" if spec.get("detached") else self._me
        record.created_at = time.time()
        record.subscribers.add(client.client_id)
        if record.name is None:
            self._actors.placement.accept(record)
            reply.ok((record.actor_id, True, record.meta_blob))
            return
        self._actors.names.claim(record, lambda verdict: self._claimed(record, verdict, client, reply))

    def _claimed(self, record: ActorRecord, verdict: Verdict | str, client: Client, reply: Reply) -> None:
        if isinstance(verdict, str):
            reply.error("ZmeshError", verdict)
            return
        assert record.name is not None
        key = (record.namespace, record.name)
        if isinstance(verdict, Granted) or verdict.holder.actor_id == record.actor_id:
            local = self._table.named(key)
            if local is None or local.actor_id == record.actor_id or local.state == records.DEAD:
                self._actors.placement.accept(record)
                reply.ok((record.actor_id, True, record.meta_blob))
                return
            holder, card = str(local.actor_id), self._actors.names.card_of(local.actor_id)
        else:
            holder, card = verdict.holder.actor_id, verdict.card or self._actors.names.card_of(verdict.holder.actor_id)
        if record.spec.get("get_if_exists") and card is not None:
            self._actors.relay.adopt(holder, card, client.client_id)
            reply.ok((holder, False, card.meta))
            return
        reply.error(
            "ActorAlreadyExistsError",
            f"an actor named {record.name!r} already exists in namespace {record.namespace!r}; "
            "use get_if_exists=True or zmesh.get_actor() to reach it",
        )

    def _resolve(self, client: Client, args: tuple[Any, ...], payload: list[Any], reply: Reply) -> None:
        (actor_id,) = args
        record = self._actors.relay.watch(str(actor_id), client.client_id)
        if record is not None:
            reply.ok(record.public_state())
            return

        def found(record: ActorRecord | None) -> None:
            if record is None:
                error = f"actor {actor_id} is not known to any node of the mesh (it may have died long ago)"
                reply.ok((records.DEAD, FINAL_INCARNATION, None, error))
            else:
                self._table.subscribe(record, client.client_id)
                reply.ok(record.public_state())

        self._actors.relay.find(str(actor_id), found)

    def _lookup(self, client: Client, args: tuple[Any, ...], payload: list[Any], reply: Reply) -> None:
        namespace, name = str(args[0]), str(args[1])
        missing = f"Failed to look up actor with name {name!r} in namespace {namespace!r}: no live actor has that name"

        def found(hit: tuple[str, str, bytes, str] | None) -> None:
            if hit is None:
                reply.error("ValueError", missing)
                return
            actor_id, class_name, meta, node_id = hit
            if self._actors.relay.watch(actor_id, None) is None and node_id != self._me:
                self._actors.relay.adopt(actor_id, Card(class_name, node_id, meta), None)
            record = self._table.get(actor_id)
            if record is not None and record.state == records.DEAD:
                reply.error("ValueError", missing)
            else:
                reply.ok((actor_id, class_name, meta))

        self._actors.names.lookup((namespace, name), found)

    def _kill(self, client: Client, args: tuple[Any, ...], payload: list[Any], reply: Reply) -> None:
        actor_id, no_restart = args
        record = self._actors.relay.watch(str(actor_id), None)
        if record is None:
            raise ReplyError("ValueError", f"actor {actor_id} is not known to this node")
        self._actors.deaths.kill(record, _KILLED, no_restart=bool(no_restart))
        if no_restart and record.name is not None:
            # Answered once the name's home has freed the name: creating it again right away works, as in Ray.
            self._actors.names.released(record, then=lambda: reply.ok(None))
        else:
            reply.ok(None)

    def _kill_named(self, client: Client, args: tuple[Any, ...], payload: list[Any], reply: Reply) -> None:
        namespace, name = str(args[0]), str(args[1])
        found = self._actors.names.find_local((namespace, name))
        if found is None:
            raise ReplyError("ValueError", f"no live actor is named {name!r} in namespace {namespace!r}")
        self._kill(client, (found[0], True), [], reply)

    # ------------------------------------------------------------------ workers

    def _lease(self, client: Client, args: tuple[Any, ...], payload: list[Any], reply: Reply) -> None:
        lease_id, demand, strategy = args

        def answer(ok: bool, value: Any) -> None:
            if ok:
                reply.ok(value)
            else:
                reply.error(str(value[0]), str(value[1]))

        self._leases.ask(client, lease_id, demand, strategy, answer)

    def _init(self, client: Client, args: tuple[Any, ...], payload: list[Any], reply: Reply) -> None:
        try:
            if self._leases.owns_token(args[0]):
                answer = self._leases.init(args[0], client, reply.identity, reply.req_id)
            else:
                answer = self._hosted.init(args[0], client, reply.identity, reply.req_id)
        except InitRefused as exc:
            raise ReplyError("ActorDiedError", str(exc)) from None
        if answer is not None:  # else a warm worker: answered when an actor is given to it
            reply.ok(*answer)

    def _started(self, client: Client, args: tuple[Any, ...], payload: list[Any], reply: Reply) -> None:
        actor_id, incarnation, ok, error, address = args
        if self._leases.owns_worker(actor_id):
            self._leases.started(str(actor_id), client, str(address))
            reply.ok(None)
            return
        self._hosted.started(str(actor_id), incarnation, bool(ok), error, str(address) if address else client.address)
        reply.ok(None)

    def _dropped(self, client: Client, args: tuple[Any, ...], payload: list[Any], reply: Reply) -> None:
        (count,) = args
        if isinstance(count, int) and count >= 0:
            self._dropped_by_workers[client.client_id] = count
        reply.ok(None)

    # ------------------------------------------------------------------ the node and the mesh

    def _stop_op(self, client: Client, args: tuple[Any, ...], payload: list[Any], reply: Reply) -> None:
        self._stop()
        reply.ok(None)

    def _subscribe_membership(self, client: Client, args: tuple[Any, ...], payload: list[Any], reply: Reply) -> None:
        client.membership = True
        reply.ok(self._actors.members())

    def _drain(self, client: Client, args: tuple[Any, ...], payload: list[Any], reply: Reply) -> None:
        (node_id,) = args
        if node_id in (None, self._me):
            self._actors.placement.start_drain()
            reply.ok(self._me)
            return
        matches = [m for m in self._actors.live() if m.startswith(str(node_id))]
        if len(matches) != 1:
            raise ReplyError("ValueError", f"{node_id!r} names {len(matches)} live members; give more of the node id")
        if matches[0] == self._me:
            self._actors.placement.start_drain()
        else:
            self._actors.send(matches[0], "drain", {})
        reply.ok(matches[0])
