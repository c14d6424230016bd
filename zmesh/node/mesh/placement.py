"""Where actors run: placing waiting creations on members, taking placements from others, and keepers.

The decisions are ``core.scheduler``'s (which member) and ``core.keepers``' (who else
holds a restartable actor's creation); this component carries them out. A creation
waits here (at its origin) until a member fits; the chosen member reserves or refuses
(a refusal means try the next), so a stale gossip view costs a round trip, never an
over-booking. A placement pass builds the members' view once, however many creations
wait, and counts what it placed as it goes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from zmesh.node.config import NodeConfig
from zmesh.node.core import keepers, lifecycle, records, scheduler
from zmesh.node.core.records import ActorRecord
from zmesh.node.core.resources import Resources
from zmesh.node.core.table import ActorTable, Chores
from zmesh.node.hosted import HostedActors
from zmesh.node.mesh.link import Mesh
from zmesh.node.mesh.relay import Relay
from zmesh.node.mesh.view import MeshView
from zmesh.transport.ids import ActorId, ClientId

logger = logging.getLogger(__name__)


class Placement:
    def __init__(
        self,
        node_id: str,
        config: NodeConfig,
        table: ActorTable,
        view: MeshView,
        mesh: Mesh,
        hosted: HostedActors,
        relay: Relay,
        resources: Resources,
        chores: Chores,
    ) -> None:
        self._me = node_id
        self._config = config
        self._table = table
        self._view = view
        self._mesh = mesh
        self._hosted = hosted
        self._relay = relay
        self._resources = resources
        self._chores = chores
        self._placed_recently: dict[str, set[str]] = {}  # node id -> actors we placed there that its entry lacks yet
        self.draining = False

    # ------------------------------------------------------------------ waiting creations

    def accept(self, record: ActorRecord) -> None:
        """A creation this node took (its origin): it waits here until placed."""
        self._table.add(record)
        self._table.set_name(record)
        self.enqueue(record)

    def enqueue(self, record: ActorRecord) -> None:
        record.waiting_since = time.monotonic()
        self._table.set_host(record, None)
        self._table.wait(record)
        self._chores.schedule = True
        self._chores.publish = True

    def schedule(self, now: float) -> None:
        waiting = self._table.waiting()
        if not waiting:
            return
        view = self.node_views()
        members = {m.node_id: m.state for m in self._mesh.membership.members()}
        recent = {n: len(ids) for n, ids in self._placed_recently.items()}
        for record in waiting:
            if record.state != records.WAITING:
                self._table.unwait(record)
                continue
            decision = scheduler.place(
                record.demand, record.spec.get("strategy"), self._me, view, record.tried, recent,
                members, now - record.waiting_since, self._config.affinity_wait_s,
            )  # fmt: skip
            if isinstance(decision, scheduler.Fail):
                self._table.unwait(record)
                self._hosted.mark_dead(record, f"actor {record.class_name} ({record.actor_id}) cannot be placed: {decision.reason}")
            elif isinstance(decision, scheduler.Wait):
                if decision.until is not None:
                    self._chores.schedule_by(now + decision.until)
                if decision.infeasible and not record.warned:
                    record.warned = True
                    logger.warning(
                        "actor %s (%s) needs %s but no member has that much in all; it waits until a node that fits joins",
                        record.class_name, record.actor_id, record.demand,
                    )  # fmt: skip
                record.tried.clear()
            elif decision.node_id == self._me:
                if self._start_here(record):
                    view[0] = scheduler.NodeView(
                        self._me, self._resources.total, dict(self._resources.available), view[0].actors + 1, self.draining
                    )
                else:
                    record.tried.add(self._me)
            else:
                self._offer(record, decision.node_id)
                recent[decision.node_id] = recent.get(decision.node_id, 0) + 1

    def _start_here(self, record: ActorRecord) -> bool:
        reservation = self._resources.try_reserve(record.demand)
        if reservation is None:
            return False
        self._table.unwait(record)
        record.reservation = reservation
        record.state = records.STARTING if record.restarts == 0 else records.RESTARTING
        self._table.set_host(record, self._me)
        self._hosted.spawn(record)
        self.choose_keepers(record)
        self._chores.publish = True
        return True

    def check_waiting(self, now: float) -> None:
        """Warn once about each creation that has waited long for resources."""
        for record in self._table.waiting():
            if not record.warned and now - record.waiting_since > self._config.infeasible_warning_s:
                record.warned = True
                logger.warning(
                    "actor %s (%s) has waited %.0f s for resources %s (available now: %s)",
                    record.class_name, record.actor_id, now - record.waiting_since, record.demand, self._resources.available,
                )  # fmt: skip

    def node_views(self) -> list[scheduler.NodeView]:
        me = scheduler.NodeView(self._me, self._resources.total, dict(self._resources.available), self._table.hosted_count(), self.draining)
        views = [me]
        live = set(self._mesh.live())
        for node_id, entry in self._mesh.gossip.entries().items():
            if node_id == self._me or node_id not in live:
                continue
            data = entry.data
            actors = data.get("actors") or {}
            placed = self._placed_recently.get(node_id)
            if placed:
                placed.difference_update([a for a in placed if a in actors])
            total, available = data.get("total"), data.get("available")
            if isinstance(total, dict) and isinstance(available, dict):
                views.append(scheduler.NodeView(node_id, total, available, len(actors), bool(data.get("draining"))))
        return views

    # ------------------------------------------------------------------ offering to other members

    def _offer(self, record: ActorRecord, target: str) -> None:
        """Ask ``target`` to host ``record``; it reserves or refuses (then the next member is tried)."""
        self._table.unwait(record)
        record.state = records.PLACING
        self._table.set_host(record, target)
        self._placed_recently.setdefault(target, set()).add(record.actor_id)
        body = {"spec": self.wire_spec(record), "class_key": record.class_key}
        payload = [self._table.classes.get(record.class_key, b""), record.meta_blob, *record.args_frames]

        def on_reply(ok: bool, value: Any, _: list[Any]) -> None:
            if not (ok and value is True):
                self._placed_recently.get(target, set()).discard(record.actor_id)
            if record.state != records.PLACING or record.host != target:
                return  # killed meanwhile (the kill went to the target too)
            if ok and value is True:
                record.state = records.STARTING if record.restarts == 0 else records.RESTARTING
                record.tried.clear()
                self._chores.publish = True
                return
            logger.info("actor %s (%s): node %s did not take it (%s); trying another", record.class_name, record.actor_id, target, value)
            record.tried.add(target)
            record.state = records.WAITING
            self._table.set_host(record, None)
            self._table.wait(record)
            self._chores.schedule = True

        self._mesh.request(target, "place", body, payload, on_reply, time.monotonic())
        self._chores.publish = True

    def wire_spec(self, record: ActorRecord) -> dict[str, Any]:
        return {
            **record.spec,
            "owner_address": record.owner_address,
            "creator_id": bytes(record.creator),
            "origin": record.origin,
            "owner_node": record.owner_node,
            "detached": record.detached(),
            "incarnation": record.incarnation,
            "restarts": record.restarts,
            "created_at": record.created_at,
            "keepers": list(record.keepers),
        }

    def on_place(self, sender: str, body: dict[str, Any], payload: list[Any], rid: int | None) -> None:
        spec, class_key = body["spec"], str(body["class_key"])
        actor_id = ActorId(str(spec["actor_id"]))

        def reply(ok: bool, value: Any) -> None:
            if rid is not None:
                self._mesh.reply(sender, rid, ok, value)

        if self.draining or self._mesh.leaving:
            reply(True, "this node is draining")
            return
        if len(payload) < 2:
            raise ValueError("a placement without class and metadata")
        existing = self._table.get(actor_id)
        if existing is not None and existing.host == self._me and existing.state != records.DEAD:
            reply(True, True)  # a retry of a placement we took
            return
        demand = {str(k): float(v) for k, v in spec["resources"].items()}
        reservation = self._resources.try_reserve(demand)
        if reservation is None:
            reply(True, f"no room for {demand} (available {self._resources.available})")
            self._chores.publish = True  # our entry in the sender's view was stale: refresh it
            return
        if payload[0]:
            self._table.classes[class_key] = bytes(payload[0])
        elif class_key not in self._table.classes:
            self._resources.release(reservation)
            reply(True, "the class was not sent")
            return
        record = record_from_spec(spec, class_key, payload, demand)
        record.reservation = reservation
        record.state = records.STARTING if record.restarts == 0 else records.RESTARTING
        record.watchers.add(sender)
        record.host = self._me
        self._table.add(record)
        self._table.set_name(record)
        self._hosted.spawn(record)
        self.choose_keepers(record)
        self._chores.publish = True
        reply(True, True)

    # ------------------------------------------------------------------ keepers

    def choose_keepers(self, record: ActorRecord) -> None:
        """Hand a restartable actor's creation to its keepers; again to all of them whenever the list changes."""
        if record.host != self._me or not record.can_restart():
            record.keepers = []
            return
        chosen = keepers.keepers_of(record.actor_id, self._mesh.live(), self._me, self._config.keepers)
        if chosen == record.keepers:
            return
        record.keepers = chosen
        body = {"spec": self.wire_spec(record), "class_key": record.class_key}
        payload = [self._table.classes.get(record.class_key, b""), record.meta_blob, *record.args_frames]
        for node_id in chosen:
            self._mesh.send(node_id, "keep", body, payload)
        self._chores.publish = True

    def rechoose_keepers(self) -> None:
        """Members came or went: every restartable actor hosted here gets the keepers of the new membership."""
        for record in self._table.hosted():
            if record.state != records.DEAD:
                self.choose_keepers(record)

    def on_keep(self, sender: str, body: dict[str, Any], payload: list[Any]) -> None:
        spec, class_key = body["spec"], str(body["class_key"])
        if len(payload) < 2:
            raise ValueError("a keep without class and metadata")
        if payload[0]:
            self._table.classes[class_key] = bytes(payload[0])
        demand = {str(k): float(v) for k, v in spec["resources"].items()}
        existing = self._table.get(ActorId(str(spec["actor_id"])))
        if existing is not None and existing.host == self._me:
            return  # a late keep from a host this actor left for us
        fresh = record_from_spec(spec, class_key, payload, demand)
        if existing is None:
            fresh.state = records.ALIVE
            fresh.host = sender
            self._table.add(fresh)
            self._relay.send_watch(fresh)  # in step with its host from now on, for clients that come to it here
            return
        # Our record of it (a stub, or the origin's) now holds the creation too: updated in place, since
        # callbacks of requests in flight (a placement's answer) hold this very record.
        existing.class_key, existing.spec, existing.args_frames = class_key, fresh.spec, fresh.args_frames
        existing.meta_blob, existing.keepers, existing.max_restarts = fresh.meta_blob, fresh.keepers, fresh.max_restarts
        existing.demand, existing.origin, existing.owner_address = fresh.demand, fresh.origin, fresh.owner_address
        existing.incarnation = max(existing.incarnation, fresh.incarnation)
        existing.restarts = max(existing.restarts, fresh.restarts)
        if existing.host != sender and (existing.host is None or existing.state != records.PLACING):
            self._table.set_host(existing, sender)
            self._relay.send_watch(existing)

    # ------------------------------------------------------------------ draining

    def start_drain(self) -> None:
        """Take no more creations, move the restartable actors to other members, then leave."""
        if self.draining:
            return
        logger.info("zmesh node %s: draining", self._me)
        self.draining = True
        for record in self._table.hosted():
            if record.state == records.DEAD or not record.can_restart():
                continue
            self._hosted.stop_here(record)
            self._hosted_moves(record)
        self._chores.publish = True
        self._chores.schedule = True

    def _hosted_moves(self, record: ActorRecord) -> None:
        lifecycle.next_incarnation(record, records.WAITING)
        record.tried = {self._me}
        self.enqueue(record)
        self._hosted.notify(record)

    def drained(self) -> bool:
        """Every actor that could move has a new host: time to leave."""
        return self.draining and not any(r.state in (records.WAITING, records.PLACING) for r in self._table.values())


def record_from_spec(spec: dict[str, Any], class_key: str, payload: list[Any], demand: dict[str, float]) -> ActorRecord:
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
    keeping = spec.get("keepers") or []
    record.keepers = [str(k) for k in keeping][:16] if isinstance(keeping, list) else []
    return record
