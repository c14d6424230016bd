"""Stubs: this node's records of actors hosted elsewhere, kept in step with their host for this node's clients.

A client here that holds a handle to an actor hosted on another member subscribes to
this node's *stub* of it. The stub *watches* the host (a ``watch`` message), which
relays every state change (``state``) to its watchers; gossip shows where an actor
went when its host died and a keeper created it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from zmesh.node.core import records
from zmesh.node.core.records import ActorRecord, ActorRow
from zmesh.node.core.registry import Card
from zmesh.node.core.table import ActorTable
from zmesh.node.hosted import HostedActors, state_body
from zmesh.node.mesh.link import Mesh
from zmesh.node.mesh.view import MeshView
from zmesh.transport.ids import FINAL_INCARNATION, ActorId, ClientId


class Relay:
    def __init__(self, node_id: str, table: ActorTable, view: MeshView, mesh: Mesh, hosted: HostedActors) -> None:
        self._me = node_id
        self._table = table
        self._view = view
        self._mesh = mesh
        self._hosted = hosted

    def watch(self, actor_id: str, client_id: ClientId | None) -> ActorRecord | None:
        """This node's record of ``actor_id`` (a stub made from gossip if need be), ``client_id`` subscribed."""
        record = self._table.get(actor_id)
        if record is None and (seen := self._view.actors.get(actor_id)) is not None:
            record = stub_from_row(ActorId(actor_id), seen[1], seen[0])
            self._table.add(record)
            self.send_watch(record)
        if record is not None and client_id is not None:
            self._table.subscribe(record, client_id)
        return record

    def adopt(self, actor_id: str, card: Card, client_id: ClientId | None) -> ActorRecord:
        """A stub of an actor known only by its card (from a name's home, before gossip shows it): watch its origin."""
        record = self.watch(actor_id, client_id)
        if record is not None:
            return record
        row = ActorRow(card.class_name, "", None, records.STARTING, None, 0, False, False, 0.0, card.meta, card.origin)
        record = stub_from_row(ActorId(actor_id), row, card.origin)
        self._table.set_host(record, None)
        self._table.add(record)
        if client_id is not None:
            self._table.subscribe(record, client_id)
        self.send_watch(record)
        return record

    def find(self, actor_id: str, done: Callable[[ActorRecord | None], None]) -> None:
        """Ask every member about an actor gossip has not shown here yet (a handle or a name that travelled faster).

        ``done`` gets this node's new stub of it, watching its host, or None when no member knows it.
        """
        known = self._table.get(actor_id)
        others = [m for m in self._mesh.live() if m != self._me]
        if known is not None or not others:
            done(known)
            return
        pending = {"left": len(others), "done": False}

        def on_reply(ok: bool, value: Any, _: list[Any]) -> None:
            if pending["done"]:
                return
            row = ActorRow.from_wire(value[1]) if ok and isinstance(value, list) and len(value) == 2 else None
            if row is not None and isinstance(value[0], str):
                pending["done"] = True
                record = self._table.get(actor_id)
                if record is None:
                    record = stub_from_row(ActorId(actor_id), row, value[0])
                    self._table.add(record)
                    self.send_watch(record)
                done(record)
                return
            pending["left"] -= 1
            if pending["left"] == 0:
                pending["done"] = True
                done(None)

        for node_id in others:
            self._mesh.request(node_id, "find", {"actor_id": actor_id}, [], on_reply, time.monotonic())

    def on_find(self, sender: str, body: dict[str, Any], rid: int | None) -> None:
        record = self._table.get(str(body["actor_id"]))
        found = None
        if record is not None and record.state != records.DEAD and record.host is not None:
            found = [record.host, record.row().wire()]
        if rid is not None:
            self._mesh.reply(sender, rid, True, found)

    def send_watch(self, record: ActorRecord) -> None:
        upstream = record.host if record.host is not None else record.origin
        if upstream and upstream != self._me:
            self._mesh.send(upstream, "watch", {"actor_id": record.actor_id})

    def on_watch(self, sender: str, body: dict[str, Any]) -> None:
        actor_id = str(body["actor_id"])
        record = self._table.get(actor_id)
        if record is None:
            error = f"actor {actor_id} is not known to node {self._me}"
            dead = {"actor_id": actor_id, "state": records.DEAD, "incarnation": FINAL_INCARNATION, "address": None, "error": error}
            self._mesh.send(sender, "state", dead)
            return
        record.watchers.add(sender)
        self._mesh.send(sender, "state", state_body(record))

    def on_state(self, sender: str, body: dict[str, Any]) -> None:
        record = self._table.get(str(body["actor_id"]))
        if record is None or record.host == self._me:
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
            self._hosted.mark_dead(record, str(body.get("error") or "the actor died"))
            return
        restarting = record.restarts or incarnation
        record.state = records.ALIVE if state == records.ALIVE else (records.RESTARTING if restarting else records.STARTING)
        self._hosted.notify(record)

    def follow(self, actor_ids: Iterable[str]) -> None:
        """Stubs whose host is gone: follow the copy gossip shows (a keeper created it again, or a drain moved it)."""
        live = set(self._mesh.live())
        for actor_id in actor_ids:
            record = self._table.get(actor_id)
            if record is None or record.state == records.DEAD or record.host == self._me or record.host in live:
                continue
            if record.host is None and record.state == records.WAITING:
                continue
            seen = self._view.actors.get(actor_id)
            if seen is not None and seen[1].incarnation >= record.incarnation and seen[1].state != records.WAITING:
                self._table.set_host(record, seen[0])
                record.keepers = list(seen[1].keepers)
                self.send_watch(record)


def stub_from_row(actor_id: ActorId, row: ActorRow, node_id: str) -> ActorRecord:
    """A record that mirrors an actor hosted on ``node_id`` (or waiting there for placement)."""
    record = ActorRecord(
        actor_id=actor_id,
        class_name=row.class_name,
        class_key="",
        meta_blob=row.meta or b"",
        args_frames=[],
        spec={},
        owner=None,
        creator=ClientId(b""),
        owner_address="",
        name=row.name,
        namespace=row.namespace,
        demand={},
        max_restarts=-1 if row.restartable else 0,
    )
    record.host = node_id if row.state != records.WAITING else None
    record.origin = row.origin
    record.incarnation = row.incarnation
    record.state = row.state if row.state == records.ALIVE else records.STARTING
    record.address = row.address if row.state == records.ALIVE else None
    record.created_at = row.created_at
    record.keepers = list(row.keepers)
    record.owner_node = "" if row.detached else row.origin
    return record
