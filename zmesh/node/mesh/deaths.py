"""What happens to actors when processes and nodes go: kills, owners exiting, hosts dying, and fencing.

- A kill goes to the actor's host; a non-restartable kill also buries this node's stub
  at once.
- An owner that exits takes its (non-detached) actors with it, wherever they run.
- A host that dies takes its actors with it; those with restarts left are created again
  by the first live keeper (``core.keepers``), and every other node follows the new
  copy through gossip.
- Fencing: an actor of ours that the mesh re-created elsewhere at a higher incarnation
  stops here; and when this node learns the mesh buried it (``membership.Buried``), it
  stops everything it hosted then, as Ray makes a node it declared dead exit: an actor
  the mesh declared dead never answers again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from zmesh.node.core import keepers, lifecycle, records
from zmesh.node.core.departures import Departures
from zmesh.node.core.records import ActorRecord, Client
from zmesh.node.core.table import ActorTable, Chores
from zmesh.node.hosted import HostedActors, SendToClient
from zmesh.node.mesh.link import Mesh
from zmesh.node.mesh.placement import Placement
from zmesh.node.mesh.relay import Relay
from zmesh.node.mesh.view import MeshView
from zmesh.transport import protocol
from zmesh.transport.ids import ClientId

logger = logging.getLogger(__name__)


class Deaths:
    def __init__(
        self,
        node_id: str,
        table: ActorTable,
        view: MeshView,
        mesh: Mesh,
        hosted: HostedActors,
        relay: Relay,
        placement: Placement,
        departures: Departures,
        chores: Chores,
        clients: dict[ClientId, Client],
        send_to_client: SendToClient,
    ) -> None:
        self._me = node_id
        self._table = table
        self._view = view
        self._mesh = mesh
        self._hosted = hosted
        self._relay = relay
        self._placement = placement
        self._departures = departures
        self._chores = chores
        self._clients = clients
        self._send_to_client = send_to_client

    # ------------------------------------------------------------------ kills

    def kill(self, record: ActorRecord, why: str, *, no_restart: bool) -> None:
        """Kill an actor, wherever it runs."""
        if record.host == self._me or (record.host is None and record.state == records.WAITING):
            self._hosted.kill(record, why, no_restart=no_restart)
            return
        if record.host is not None:
            self._mesh.send(record.host, "kill", {"actor_id": record.actor_id, "no_restart": no_restart, "why": why})
        if no_restart:
            self._hosted.mark_dead(record, f"actor {record.class_name} ({record.actor_id}) is dead: {why}")
        elif record.state in (records.WAITING, records.PLACING):
            decision = lifecycle.killed(record, why, no_restart=False)  # not started anywhere yet: decided here
            if isinstance(decision, lifecycle.Bury):
                self._hosted.mark_dead(record, decision.reason)

    def on_kill(self, sender: str, body: dict[str, Any]) -> None:
        record = self._table.get(str(body["actor_id"]))
        if record is not None:
            self.kill(record, str(body.get("why") or "it was killed with zmesh.kill()")[:500], no_restart=bool(body.get("no_restart")))

    # ------------------------------------------------------------------ processes that exit

    def client_gone(self, client: Client, why: str) -> None:
        """A driver or worker of this node exited: what it owned dies, and the hosts of what it created hear of it."""
        self._departures.remember([client.address, client.client_id.hex()], time.monotonic(), mine=True)
        self._tell_creations_of(client.address)
        owned, created = self._table.client_gone(client.client_id)
        hosts = {str(r.host) for r in created if r.host not in (None, self._me)}
        for record in owned:
            if record.state != records.DEAD:
                self.kill(record, f"its owner ({client.kind} pid {client.pid}) {why}", no_restart=True)
        for host in hosts:
            self._mesh.send(host, "peer_gone", {"address": client.address})
        self._chores.publish = True

    def on_peer_gone(self, sender: str, body: dict[str, Any]) -> None:
        """A client of ``sender`` exited: kill the actors it owned here, tell workers it created."""
        address = str(body["address"])
        self._departures.remember([address], time.monotonic())
        for record in self._table.hosted():
            owned = record.owner_address == address and record.owner_node and not record.spec.get("detached")
            if owned and record.state != records.DEAD:
                self._hosted.kill(record, f"its owner ({address.partition('|')[0]}) exited", no_restart=True)
        self._tell_creations_of(address)

    def _tell_creations_of(self, address: str) -> None:
        pids = {r.pid for r in self._table.hosted() if r.owner_address == address and r.state != records.DEAD and r.pid}
        if not pids:
            return
        frames = protocol.encode(protocol.PEER_GONE, (address,))
        for other in self._clients.values():
            if other.kind == "worker" and other.pid in pids:
                self._send_to_client(other.client_id, frames)

    # ------------------------------------------------------------------ nodes that die

    def member_gone(self, node_id: str, how: str) -> None:
        """``node_id`` died or left (``how``): its clients are gone, its actors die or come back elsewhere."""
        self._departures.remember([a for a, owner in self._view.clients.items() if owner == node_id], time.monotonic())
        self._view.drop(node_id)
        live = set(self._mesh.live())
        for record in self._table.values():
            if record.state == records.DEAD:
                continue
            if record.host == self._me:
                if record.owner_node == node_id and not record.spec.get("detached"):
                    self._hosted.kill(record, f"its owner's node {node_id} {how}", no_restart=True)
                record.watchers.discard(node_id)
                continue
            if record.host == node_id or (record.host is None and record.origin == node_id and record.state != records.WAITING):
                self._host_died(record, node_id, how, live)
            elif record.host is None and record.state == records.RESTARTING and node_id in record.keepers:
                self._keeper_died(record, live)

    def _host_died(self, record: ActorRecord, node_id: str, how: str, live: set[str]) -> None:
        seen = self._view.actors.get(record.actor_id)
        if seen is not None and seen[0] != node_id and seen[0] in live and seen[1].state != records.WAITING:
            self._table.set_host(record, seen[0])  # it had moved already (a drain): follow it
            self._relay.send_watch(record)
            return
        acting = keepers.recreator(record.keepers, live) if record.keepers else (record.origin if record.origin in live else None)
        holds_creation = bool(record.class_key) and record.class_key in self._table.classes
        decision = lifecycle.host_died(record, node_id, how, keeper=acting == self._me and holds_creation)
        if isinstance(decision, lifecycle.Bury):
            self._hosted.mark_dead(record, decision.reason)
        elif isinstance(decision, lifecycle.Replace):
            logger.info("actor %s (%s): its node %s %s; creating it again elsewhere", record.class_name, record.actor_id, node_id, how)
            # The origin stands in when no keeper list reached it: a rank no keeper has, so its copy never shares an incarnation.
            rank = record.keepers.index(self._me) if self._me in record.keepers else keepers.STRIDE - 1
            record.restarts += 1
            record.incarnation = keepers.next_incarnation(record.incarnation, rank)
            record.address = None
            record.state = records.WAITING
            record.tried.clear()
            record.keepers = []
            self._placement.enqueue(record)
            self._hosted.notify(record)
        elif isinstance(decision, lifecycle.Restart):
            lifecycle.next_incarnation(record, records.RESTARTING)  # a keeper creates it; gossip shows where
            self._table.set_host(record, None)
            self._hosted.notify(record)

    def _keeper_died(self, record: ActorRecord, live: set[str]) -> None:
        """The keeper that was to create ``record`` again died too (two nodes lost together): the next one acts."""
        if keepers.recreator(record.keepers, live) != self._me or not (record.class_key and record.class_key in self._table.classes):
            return
        logger.info(
            "actor %s (%s): its host and the keepers before this node are gone; creating it again", record.class_name, record.actor_id
        )
        # Its restart was counted when its host died; the incarnation still rises, above any copy a dead keeper made.
        record.incarnation = keepers.next_incarnation(record.incarnation, record.keepers.index(self._me))
        record.state = records.WAITING
        record.tried.clear()
        record.keepers = []
        self._placement.enqueue(record)
        self._hosted.notify(record)

    # ------------------------------------------------------------------ fencing

    def fence_replaced(self, actor_ids: Iterable[str]) -> None:
        """Actors of ours that the mesh re-created elsewhere while it thought this node dead: the higher copy is the actor."""
        live = set(self._mesh.live())
        for actor_id in actor_ids:
            record = self._table.get(actor_id)
            if record is None or record.host != self._me or record.state == records.DEAD:
                continue
            seen = self._view.actors.get(actor_id)
            if seen is None or seen[0] == self._me or seen[0] not in live or seen[1].state == records.WAITING:
                continue
            if seen[1].incarnation <= record.incarnation:
                continue
            logger.warning(
                "actor %s (%s) was re-created on node %s while this node was unreachable; stopping the copy here",
                record.class_name, record.actor_id, seen[0],
            )  # fmt: skip
            self._hosted.stop_here(record)
            self._table.set_host(record, seen[0])
            record.incarnation = seen[1].incarnation
            record.state = records.STARTING
            record.address = None
            self._relay.send_watch(record)
            self._hosted.notify(record)

    def buried(self, incarnation: int) -> None:
        """The mesh declared this node dead at ``incarnation``: stop every actor it hosted then.

        Restartable ones come back where their keepers create them (this node follows them);
        the others are dead, as every other node already told their callers.
        """
        stopped = []
        for record in self._table.hosted():
            if record.state == records.DEAD or record.node_incarnation > incarnation:
                continue
            why = f"its node {self._me} was declared dead by the mesh (it stalled or was cut off) and its actors with it"
            if not record.can_restart():
                self._hosted.kill(record, why, no_restart=True)
                continue
            self._hosted.stop_here(record)
            lifecycle.next_incarnation(record, records.RESTARTING)
            self._table.set_host(record, None)
            self._hosted.notify(record)
            stopped.append(record.actor_id)
        if stopped:
            logger.warning("zmesh node %s: the mesh declared this node dead; stopped %d actors it hosted", self._me, len(stopped))
        self._relay.follow(stopped)
        self._chores.publish = True
