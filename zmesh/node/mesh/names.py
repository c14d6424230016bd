"""Mesh-unique actor names: claims at each name's home, releases, lookups, and one holder after a heal.

The decisions are ``core.registry``'s (homes by rendezvous hashing, ``Claims``); this
component carries the messages:

- A named creation claims its name at the name's home (``claim``); the answer is
  granted, or the holder with its *card* (class, origin, metadata), so that a
  ``get_if_exists`` caller gets a handle to the one actor even before gossip shows it.
- An actor's death releases its name at the home (``release``), from every node that
  learns of it; ``zmesh.kill`` answers only once the home has freed the name, so
  creating the name again right after works, as in Ray. A release lost with its sender
  is made up for by ``Claims.prune``.
- Two live holders of one name (granted on both sides of a partition) meet in gossip:
  the older keeps the name, the younger loses it and lives on for its handles.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from zmesh.node.config import NodeConfig
from zmesh.node.core import records, registry
from zmesh.node.core.records import ActorRecord
from zmesh.node.core.registry import Card, Granted, Holder, Taken
from zmesh.node.core.table import ActorTable, Chores
from zmesh.node.mesh.link import Mesh
from zmesh.node.mesh.relay import Relay
from zmesh.node.mesh.view import MeshView

logger = logging.getLogger(__name__)

Verdict = Granted | Taken
_MAX_RECENT_RELEASES = 10_000
_RELEASE_AGAIN_S = 60.0
Found = tuple[str, str, bytes, str]  # (actor id, class name, metadata, node to watch it at)


class Names:
    def __init__(
        self, node_id: str, config: NodeConfig, table: ActorTable, view: MeshView, mesh: Mesh, relay: Relay, chores: Chores
    ) -> None:
        self._me = node_id
        self._config = config
        self._table = table
        self._view = view
        self._mesh = mesh
        self._relay = relay
        self._chores = chores
        self.claims = registry.Claims()
        self._next_prune = 0.0
        self._conflicts: dict[registry.Name, float] = {}  # names two live actors hold: since when
        # Names released lately: told again to the name's home whenever members come back, since the home
        # that should hear it may have been out of reach (a node buried while cut off releases alone).
        self._released: dict[registry.Name, tuple[str, float]] = {}

    def home(self, key: registry.Name) -> str:
        home = registry.home_of(key, self._mesh.live())
        assert home is not None  # this node is always live
        return home

    # ------------------------------------------------------------------ claiming

    def claim(self, record: ActorRecord, decided: Callable[[Verdict | str], None]) -> None:
        """Claim ``record``'s name at its home; ``decided`` gets the verdict, or why the home could not be asked."""
        assert record.name is not None
        key = (record.namespace, record.name)
        card = Card(record.class_name, self._me, record.meta_blob)
        home = self.home(key)
        if home == self._me:
            decided(self.claim_here(key, Holder(record.actor_id, record.created_at), card))
            return
        body = {"ns": record.namespace, "name": record.name, "actor_id": record.actor_id, "created_at": record.created_at}
        body["class_name"] = record.class_name

        def on_reply(ok: bool, value: Any, payload: list[Any]) -> None:
            verdict = _verdict(value, payload) if ok else None
            decided(verdict if verdict is not None else f"could not claim the name {record.name!r} at node {home}: {value}")

        self._mesh.request(home, "claim", body, [record.meta_blob], on_reply, time.monotonic())

    def claim_here(self, key: registry.Name, holder: Holder, card: Card | None) -> Verdict:
        """As the name's home: grant it, or say who holds it (with its card when any member knows it)."""
        known = None
        local = self._table.named(key)
        if local is not None and local.state != records.DEAD:
            known = Holder(local.actor_id, local.created_at)
        elif (seen := self._view.names.get(key)) is not None:
            known = seen[0]
        verdict = self.claims.claim(key, holder, known, time.monotonic(), card)
        if isinstance(verdict, Taken) and verdict.card is None:
            verdict = Taken(verdict.holder, self.card_of(verdict.holder.actor_id))
        return verdict

    def card_of(self, actor_id: str) -> Card | None:
        record = self._table.get(actor_id)
        if record is not None and record.state != records.DEAD:
            return Card(record.class_name, record.host or record.origin or self._me, record.meta_blob)
        seen = self._view.actors.get(actor_id)
        if seen is not None and seen[1].meta is not None:
            return Card(seen[1].class_name, seen[0], seen[1].meta)
        return None

    def on_claim(self, sender: str, body: dict[str, Any], payload: list[Any], rid: int | None) -> None:
        key = (str(body["ns"]), str(body["name"]))
        card = Card(str(body.get("class_name") or ""), sender, bytes(payload[0])) if payload else None
        verdict = self.claim_here(key, Holder(str(body["actor_id"]), float(body["created_at"])), card)
        if rid is None:
            return
        if isinstance(verdict, Granted):
            self._mesh.reply(sender, rid, True, None)
            return
        holder, card = verdict.holder, verdict.card
        value = [holder.actor_id, holder.created_at, card.class_name if card else None, card.origin if card else None]
        self._mesh.reply(sender, rid, True, value, [card.meta] if card else [])

    # ------------------------------------------------------------------ releasing

    def released(self, record: ActorRecord, then: Callable[[], None] | None = None) -> None:
        """``record`` died: its name is free here and at its home; ``then`` runs once the home has freed it."""
        if record.name is None:
            if then is not None:
                then()
            return
        key = (record.namespace, record.name)
        self._table.drop_name(record)
        self.claims.release(key, record.actor_id)
        self._released.pop(key, None)
        self._released[key] = (record.actor_id, time.monotonic())
        while len(self._released) > _MAX_RECENT_RELEASES:
            del self._released[next(iter(self._released))]
        home = self.home(key)
        if home == self._me:
            if then is not None:
                then()
            return
        body = {"ns": record.namespace, "name": record.name, "actor_id": record.actor_id}
        if then is None:
            self._mesh.send(home, "release", body)
        else:
            self._mesh.request(home, "release", body, [], lambda ok, value, payload: then(), time.monotonic())

    def member_came(self, node_id: str) -> None:
        """A member joined or came back: the releases of the last minute whose home it is now are told to it."""
        now = time.monotonic()
        for key, (actor_id, when) in list(self._released.items()):
            if now - when > _RELEASE_AGAIN_S:
                del self._released[key]
            elif self.home(key) == node_id:
                self._mesh.send(node_id, "release", {"ns": key[0], "name": key[1], "actor_id": actor_id})

    def on_release(self, sender: str, body: dict[str, Any], rid: int | None) -> None:
        self.claims.release((str(body["ns"]), str(body["name"])), str(body["actor_id"]))
        if rid is not None:
            self._mesh.reply(sender, rid, True, None)

    def tick(self, now: float) -> None:
        """Free the claims whose actor gossip stopped showing (its release was lost with its sender); settle conflicts."""
        if self._conflicts:
            self.resolve_conflicts(list(self._conflicts), now)
        if now < self._next_prune or not len(self.claims):
            return
        self._next_prune = now + self._config.sync_interval_s
        live = {key: holder for key, (holder, _) in self._view.names.items()}
        for key, actor_id in self._table.names().items():
            record = self._table.get(actor_id)
            if record is not None and record.state != records.DEAD:
                live[key] = Holder(actor_id, record.created_at)
        for key in self.claims.prune(live, now, self._config.name_grace_s):
            logger.info("zmesh node: the name %r in namespace %r is free: no member has shown its actor for a while", key[1], key[0])

    def reset(self) -> None:
        """This node was buried: another home decided its names meanwhile; gossip tells us the holders again."""
        self.claims = registry.Claims()

    # ------------------------------------------------------------------ lookups

    def find_local(self, key: registry.Name) -> Found | None:
        """A live actor with that name, from this node's records or gossip."""
        record = self._table.named(key)
        if record is not None and record.state != records.DEAD:
            return (record.actor_id, record.class_name, record.meta_blob, record.host or self._me)
        seen = self._view.names.get(key)
        if seen is not None and (listed := self._view.actors.get(seen[0].actor_id)) is not None:
            row = listed[1]
            if row.state != records.DEAD and row.meta is not None:
                return (seen[0].actor_id, row.class_name, row.meta, listed[0])
        return None

    def lookup(self, key: registry.Name, done: Callable[[Found | None], None]) -> None:
        """Find the holder: here, else at the name's home (which knows names it granted before gossip shows them)."""
        found = self.find_local(key)
        if found is not None:
            done(found)
            return
        home = self.home(key)
        if home == self._me:
            holder = self.claims.holder(key)
            card = self.claims.card(key)
            done((holder.actor_id, card.class_name, card.meta, card.origin) if holder and card and card.class_name else None)
            return

        def on_reply(ok: bool, value: Any, payload: list[Any]) -> None:
            valid = ok and isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value) and payload
            done((value[0], value[1], bytes(payload[0]), value[2]) if valid else None)

        self._mesh.request(home, "lookup", {"ns": key[0], "name": key[1]}, [], on_reply, time.monotonic())

    def on_lookup(self, sender: str, body: dict[str, Any], rid: int | None) -> None:
        key = (str(body["ns"]), str(body["name"]))
        found = self.find_local(key)
        if found is None and (holder := self.claims.holder(key)) is not None:
            card = self.claims.card(key) or self.card_of(holder.actor_id)
            if card is not None and card.class_name:
                found = (holder.actor_id, card.class_name, card.meta, card.origin)
        if rid is not None:
            if found is None:
                self._mesh.reply(sender, rid, True, None)
            else:
                self._mesh.reply(sender, rid, True, [found[0], found[1], found[3]], [found[2]])

    # ------------------------------------------------------------------ after a heal

    def resolve_conflicts(self, keys: Iterable[registry.Name], now: float) -> None:
        """Two live actors with one name (granted on both sides of a partition): the younger loses the name.

        Only a conflict that lasts: a node that rejoins after a stall shows its old entry for a moment,
        before it learns that the mesh buried what it lists, and that must not cost a live actor its name.
        """
        for key in keys:
            record = self._table.named(key)
            seen = self._view.names.get(key)
            if record is None or record.host != self._me or seen is None or seen[0].actor_id == record.actor_id:
                self._conflicts.pop(key, None)
                continue
            mine = Holder(record.actor_id, record.created_at)
            if registry.pick_winner([mine, seen[0]]) == mine:
                self._conflicts.pop(key, None)
                continue
            since = self._conflicts.setdefault(key, now)
            if now - since >= self._config.name_conflict_s:
                del self._conflicts[key]
                logger.warning(
                    "actor %s (%s) loses the name %r in namespace %r to actor %s: both were created while the mesh was split; "
                    "it keeps running for the handles that reach it",
                    record.class_name, record.actor_id, key[1], key[0], seen[0].actor_id,
                )  # fmt: skip
                self._table.drop_name(record)
                record.name = None
                self._chores.publish = True


def _verdict(value: Any, payload: list[Any]) -> Verdict | None:
    """The home's answer to a claim; None when it is not one."""
    if value is None:
        return Granted()
    if not (isinstance(value, list) and len(value) == 4 and isinstance(value[0], str) and isinstance(value[1], int | float)):
        return None
    card = None
    if isinstance(value[2], str) and isinstance(value[3], str) and payload:
        card = Card(value[2], value[3], bytes(payload[0]))
    return Taken(Holder(value[0], float(value[1])), card)
