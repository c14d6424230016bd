"""Actors across the mesh: creation, placement, names, state relay and node deaths.

The node's half that talks to other nodes about actors (``daemon.Node`` mixes it
in; the decisions are the pure cores ``scheduler`` and ``registry``):

- A creation is taken by the caller's node (its *origin*). A named one first
  claims its name at the name's home member. The origin then places it:
  itself when it fits (by default), else another member, which reserves and
  answers (a refusal means try the next). Nothing fits: it waits here.
- The hosting node keeps the worker; every other node interested in the actor
  keeps a *stub* record that mirrors the host's state for its own clients,
  fed by ``state`` messages from the host (its *watchers*).
- A restartable actor has a *keeper* other than its host (its origin, or the
  next member in rendezvous order) holding what it takes to create it again;
  when the host dies, the keeper places it elsewhere with the next
  incarnation, and watchers find it there through gossip.
- Gossip carries each node's actors, names and clients, so ``get_actor`` and
  "is this process gone?" are answered locally.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from zmesh.node.core import lifecycle, membership, records, registry, scheduler
from zmesh.node.core.records import ActorRecord, Client
from zmesh.transport import protocol
from zmesh.transport.ids import ActorId, ClientId

if TYPE_CHECKING:
    from zmesh.node.config import NodeConfig
    from zmesh.node.core.resources import Resources
    from zmesh.node.mesh.link import Mesh

logger = logging.getLogger(__name__)

# Row of one actor in a node's gossip entry.
_CLASS, _NS, _NAME, _STATE, _ADDRESS, _INC, _DETACHED, _RESTARTABLE, _CREATED, _META, _ORIGIN = range(11)


class ReplyError(Exception):
    """An error the node reports back to the requester as ``(kind, message)``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Deferred(Exception):
    """The request's answer comes later (``Node._answer``): raised by an op instead of returning."""


