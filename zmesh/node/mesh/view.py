"""What gossip shows of the other members' actors, names and processes, kept up to date one entry at a time.

A member's entry changes often (every creation, start and death on it); rebuilding the
whole mesh's view on each change cost a scan of every actor of every member, which a
burst of thousands of creations turned into seconds of a stalled node loop. Here an
entry's update touches only what changed in it: its rows are compared with the ones
it had, and only the actors and names whose rows changed are decided again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from zmesh.node.core import registry
from zmesh.node.core.records import WAITING, ActorRow


class MeshView:
    """The other live members' actors (the best row of each), names (one winner each) and client processes."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, ActorRow]] = {}  # node id -> its actors' rows
        self._raw: dict[str, dict[str, Any]] = {}  # node id -> its rows as they came, to spot changes cheaply
        self._listed: dict[str, dict[str, ActorRow]] = {}  # actor id -> node id -> row (an actor moving is listed twice)
        self._named: dict[registry.Name, dict[str, tuple[registry.Holder, str]]] = {}  # name -> actor id -> (holder, node)
        self.actors: dict[str, tuple[str, ActorRow]] = {}  # actor id -> (node listing it, its best row)
        self.names: dict[registry.Name, tuple[registry.Holder, str]] = {}  # name -> (winning holder, node listing it)
        self._clients: dict[str, list[str]] = {}
        self.clients: dict[str, str] = {}  # process address or client id (hex) -> its node
        self.gone: list[str] = []  # processes other members said exited lately (the caller keeps them)

    def update(self, node_id: str, data: Mapping[str, Any], touched: Iterable[str] | None = None) -> set[str]:
        """``node_id``'s entry is now ``data``; the ids of the actors whose rows changed.

        ``touched``: the only rows that may have changed (a gossip delta's); None: compare them all.
        """
        raw = data.get("actors")
        raw = raw if isinstance(raw, dict) else {}
        before = self._raw.setdefault(node_id, {})
        rows = self._rows.setdefault(node_id, {})
        if touched is None:
            changed = [a for a, wire in raw.items() if before.get(a) != wire] + [a for a in before if a not in raw]
        else:
            changed = [a for a in touched if raw.get(a) != before.get(a)]
        for actor_id in changed:
            rows.pop(actor_id, None)
            row = ActorRow.from_wire(raw.get(actor_id)) if actor_id in raw else None
            if row is not None and isinstance(actor_id, str):
                rows[actor_id] = row
            self._relist(actor_id, node_id, row)
            if actor_id in raw:
                before[actor_id] = raw[actor_id]
            else:
                before.pop(actor_id, None)
        self._set_clients(node_id, data.get("clients") or [])
        self.gone = [a for a in data.get("gone") or () if isinstance(a, str)]
        return {a for a in changed if isinstance(a, str)}

    def drop(self, node_id: str) -> set[str]:
        """``node_id`` died or left: nothing it listed counts any more. The ids of the actors it listed."""
        dropped = set(self._rows.pop(node_id, {}))
        for actor_id in dropped:
            self._relist(actor_id, node_id, None)
        self._raw.pop(node_id, None)
        self._set_clients(node_id, [])
        return dropped

    def nodes(self) -> list[str]:
        return list(self._raw)

    # ------------------------------------------------------------------ internals

    def _relist(self, actor_id: str, node_id: str, row: ActorRow | None) -> None:
        listed = self._listed.setdefault(actor_id, {})
        old = listed.pop(node_id, None)
        if row is not None:
            listed[node_id] = row
        best = _best(listed)
        if best is None:
            self._listed.pop(actor_id, None)
            self.actors.pop(actor_id, None)
        else:
            self.actors[actor_id] = best
        for gone_or_new in (old, row):
            if gone_or_new is not None and gone_or_new.name is not None:
                self._rename((gone_or_new.namespace, gone_or_new.name), actor_id)

    def _rename(self, key: registry.Name, actor_id: str) -> None:
        holders = self._named.setdefault(key, {})
        best = self.actors.get(actor_id)
        if best is not None and best[1].name is not None and (best[1].namespace, best[1].name) == key:
            holders[actor_id] = (registry.Holder(actor_id, best[1].created_at), best[0])
        else:
            holders.pop(actor_id, None)
        if not holders:
            self._named.pop(key, None)
            self.names.pop(key, None)
            return
        winner = registry.pick_winner(h for h, _ in holders.values())
        self.names[key] = holders[winner.actor_id]

    def _set_clients(self, node_id: str, addresses: Iterable[Any]) -> None:
        for address in self._clients.pop(node_id, []):
            if self.clients.get(address) == node_id:
                del self.clients[address]
        mine = [a for a in addresses if isinstance(a, str)]
        if mine:
            self._clients[node_id] = mine
            for address in mine:
                self.clients[address] = node_id


def _best(listed: Mapping[str, ActorRow]) -> tuple[str, ActorRow] | None:
    """Of the nodes listing one actor, the one that speaks for it: the highest incarnation, a host before a waiting origin."""
    best: tuple[str, ActorRow] | None = None
    for node_id, row in listed.items():
        if best is None or (row.incarnation, row.state != WAITING, node_id) > (best[1].incarnation, best[1].state != WAITING, best[0]):
            best = (node_id, row)
    return best
