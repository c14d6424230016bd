"""Actors across the mesh: what this node tells the others, and what it does with what they tell it.

The facade over the mesh's actor components, which the daemon wires together:

- ``names.Names``: mesh-unique names (claims at each name's home, releases, lookups);
- ``placement.Placement``: where a creation runs, placements from others, keepers, drain;
- ``relay.Relay``: stubs of actors hosted elsewhere, kept in step with their host;
- ``deaths.Deaths``: kills, owners and hosts that die, fencing;
- ``view.MeshView``: what gossip shows of the other members.

This node's gossip entry carries its resources, the actors it hosts or waits to place
(one typed row each, ``records.ActorRow``), its client processes and recent exits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from zmesh.node.core import membership, records
from zmesh.node.core.departures import Departures
from zmesh.node.core.entry import EntryChange
from zmesh.node.core.records import Client
from zmesh.node.core.resources import Resources
from zmesh.node.core.table import ActorTable, Chores
from zmesh.node.mesh.deaths import Deaths
from zmesh.node.mesh.link import Mesh
from zmesh.node.mesh.names import Names
from zmesh.node.mesh.placement import Placement
from zmesh.node.mesh.relay import Relay
from zmesh.node.mesh.view import MeshView
from zmesh.transport import protocol
from zmesh.transport.ids import ClientId

logger = logging.getLogger(__name__)

AppHandler = Callable[[str, dict[str, Any], list[Any], "int | None"], None]


class MeshActors:
    def __init__(
        self,
        node_id: str,
        address: str,
        table: ActorTable,
        view: MeshView,
        mesh: Mesh,
        resources: Resources,
        departures: Departures,
        chores: Chores,
        names: Names,
        placement: Placement,
        relay: Relay,
        deaths: Deaths,
        clients: dict[ClientId, Client],
        send_to_client: Callable[[ClientId, list[Any]], bool],
    ) -> None:
        self._me = node_id
        self._address = address
        self._table = table
        self._view = view
        self._mesh = mesh
        self._resources = resources
        self._departures = departures
        self._chores = chores
        self.names = names
        self.placement = placement
        self.relay = relay
        self.deaths = deaths
        self._clients = clients
        self._send_to_client = send_to_client
        self._handlers: dict[str, AppHandler] = {
            "place": placement.on_place,
            "claim": names.on_claim,
            "release": lambda s, b, p, r: names.on_release(s, b, r),
            "lookup": lambda s, b, p, r: names.on_lookup(s, b, r),
            "find": lambda s, b, p, r: relay.on_find(s, b, r),
            "watch": lambda s, b, p, r: relay.on_watch(s, b),
            "state": lambda s, b, p, r: relay.on_state(s, b),
            "keep": lambda s, b, p, r: placement.on_keep(s, b, p),
            "kill": lambda s, b, p, r: deaths.on_kill(s, b),
            "peer_gone": lambda s, b, p, r: deaths.on_peer_gone(s, b),
            "drain": lambda s, b, p, r: placement.start_drain(),
        }

    # ------------------------------------------------------------------ what this node tells the mesh

    def entry(self) -> dict[str, Any]:
        return {
            "address": self._address,
            "total": dict(self._resources.total),
            "available": dict(self._resources.available),
            "draining": self.placement.draining,
            "actors": self._table.gossip_rows(),
            # Addresses and ids of our drivers and workers: how any member answers "is this process gone?".
            "clients": sorted(x for c in self._clients.values() if c.kind != "admin" for x in (c.address, c.client_id.hex())),
            "pending": [[r.actor_id, r.demand] for r in self._table.waiting()],
            "gone": self._departures.mine(),
        }

    # ------------------------------------------------------------------ what the mesh tells this node

    def on_member(self, change: membership.Changed) -> None:
        event = membership_event(change, time.time())
        if event is not None:
            frames = protocol.encode(protocol.MEMBERSHIP, (event["node_id"], event["address"], event["state"]))
            for client in list(self._clients.values()):
                if client.membership:
                    self._send_to_client(client.client_id, frames)
        if change.state in (membership.DEAD, membership.LEFT):
            self.deaths.member_gone(change.node_id, change.state.lower())
        elif change.previous not in (membership.ALIVE, membership.SUSPECT):
            self.names.member_came(change.node_id)
            # Its entry may have come while we held it dead (through a third member, after a partition healed):
            # the view dropped it then, and it may not change again for a long time. Read it whole now.
            self.on_entries([EntryChange(change.node_id, True)])
        self.placement.rechoose_keepers()
        self._chores.schedule = True

    def on_entries(self, changes: list[EntryChange]) -> None:
        live = set(self._mesh.live())
        touched: set[str] = set()
        for change in changes:
            node_id = change.node_id
            entry = self._mesh.gossip.entry(node_id)
            if node_id == self._me:
                continue
            if entry is None or node_id not in live:
                self._view.drop(node_id)
                continue
            # A delta names the rows it touched: only those are read again (a whole entry: all of them).
            rows = None if change.full else change.items.get("actors", frozenset())
            touched |= self._view.update(node_id, entry.data, rows)
            self._departures.remember(self._view.gone, time.monotonic())
        for actor_id in touched:
            record = self._table.get(actor_id)
            seen = self._view.actors.get(actor_id)
            if record is not None and seen is not None and record.host not in (None, self._me) and seen[0] == record.host:
                record.keepers = list(seen[1].keepers)  # who acts if that host dies, as the host last chose
        self.relay.follow(touched)
        self.deaths.fence_replaced(touched)
        self.names.resolve_conflicts(
            {(row.namespace, row.name) for a in touched if (seen := self._view.actors.get(a)) and (row := seen[1]).name is not None},
            time.monotonic(),
        )
        self._chores.schedule = True

    def register(self, kind: str, handler: AppHandler) -> None:
        """Another component's mesh message (tasks' leases): one more entry in the table."""
        if kind in self._handlers:
            raise ValueError(f"mesh message {kind!r} has a handler already")
        self._handlers[kind] = handler

    def on_app(self, sender: str, kind: str, body: dict[str, Any], payload: list[Any], rid: int | None) -> None:
        """An application message from another member; a malformed one raises and is dropped."""
        handler = self._handlers.get(kind)
        if handler is None:
            raise protocol.ProtocolError(f"unknown mesh message {kind[:40]!r}")
        handler(sender, body, payload, rid)

    def on_buried(self, incarnation: int) -> None:
        self.names.reset()
        self.deaths.buried(incarnation)

    # ------------------------------------------------------------------ queries

    def live(self) -> list[str]:
        return self._mesh.live()

    def send(self, node_id: str, kind: str, body: dict[str, Any]) -> bool:
        return self._mesh.send(node_id, kind, body)

    def gone_addresses(self, peers: Any) -> list[str]:
        """Which of these process addresses (or client ids in hex) belong to no live process of the mesh."""
        mine = {c.address for c in self._clients.values()} | {c.client_id.hex() for c in self._clients.values()}
        live = _Either(mine, self._view.clients)
        grace = max(3.0, 4 * self._mesh.config.sync_interval_s)
        return self._departures.gone(peers if isinstance(peers, list | tuple) else [], live, time.monotonic(), grace)

    def members(self) -> list[dict[str, Any]]:
        """Every member this node knows, itself first, as ``zmesh status`` shows them."""
        out = [_member_row(self._me, self._address, "ALIVE", self._mesh.membership.incarnation, self.entry())]
        for m in sorted(self._mesh.membership.members(), key=lambda m: m.node_id):
            entry = self._mesh.gossip.entry(m.node_id)
            out.append(_member_row(m.node_id, m.address, m.state, m.incarnation, entry.data if entry is not None else {}))
        return out

    def list_actors(self, namespace: str | None) -> list[dict[str, Any]]:
        """Every live actor of the mesh (from gossip, and this node's own)."""
        rows: dict[str, dict[str, Any]] = {}
        for actor_id, (node_id, row) in self._view.actors.items():
            rows[actor_id] = {
                "actor_id": actor_id, "class_name": row.class_name, "namespace": row.namespace, "name": row.name,
                "state": row.state, "node_id": node_id, "detached": row.detached,
            }  # fmt: skip
        for r in (*self._table.hosted(), *self._table.waiting()):
            if r.state != records.DEAD:
                rows[r.actor_id] = {
                    "actor_id": r.actor_id, "class_name": r.class_name, "namespace": r.namespace, "name": r.name,
                    "state": r.state, "node_id": r.host or self._me, "detached": r.detached(),
                }  # fmt: skip
        return [v for v in rows.values() if namespace is None or v["namespace"] == namespace]


class _Either:
    """Membership in either of two collections, without building their union on every question."""

    def __init__(self, first: Any, second: Any) -> None:
        self._first, self._second = first, second

    def __contains__(self, item: object) -> bool:
        return item in self._first or item in self._second


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


def membership_event(change: membership.Changed, now: float) -> dict[str, Any] | None:
    """What users see of a membership change (``zmesh.on_membership``), or None.

    The death of a node this one never knew is news to the protocol (a tombstone, so stale
    rumors cannot bring it back), not to users: they never saw it join.
    """
    if change.previous is None and change.state in (membership.DEAD, membership.LEFT):
        return None
    return {"node_id": change.node_id, "address": change.address, "state": change.state, "time": now}