class MeshActors:
    """Mixed into ``Node``: everything it does with actors of other members."""

    if TYPE_CHECKING:  # what the mixin uses of Node
        node_id: str
        address: str
        config: NodeConfig
        resources: Resources
        mesh: Mesh
        _actors: dict[ActorId, ActorRecord]
        _names: dict[tuple[str, str], ActorId]
        _waiting: list[ActorId]
        _clients: dict[ClientId, Client]
        _classes: dict[str, bytes]
        _reschedule: bool
        _entry_dirty: bool

        def _send(self, identity: bytes, frames: list[Any]) -> bool: ...
        def _notify(self, record: ActorRecord) -> None: ...
        def _mark_dead(self, record: ActorRecord, error: str) -> None: ...
        def _kill(self, record: ActorRecord, why: str, *, no_restart: bool) -> None: ...
        def _spawn(self, record: ActorRecord) -> None: ...
        def _kill_worker(self, pid: int) -> None: ...
        def _answer(self, identity: bytes, req_id: Any, ok: bool, value: Any, payload: list[Any] | None = None) -> None: ...

    def _mesh_init(self) -> None:
        self._claims = registry.Claims()
        self._view_actors: dict[str, tuple[str, list[Any]]] = {}  # actor id -> (host node id, row)
        self._view_names: dict[registry.Name, tuple[registry.Holder, str]] = {}  # -> (holder, node listing it)
        self._view_clients: dict[str, str] = {}  # client address -> node id
        self._gone_clients: dict[str, float] = {}  # processes known to have exited, here or elsewhere (bounded)
        self._my_gone: dict[str, float] = {}  # our own clients that exited lately: gossiped, so others know at once
        self._unknown_since: dict[str, float] = {}
        self._placed_recently: dict[str, set[str]] = {}  # node id -> actors we placed there that its entry lacks yet
        self._membership_events: list[dict[str, Any]] = []
        self.draining = False

    # ------------------------------------------------------------------ what this node tells the mesh

    def _entry(self) -> dict[str, Any]:
        actors: dict[str, list[Any]] = {}
        for r in self._actors.values():
            if r.state == records.DEAD:
                continue
            if r.host == self.node_id or (r.host is None and r.origin == self.node_id):
                actors[r.actor_id] = [
                    r.class_name,
                    r.namespace,
                    r.name,
                    r.state,
                    r.address,
                    r.incarnation,
                    r.owner is None and not r.owner_node,
                    r.can_restart(),
                    r.created_at,
                    r.meta_blob if r.name is not None else None,
                    r.origin,
                ]
        return {
            "address": self.address,
            "total": dict(self.resources.total),
            "available": dict(self.resources.available),
            "draining": self.draining,
            "actors": actors,
            # Addresses and ids of our drivers and workers: how any member answers "is this process gone?".
            "clients": sorted(x for c in self._clients.values() if c.kind != "admin" for x in (c.address, c.client_id.hex())),
            "pending": [[r.actor_id, r.demand] for r in self._waiting_records()],
            "gone": sorted(self._my_gone),
        }

    def _waiting_records(self) -> list[ActorRecord]:
        return [self._actors[a] for a in self._waiting if a in self._actors]

    def _publish(self) -> None:
        self._entry_dirty = True

    # ------------------------------------------------------------------ what the mesh tells this node

    def on_member(self, change: membership.Changed) -> None:
        event = membership_event(change, time.time())
        if event is not None:
            self._membership_events.append(event)
            del self._membership_events[:-1000]
            self._tell_subscribers_membership(event)
        if change.state in (membership.DEAD, membership.LEFT):
            self._member_gone(change.node_id, change.state.lower())
        self._rebuild_view()
        self._reschedule = True

    def on_entries(self, changes: list[Any]) -> None:
        self._rebuild_view()
        self._follow_moved_actors()
        self._fence_replaced_actors()
        self._resolve_name_conflicts()
        self._reschedule = True

    def _rebuild_view(self) -> None:
        actors: dict[str, tuple[str, list[Any]]] = {}
        names: dict[registry.Name, tuple[registry.Holder, str]] = {}
        clients: dict[str, str] = {}
        live = set(self.mesh.live())
        for node_id, entry in self.mesh.gossip.entries().items():
            if node_id not in live or node_id == self.node_id:
                continue
            data = entry.data
            for address in data.get("clients") or ():
                clients[address] = node_id
            for address in data.get("gone") or ():
                if isinstance(address, str) and address not in self._gone_clients:
                    self._gone_clients[address] = time.monotonic()
            for actor_id, row in (data.get("actors") or {}).items():
                if not isinstance(row, list) or len(row) != 11:
                    continue
                host = node_id if row[_STATE] != records.WAITING else None
                seen = actors.get(actor_id)
                if seen is None or row[_INC] > seen[1][_INC] or (host is not None and seen[0] is None):
                    actors[actor_id] = (node_id, row)
                if row[_NAME] is not None:
                    key = (row[_NS], row[_NAME])
                    holder = registry.Holder(actor_id, row[_CREATED])
                    other = names.get(key)
                    if other is None or registry.pick_winner([other[0], holder]) == holder:
                        names[key] = (holder, node_id)
        self._view_actors, self._view_names, self._view_clients = actors, names, clients

    def _tell_subscribers_membership(self, event: dict[str, Any]) -> None:
        frames = protocol.encode(protocol.MEMBERSHIP, (event["node_id"], event["address"], event["state"]))
        for client in list(self._clients.values()):
            if client.membership:
                self._send(client.client_id, frames)

    # ------------------------------------------------------------------ creation

    def _create(self, client: Client, identity: bytes, req_id: Any, record: ActorRecord) -> tuple[Any, list[Any]]:
        """Take a creation: claim its name (maybe at another member), then place it."""
        if record.name is None:
            self._accept(record)
            return (record.actor_id, True, record.meta_blob), []
        key = (record.namespace, record.name)
        home = registry.home_of(key, self.mesh.live())
        if home == self.node_id:
            self._decide_claim(record, self._claim_here(key, record.actor_id, record.created_at), identity, req_id, client)
            raise Deferred
        body = {"ns": record.namespace, "name": record.name, "actor_id": record.actor_id, "created_at": record.created_at}

        def on_reply(ok: bool, value: Any, payload: list[Any]) -> None:
            if not ok:
                self._answer(identity, req_id, False, ("ZmeshError", f"could not claim the name {record.name!r}: {value}"))
                return
            self._decide_claim(record, value, identity, req_id, client)

        assert home is not None  # this node is always live
        self.mesh.request(home, "claim", body, [], on_reply, time.monotonic())
        raise Deferred

    def _claim_here(self, key: registry.Name, actor_id: str, created_at: float) -> Any:
        known = {k: v[0] for k, v in self._view_names.items()}
        for r in self._actors.values():
            if r.name is not None and r.state != records.DEAD:
                known.setdefault((r.namespace, r.name), registry.Holder(r.actor_id, r.created_at))
        verdict = self._claims.claim(key, registry.Holder(actor_id, created_at), known, time.monotonic())
        if isinstance(verdict, registry.Granted):
            return None
        return verdict.holder.actor_id

    def _decide_claim(self, record: ActorRecord, holder: Any, identity: bytes, req_id: Any, client: Client) -> None:
        if holder is None or holder == record.actor_id:
            local = self._named_here(record.namespace, record.name)
            if local is not None and local.actor_id != record.actor_id:
                holder = local.actor_id
            else:
                self._accept(record)
                self._answer(identity, req_id, True, (record.actor_id, True, record.meta_blob))
                return
        existing = self._actors.get(holder)
        meta = existing.meta_blob if existing is not None else None
        if meta is None and holder in self._view_actors:
            meta = self._view_actors[holder][1][_META]
        if record.spec.get("get_if_exists") and meta is not None:
            self._watch(holder, client.client_id)
            self._answer(identity, req_id, True, (holder, False, meta))
            return
        self._answer(
            identity,
            req_id,
            False,
            (
                "ActorAlreadyExistsError",
                f"an actor named {record.name!r} already exists in namespace {record.namespace!r}; "
                "use get_if_exists=True or zmesh.get_actor() to reach it",
            ),
        )

    def _named_here(self, namespace: str, name: str | None) -> ActorRecord | None:
        actor_id = self._names.get((namespace, name)) if name is not None else None
        return self._actors.get(actor_id) if actor_id is not None else None

    def _accept(self, record: ActorRecord) -> None:
        self._actors[record.actor_id] = record
        if record.name is not None:
            self._names[(record.namespace, record.name)] = record.actor_id
        self._waiting.append(record.actor_id)
        self._publish()
        self._schedule()

    def _on_claim(self, sender: str, body: dict[str, Any], rid: int | None) -> None:
        key = (str(body["ns"]), str(body["name"]))
        holder = self._claim_here(key, str(body["actor_id"]), float(body["created_at"]))
        if rid is not None:
            self.mesh.reply(sender, rid, True, holder)

    def _on_lookup(self, sender: str, body: dict[str, Any], rid: int | None) -> None:
        """As the name's home: the actor if we know it, else the id we granted the name to (gossip may lag), else None."""
        key = (str(body["ns"]), str(body["name"]))
        found: list[Any] | None = self._find_name(key)
        if found is None and (holder := self._claims.holder(key)) is not None:
            found = [holder.actor_id]
        if rid is not None:
            self.mesh.reply(sender, rid, True, found)

    def _find_name(self, key: registry.Name) -> list[Any] | None:
        """``[actor id, class name, meta, node to watch]`` for a live actor with that name, from here or gossip."""
        record = self._named_here(*key)
        if record is not None and record.state != records.DEAD:
            return [record.actor_id, record.class_name, record.meta_blob, self.node_id]
        seen = self._view_names.get(key)
        if seen is not None and seen[0].actor_id in self._view_actors:
            node_id, row = self._view_actors[seen[0].actor_id]
            if row[_STATE] != records.DEAD and row[_META] is not None:
                return [seen[0].actor_id, row[_CLASS], row[_META], node_id]
        return None

    # ------------------------------------------------------------------ placement

    def _schedule(self) -> None:
        view = self._node_views()
        for actor_id in list(self._waiting):
            record = self._actors.get(actor_id)
            if record is None or record.state != records.WAITING:
                if actor_id in self._waiting:
                    self._waiting.remove(actor_id)
                continue
            recent = {n: len(ids) for n, ids in self._placed_recently.items()}
            decision = scheduler.place(record.demand, record.spec.get("strategy"), self.node_id, view, record.tried, recent)
            if isinstance(decision, scheduler.Fail):
                self._waiting.remove(actor_id)
                self._mark_dead(record, f"actor {record.class_name} ({record.actor_id}) cannot be placed: {decision.reason}")
            elif isinstance(decision, scheduler.Wait):
                if decision.infeasible and not record.warned:
                    record.warned = True
                    logger.warning(
                        "actor %s (%s) needs %s but no member has that much in all; it waits until a node that fits joins",
                        record.class_name, record.actor_id, record.demand,
                    )  # fmt: skip
                record.tried.clear()
            elif decision.node_id == self.node_id:
                reservation = self.resources.try_reserve(record.demand)
                if reservation is None:
                    record.tried.add(self.node_id)
                    continue
                self._waiting.remove(actor_id)
                record.reservation = reservation
                record.host = self.node_id
                record.state = records.STARTING if record.restarts == 0 else records.RESTARTING
                self._choose_keeper(record)
                self._spawn(record)
                self._publish()
            else:
                self._offer(record, decision.node_id)

    def _node_views(self) -> list[scheduler.NodeView]:
        mine = sum(1 for r in self._actors.values() if r.host == self.node_id and r.state != records.DEAD)
        views = [scheduler.NodeView(self.node_id, self.resources.total, self.resources.available, mine, self.draining)]
        live = set(self.mesh.live())
        for node_id, entry in self.mesh.gossip.entries().items():
            if node_id == self.node_id or node_id not in live:
                continue
            data = entry.data
            placed = self._placed_recently.get(node_id)
            if placed:
                placed.difference_update(data.get("actors") or ())
            total, available = data.get("total"), data.get("available")
            if isinstance(total, dict) and isinstance(available, dict):
                views.append(scheduler.NodeView(node_id, total, available, len(data.get("actors") or ()), bool(data.get("draining"))))
        return views

    def _offer(self, record: ActorRecord, target: str) -> None:
        """Ask ``target`` to host ``record``; it reserves or refuses (then the next member is tried)."""
        self._waiting.remove(record.actor_id)
        record.state = records.PLACING
        record.host = target
        self._placed_recently.setdefault(target, set()).add(record.actor_id)
        body = {"spec": self._wire_spec(record), "class_key": record.class_key}
        payload = [self._classes.get(record.class_key, b""), record.meta_blob, *record.args_frames]

        def on_reply(ok: bool, value: Any, _: list[Any]) -> None:
            if not (ok and value is True):
                self._placed_recently.get(target, set()).discard(record.actor_id)
            if record.state != records.PLACING or record.host != target:
                return  # killed meanwhile (the kill went to the target too)
            if ok and value is True:
                record.state = records.STARTING if record.restarts == 0 else records.RESTARTING
                record.tried.clear()
                self._publish()
                return
            logger.info("actor %s (%s): node %s did not take it (%s); trying another", record.class_name, record.actor_id, target, value)
            record.tried.add(target)
            record.host = None
            record.state = records.WAITING
            self._waiting.append(record.actor_id)
            self._reschedule = True

        self.mesh.request(target, "place", body, payload, on_reply, time.monotonic())
        self._publish()

    def _wire_spec(self, record: ActorRecord) -> dict[str, Any]:
        return {
            **record.spec,
            "owner_address": record.owner_address,
            "creator_id": bytes(record.creator),
            "origin": record.origin,
            "owner_node": record.owner_node,
            "detached": record.owner is None and not record.owner_node,
            "incarnation": record.incarnation,
            "restarts": record.restarts,
            "created_at": record.created_at,
            "keeper": record.keeper,
        }

    def _on_place(self, sender: str, body: dict[str, Any], payload: list[Any], rid: int | None) -> None:
        spec, class_key = body["spec"], str(body["class_key"])
        actor_id = ActorId(str(spec["actor_id"]))

        def reply(ok: bool, value: Any) -> None:
            if rid is not None:
                self.mesh.reply(sender, rid, ok, value)

        if self.draining or self.mesh.leaving:
            reply(True, "this node is draining")
            return
        if len(payload) < 2:
            raise ValueError("a placement without class and metadata")
        existing = self._actors.get(actor_id)
        if existing is not None and existing.host == self.node_id and existing.state != records.DEAD:
            reply(True, True)  # a retry of a placement we took
            return
        demand = {str(k): float(v) for k, v in spec["resources"].items()}
        reservation = self.resources.try_reserve(demand)
        if reservation is None:
            reply(True, f"no room for {demand} (available {self.resources.available})")
            self._publish()  # our entry in the sender's view was stale: refresh it
            return
        if payload[0]:
            self._classes[class_key] = bytes(payload[0])
        elif class_key not in self._classes:
            self.resources.release(reservation)
            reply(True, "the class was not sent")
            return
        record = _record_from_spec(spec, class_key, payload, demand)
        record.host = self.node_id
        record.reservation = reservation
        record.state = records.STARTING if record.restarts == 0 else records.RESTARTING
        record.watchers.add(sender)
        if existing is not None:
            record.subscribers |= existing.subscribers
            record.watchers |= existing.watchers
        self._actors[actor_id] = record
        if record.name is not None:
            self._names[(record.namespace, record.name)] = actor_id
        self._choose_keeper(record)
        self._spawn(record)
        self._publish()
        reply(True, True)

    def _choose_keeper(self, record: ActorRecord) -> None:
        """A member other than the host that can create the actor again if this node dies."""
        if not record.can_restart():
            record.keeper = None
            return
        if record.origin != self.node_id and record.origin in self.mesh.live():
            record.keeper = record.origin
            return  # the origin keeps its own stub with the spec
        others = [m for m in self.mesh.live() if m != self.node_id]
        record.keeper = registry.ranked(record.actor_id, others)[0] if others else None
        if record.keeper is not None:
            body = {"spec": self._wire_spec(record), "class_key": record.class_key}
            payload = [self._classes.get(record.class_key, b""), record.meta_blob, *record.args_frames]
            self.mesh.send(record.keeper, "keep", body, payload)

    def _on_keep(self, sender: str, body: dict[str, Any], payload: list[Any]) -> None:
        spec, class_key = body["spec"], str(body["class_key"])
        if len(payload) < 2:
            raise ValueError("a keep without class and metadata")
        if payload[0]:
            self._classes[class_key] = bytes(payload[0])
        demand = {str(k): float(v) for k, v in spec["resources"].items()}
        actor_id = ActorId(str(spec["actor_id"]))
        existing = self._actors.get(actor_id)
        record = _record_from_spec(spec, class_key, payload, demand)
        record.host = sender
        record.keeper = self.node_id
        record.state = records.ALIVE if existing is None else existing.state
        if existing is not None:
            record.subscribers, record.watchers = existing.subscribers, existing.watchers
            record.address, record.incarnation = existing.address, max(existing.incarnation, record.incarnation)
        self._actors[actor_id] = record
        self._send_watch(record)

    # ------------------------------------------------------------------ stubs: watching actors hosted elsewhere

    def _watch(self, actor_id: str, client_id: ClientId | None) -> ActorRecord | None:
        """This node's record of ``actor_id`` (a stub made from gossip if need be), ``client_id`` subscribed."""
        record = self._actors.get(ActorId(actor_id))
        if record is None and actor_id in self._view_actors:
            node_id, row = self._view_actors[actor_id]
            record = _stub_from_row(ActorId(actor_id), row, node_id)
            self._actors[record.actor_id] = record
            self._send_watch(record)
        if record is not None and client_id is not None:
            record.subscribers.add(client_id)
        return record

    def _find(self, actor_id: str, done: Callable[[ActorRecord | None], None]) -> None:
        """Ask every member about an actor gossip has not shown here yet (a handle or a name that travelled faster).

        ``done`` gets this node's new stub of it, watching its host, or None when no member knows it.
        """
        known = self._actors.get(ActorId(actor_id))
        others = [m for m in self.mesh.live() if m != self.node_id]
        if known is not None or not others:
            done(known)
            return
        pending = {"left": len(others), "done": False}

        def on_reply(ok: bool, value: Any, _: list[Any]) -> None:
            if pending["done"]:
                return
            if ok and isinstance(value, list) and len(value) == 11 and isinstance(value[_ORIGIN], str):
                pending["done"] = True
                record = self._actors.get(ActorId(actor_id))
                if record is None:
                    # The answer is a gossip row whose last field names the host.
                    record = _stub_from_row(ActorId(actor_id), value, value[_ORIGIN])
                    self._actors[record.actor_id] = record
                    self._send_watch(record)
                done(record)
                return
            pending["left"] -= 1
            if pending["left"] == 0:
                pending["done"] = True
                done(None)

        for node_id in others:
            self.mesh.request(node_id, "find", {"actor_id": actor_id}, [], on_reply, time.monotonic())

    def _on_find(self, sender: str, body: dict[str, Any], rid: int | None) -> None:
        record = self._actors.get(ActorId(str(body["actor_id"])))
        found = None
        if record is not None and record.state != records.DEAD and record.host is not None:
            found = [
                record.class_name, record.namespace, record.name, records.ALIVE if record.state == records.ALIVE else records.STARTING,
                record.address, record.incarnation, record.owner is None and not record.owner_node, record.can_restart(),
                record.created_at, record.meta_blob, record.host,
            ]  # fmt: skip
        if rid is not None:
            self.mesh.reply(sender, rid, True, found)

    def _send_watch(self, record: ActorRecord) -> None:
        upstream = record.host if record.host is not None else record.origin
        if upstream and upstream != self.node_id:
            self.mesh.send(upstream, "watch", {"actor_id": record.actor_id})

    def _on_watch(self, sender: str, body: dict[str, Any]) -> None:
        record = self._actors.get(ActorId(str(body["actor_id"])))
        if record is None:
            self.mesh.send(
                sender,
                "state",
                {
                    "actor_id": str(body["actor_id"]),
                    "state": records.DEAD,
                    "incarnation": 1 << 30,
                    "address": None,
                    "error": f"actor {body['actor_id']} is not known to node {self.node_id}",
                },
            )
            return
        record.watchers.add(sender)
        self._tell_watcher(record, sender)

    def _tell_watcher(self, record: ActorRecord, node_id: str) -> None:
        self.mesh.send(node_id, "state", _state_body(record))

    def _on_state(self, sender: str, body: dict[str, Any]) -> None:
        record = self._actors.get(ActorId(str(body["actor_id"])))
        if record is None or record.host == self.node_id:
            return
        incarnation = int(body["incarnation"])
        state = str(body["state"])
        if incarnation < record.incarnation or record.state == records.DEAD:
            return
        if record.host not in (sender, None) and record.origin != sender:
            return  # a node the actor left: only its current host speaks for it
        record.incarnation = incarnation
        record.restarts = max(record.restarts, int(body.get("restarts") or 0))
        record.address = body.get("address") if state == records.ALIVE else None
        if state == records.DEAD:
            self._mark_dead(record, str(body.get("error") or "the actor died"))
            return
        record.state = (
            records.ALIVE if state == records.ALIVE else (records.RESTARTING if record.restarts or incarnation else records.STARTING)
        )
        self._notify(record)

    def _follow_moved_actors(self) -> None:
        """Stubs whose host died: gossip shows where the keeper created them again."""
        live = set(self.mesh.live())
        for record in list(self._actors.values()):
            if record.state == records.DEAD or record.host == self.node_id or record.host in live:
                continue
            if record.host is None and record.state in (records.WAITING,):
                continue
            seen = self._view_actors.get(record.actor_id)
            if seen is not None and seen[1][_INC] >= record.incarnation and seen[1][_STATE] != records.WAITING:
                record.host = seen[0]
                self._send_watch(record)

    # ------------------------------------------------------------------ kills and deaths

    def _kill_remote(self, record: ActorRecord, no_restart: bool, why: str) -> None:
        target = record.host if record.host not in (None, self.node_id) else None
        if target is not None:
            self.mesh.send(target, "kill", {"actor_id": record.actor_id, "no_restart": no_restart, "why": why})
        if no_restart:
            self._mark_dead(record, f"actor {record.class_name} ({record.actor_id}) is dead: {why}")
        elif record.state in (records.WAITING, records.PLACING):
            decision = lifecycle.killed(record, why, no_restart=False)  # not started anywhere yet: decided here
            if isinstance(decision, lifecycle.Bury):
                self._mark_dead(record, decision.reason)

    def _on_kill(self, sender: str, body: dict[str, Any]) -> None:
        record = self._actors.get(ActorId(str(body["actor_id"])))
        if record is None:
            return
        why = str(body.get("why") or "it was killed with zmesh.kill()")[:500]
        if record.host == self.node_id:
            self._kill(record, why, no_restart=bool(body.get("no_restart")))
        else:
            self._kill_remote(record, bool(body.get("no_restart")), why)

    def _on_peer_gone(self, sender: str, body: dict[str, Any]) -> None:
        """A client of ``sender`` exited: kill the actors it owned here, tell workers it created."""
        address = str(body["address"])
        self._remember_gone([address])
        for record in list(self._actors.values()):
            owned = record.host == self.node_id and record.owner_address == address and record.state != records.DEAD
            if owned and record.owner_node and not record.spec.get("detached"):
                self._kill(record, f"its owner ({address.partition('|')[0]}) exited", no_restart=True)
        self._tell_creations_of(address)

    def _remember_gone(self, peers: Iterable[str], mine: bool = False) -> None:
        now = time.monotonic()
        for peer in peers:
            self._gone_clients[peer] = now
            if mine:
                self._my_gone[peer] = now
        while len(self._gone_clients) > 20_000:
            self._gone_clients.pop(next(iter(self._gone_clients)))
        for peer, since in list(self._my_gone.items()):
            if now - since > 60 or len(self._my_gone) > 2_000:
                del self._my_gone[peer]
        if mine:
            self._publish()

    def _member_gone(self, node_id: str, how: str) -> None:
        self._remember_gone([address for address, owner in self._view_clients.items() if owner == node_id])
        live = set(self.mesh.live())
        for record in list(self._actors.values()):
            if record.state == records.DEAD:
                continue
            if record.host == self.node_id:
                if record.owner_node == node_id and not record.spec.get("detached"):
                    self._kill(record, f"its owner's node {node_id} {how}", no_restart=True)
                elif record.keeper == node_id:
                    self._choose_keeper(record)
                record.watchers.discard(node_id)
                continue
            if record.host == node_id or (record.host is None and record.origin == node_id and record.state != records.WAITING):
                self._host_died(record, node_id, how, live)

    def _host_died(self, record: ActorRecord, node_id: str, how: str, live: set[str]) -> None:
        seen = self._view_actors.get(record.actor_id)
        if seen is not None and seen[0] != node_id and seen[0] in live and seen[1][_STATE] != records.WAITING:
            record.host = seen[0]  # it had moved already (a drain): follow it
            self._send_watch(record)
            return
        keeper = record.keeper == self.node_id or (record.keeper not in live and record.origin == self.node_id)
        decision = lifecycle.host_died(record, node_id, how, keeper=keeper)
        if isinstance(decision, lifecycle.Bury):
            self._mark_dead(record, decision.reason)
        elif isinstance(decision, lifecycle.Replace):
            logger.info("actor %s (%s): its node %s %s; creating it again elsewhere", record.class_name, record.actor_id, node_id, how)
            lifecycle.next_incarnation(record, records.WAITING)
            record.host = None
            record.tried.clear()
            record.keeper = None
            self._waiting.append(record.actor_id)
            self._reschedule = True
            self._notify(record)
        elif isinstance(decision, lifecycle.Restart):
            lifecycle.next_incarnation(record, records.RESTARTING)  # the keeper creates it; gossip shows where
            self._notify(record)

    def _tell_creations_of(self, address: str) -> None:
        pids = {r.pid for r in self._actors.values() if r.owner_address == address and r.state != records.DEAD and r.pid}
        if not pids:
            return
        frames = protocol.encode(protocol.PEER_GONE, (address,))
        for other in self._clients.values():
            if other.kind == "worker" and other.pid in pids:
                self._send(other.client_id, frames)

    def _fence_replaced_actors(self) -> None:
        """Actors of ours that the mesh re-created elsewhere while it thought this node dead (a stall, a partition).

        The copy with the higher incarnation is the actor; ours stops, and this node follows the other copy.
        """
        live = set(self.mesh.live())
        for record in list(self._actors.values()):
            if record.host != self.node_id or record.state == records.DEAD:
                continue
            seen = self._view_actors.get(record.actor_id)
            if seen is None or seen[0] == self.node_id or seen[0] not in live or seen[1][_STATE] == records.WAITING:
                continue
            if seen[1][_INC] <= record.incarnation:
                continue
            logger.warning(
                "actor %s (%s) was re-created on node %s while this node was unreachable; stopping the copy here",
                record.class_name, record.actor_id, seen[0],
            )  # fmt: skip
            if record.pid is not None:
                self._kill_worker(record.pid)
                record.pid = None  # its exit is then no reason to restart it here
            if record.reservation is not None:
                self.resources.release(record.reservation)
                record.reservation = None
            record.host = seen[0]
            record.incarnation = int(seen[1][_INC])
            record.state = records.STARTING
            record.address = None
            self._send_watch(record)
            self._notify(record)

    # ------------------------------------------------------------------ names after a partition heals

    def _resolve_name_conflicts(self) -> None:
        """Two live actors with one name (granted on both sides of a partition): the younger loses the name."""
        for (namespace, name), actor_id in list(self._names.items()):
            record = self._actors.get(actor_id)
            seen = self._view_names.get((namespace, name))
            if record is None or record.host != self.node_id or seen is None or seen[0].actor_id == actor_id:
                continue
            mine = registry.Holder(actor_id, record.created_at)
            if registry.pick_winner([mine, seen[0]]) != mine:
                logger.warning(
                    "actor %s (%s) loses the name %r in namespace %r to actor %s: both were created while the mesh was split; "
                    "it keeps running for the handles that reach it",
                    record.class_name, actor_id, name, namespace, seen[0].actor_id,
                )  # fmt: skip
                del self._names[(namespace, name)]
                record.name = None
                self._publish()

    # ------------------------------------------------------------------ queries

    def gone_addresses(self, peers: Iterable[Any]) -> list[str]:
        """Which of these process addresses (or client ids in hex) belong to no live process of the mesh."""
        live = {c.address for c in self._clients.values()} | {c.client_id.hex() for c in self._clients.values()}
        now = time.monotonic()
        gone = []
        for peer in peers:
            if not isinstance(peer, str) or peer in live or peer in self._view_clients:
                continue
            if peer in self._gone_clients:
                gone.append(peer)
                continue
            # Not (yet) in any entry: a client of another node that gossip has not shown us yet, or long gone.
            first = self._unknown_since.setdefault(peer, now)
            if len(self._unknown_since) > 10_000:
                self._unknown_since.clear()
            if now - first > max(3.0, 4 * self.config.sync_interval_s):
                gone.append(peer)
        return gone

    def members(self) -> list[dict[str, Any]]:
        """Every member this node knows, itself first, as ``zmesh status`` shows them."""
        out = [self._member_row(self.node_id, self.address, "ALIVE", self.mesh.membership.incarnation, self._entry())]
        for m in sorted(self.mesh.membership.members(), key=lambda m: m.node_id):
            entry = self.mesh.gossip.entry(m.node_id)
            out.append(self._member_row(m.node_id, m.address, m.state, m.incarnation, entry.data if entry is not None else {}))
        return out

    @staticmethod
    def _member_row(node_id: str, address: str, state: str, incarnation: int, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "node_id": node_id,
            "address": address,
            "state": state,
            "incarnation": incarnation,
            "resources_total": data.get("total") or {},
            "resources_available": data.get("available") or {},
            "actors": len(data.get("actors") or ()),
            "pending": len(data.get("pending") or ()),
            "draining": bool(data.get("draining")),
        }

    def list_actors(self, namespace: str | None) -> list[dict[str, Any]]:
        """Every live actor of the mesh (from gossip, and this node's own)."""
        rows: dict[str, dict[str, Any]] = {}
        for actor_id, (node_id, row) in self._view_actors.items():
            rows[actor_id] = {
                "actor_id": actor_id, "class_name": row[_CLASS], "namespace": row[_NS], "name": row[_NAME],
                "state": row[_STATE], "node_id": node_id, "detached": row[_DETACHED],
            }  # fmt: skip
        for r in self._actors.values():
            if r.state != records.DEAD and (r.host == self.node_id or (r.host is None and r.origin == self.node_id)):
                rows[r.actor_id] = {
                    "actor_id": r.actor_id, "class_name": r.class_name, "namespace": r.namespace, "name": r.name,
                    "state": r.state, "node_id": r.host or self.node_id, "detached": r.owner is None and not r.owner_node,
                }  # fmt: skip
        return [v for v in rows.values() if namespace is None or v["namespace"] == namespace]


def membership_event(change: membership.Changed, now: float) -> dict[str, Any] | None:
    """What users see of a membership change (``zmesh.on_membership``), or None.

    The death of a node this one never knew is news to the protocol (a tombstone, so stale
    rumors cannot bring it back), not to users: they never saw it join.
    """
    if change.previous is None and change.state in (membership.DEAD, membership.LEFT):
        return None
    return {"node_id": change.node_id, "address": change.address, "state": change.state, "time": now}


def _record_from_spec(spec: dict[str, Any], class_key: str, payload: list[Any], demand: dict[str, float]) -> ActorRecord:
    record = ActorRecord(
        actor_id=ActorId(str(spec["actor_id"])),
        class_name=str(spec["class_name"]),
        class_key=class_key,
        meta_blob=bytes(payload[1]),
        args_frames=list(payload[2:]),
        spec=spec,
        owner=None,
        creator=ClientId(bytes(spec["creator_id"])),
        owner_address=str(spec["owner_address"]),
        name=spec.get("name"),
        namespace=str(spec["namespace"]),
        demand=demand,
        max_restarts=int(spec.get("max_restarts", 0)),
        waiting_since=time.monotonic(),
    )
    record.origin = str(spec.get("origin") or "")
    record.owner_node = "" if spec.get("detached") else str(spec.get("owner_node") or "")
    record.incarnation = int(spec.get("incarnation", 0))
    record.restarts = int(spec.get("restarts", 0))
    record.created_at = float(spec.get("created_at", 0.0))
    return record


def _stub_from_row(actor_id: ActorId, row: list[Any], node_id: str) -> ActorRecord:
    record = ActorRecord(
        actor_id=actor_id,
        class_name=str(row[_CLASS]),
        class_key="",
        meta_blob=row[_META] or b"",
        args_frames=[],
        spec={},
        owner=None,
        creator=ClientId(b""),
        owner_address="",
        name=row[_NAME],
        namespace=str(row[_NS]),
        demand={},
        max_restarts=-1 if row[_RESTARTABLE] else 0,
    )
    record.host = node_id if row[_STATE] != records.WAITING else None
    record.origin = str(row[_ORIGIN])
    record.incarnation = int(row[_INC])
    record.state = row[_STATE] if row[_STATE] in (records.ALIVE,) else records.STARTING
    record.address = row[_ADDRESS] if row[_STATE] == records.ALIVE else None
    record.created_at = float(row[_CREATED])
    return record


def _state_body(record: ActorRecord) -> dict[str, Any]:
    state, incarnation, address, error = record.public_state()
    return {
        "actor_id": record.actor_id,
        "state": state,
        "incarnation": incarnation,
        "address": address,
        "error": error,
        "restarts": record.restarts,
    }
