"""The actor protocol of ``zmesh/node/mesh/actors.py`` as a model per node, every decision taken by a pure core.

- Names: a named creation claims its name at ``registry.home_of(name, live)``; the home's ``Claims`` grants it
  or answers ``Taken(holder, card)`` (a ``get_if_exists`` caller then gets the holder); a home that is new for
  a name adopts what gossip shows (``known``). A stopped actor's name is released at its home (a message that
  may be lost: every node also ``prune``s claims gossip has not shown for ``PRUNE_GRACE_S``). Two holders that
  meet in gossip after a split: ``pick_winner`` keeps the name, the other drops it.
- Placement: ``scheduler.place`` over the gossip view; the target reserves (``Resources``) or refuses, and a
  refusal is tried elsewhere. A placement whose answer is lost is asked again of the same target until it
  answers or dies, so one creation is never placed twice at one incarnation.
- Keepers: a restartable actor's host sends its creation to ``keepers_of(...)``, again when members come and
  go; when the host dies, ``recreator(keepers, live)`` places it again with ``next_incarnation(current, rank)``.
  A copy that sees a higher incarnation of itself in gossip stops (fencing).
- Burial: on membership's ``Buried(incarnation)`` the node stops what it hosted at a node incarnation at or
  below it, and releases their names.

Gossip entries carry each node's resources and its actors as ``ActorRow`` wires.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sim import ledger as lg
from sim.network import CONFIG, SimNode
from sim.records import NS, Hosted, Kept, Spec, View, Waiting, resolve
from zmesh.node.core import keepers, registry, scheduler
from zmesh.node.core.membership import Changed
from zmesh.node.core.records import ALIVE, WAITING, ActorRow
from zmesh.node.core.resources import Reservation, Resources

PRUNE_GRACE_S = 3 * CONFIG.sync_interval_s  # a granted name's trip through gossip, with room for a lost push
RETRY_S = 0.5  # how often a waiting creation is decided again with no news
KILL_RETRY_S = CONFIG.sync_interval_s  # a kill is sent again while gossip still shows the actor
# A keeper that has not re-created an orphan (its copy of the creation was lost) for this long per rank is passed over.
ESCALATE_S = 2 * CONFIG.sync_interval_s


class ActorLayer:
    """One node's actor layer: its hosted actors, the creations it waits to place, the ones it keeps, its claims."""

    def __init__(self, node: SimNode, total: dict[str, float], ledger: lg.Ledger) -> None:
        self.node = node
        self.me = node.id
        self.ledger = ledger
        self.resources = Resources(total)
        self.claims = registry.Claims()
        self.hosted: dict[str, Hosted] = {}
        self.waiting: dict[str, Waiting] = {}
        self.kept: dict[str, Kept] = {}
        self.killed: set[str] = set()  # kills seen here: a late placement or keep of these is refused
        self.kills: dict[str, float] = {}  # kills this node's callers asked for: actor id -> next retry
        self.next_prune = node.now + CONFIG.sync_interval_s
        self.schedule_at = math.inf
        self.asked_keep: dict[str, float] = {}  # actor id -> when we last asked its host for its creation
        self._decoded: dict[tuple[str, int, int], dict[str, ActorRow]] = {}

    # ------------------------------------------------------------------ what gossip carries

    def entry(self) -> dict[str, Any]:
        return {
            "total": dict(self.resources.total),
            "available": dict(self.resources.available),
            "actors": {a: r.wire() for a, r in self.own_rows().items()},
            # Kills seen here, as the shell gossips the processes that exited ("gone"): a kill message lost, or a
            # keep that waited in a frozen node's socket, cannot bring a killed actor back.
            "killed": sorted(self.killed),
        }

    def own_rows(self) -> dict[str, ActorRow]:
        rows = {a: w.spec.row(WAITING, self.me) for a, w in self.waiting.items()}
        rows.update({a: h.spec.row(ALIVE, h.spec.origin) for a, h in self.hosted.items()})
        return rows

    def view(self) -> View:
        by_node: dict[str, dict[str, ActorRow]] = {self.me: self.own_rows()}
        for node_id in self.node.live()[1:]:
            entry = self.node.gossip.entry(node_id)
            if entry is None:
                continue
            key = (node_id, entry.incarnation, entry.version)
            rows = self._decoded.get(key)
            if rows is None:
                rows = {}
                for actor_id, wire in (entry.data.get("actors") or {}).items():
                    row = ActorRow.from_wire(wire)
                    if row is not None:
                        rows[actor_id] = row
                self._decoded = {k: v for k, v in self._decoded.items() if k[0] != node_id}
                self._decoded[key] = rows
            by_node[node_id] = rows
        return resolve(by_node)

    def lookup(self, name: str) -> str | None:
        holder = self.view().names.get((NS, name))
        return holder.actor_id if holder is not None else None

    def holds(self, actor_id: str) -> bool:
        return actor_id in self.hosted or actor_id in self.waiting or actor_id in self.kept

    def _let_go(self, actor_id: str, reason: str) -> None:
        self.ledger.let_go(self.me, actor_id, reason, self.holds(actor_id), self.node.now)

    def _hold(self, actor_id: str) -> None:
        self.ledger.hold(self.me, actor_id)

    # ------------------------------------------------------------------ callers

    def create(self, spec: Spec, get_if_exists: bool, ticket: lg.Ticket) -> None:
        now = self.node.now
        key = spec.key
        if key is None:
            self._accept(spec)
            ticket.answer("granted", spec.actor_id, now)
            return

        def decide(verdict: registry.Granted | registry.Taken) -> None:
            if isinstance(verdict, registry.Granted):
                self._accept(spec)
                ticket.answer("granted", spec.actor_id, self.node.now)
            else:
                ticket.answer("resolved" if get_if_exists else "exists", verdict.holder.actor_id, self.node.now)

        holder = registry.Holder(spec.actor_id, spec.created_at)
        card = registry.Card("Actor", self.me, b"")
        home = registry.home_of(key, self.node.live())
        if home == self.me:
            decide(self._claim(key, holder, card))
            return

        def on_reply(ok: bool, value: Any) -> None:
            if ok:
                decide(value)
            else:
                ticket.answer("failed", None, self.node.now)

        assert home is not None
        self.node.request(home, "claim", (key, holder, card), on_reply)

    def kill(self, actor_id: str, origin: str) -> None:
        self.kills[actor_id] = self.node.now + KILL_RETRY_S
        self._send_kill(actor_id, origin)

    def _send_kill(self, actor_id: str, origin: str | None) -> bool:
        """To every live node that lists the actor (its host, or its origin while it waits); False if none does."""
        targets = [n for n, rows in sorted(self.view().by_node.items()) if actor_id in rows]
        if not targets and origin is not None:
            targets = [origin]
        for target in targets:
            if target == self.me:
                self._on_kill(actor_id)
            else:
                self.node.send(target, "kill", actor_id)
        return bool(targets)

    # ------------------------------------------------------------------ names, as the home

    def _claim(self, key: registry.Name, holder: registry.Holder, card: registry.Card) -> registry.Granted | registry.Taken:
        known = self.view().names.get(key)
        return self.claims.claim(key, holder, known, self.node.now, card)

    def _release(self, key: registry.Name, actor_id: str) -> None:
        home = registry.home_of(key, self.node.live())
        if home == self.me:
            self.claims.release(key, actor_id)
        elif home is not None:
            self.node.send(home, "release", (key, actor_id))

    # ------------------------------------------------------------------ placement

    def _accept(self, spec: Spec) -> None:
        self.waiting[spec.actor_id] = Waiting(spec, self.node.now)
        self._hold(spec.actor_id)
        self.node.publish()
        self.schedule_at = self.node.now

    def _node_views(self) -> list[scheduler.NodeView]:
        views = [scheduler.NodeView(self.me, self.resources.total, self.resources.available, len(self.hosted))]
        for node_id in self.node.live()[1:]:
            entry = self.node.gossip.entry(node_id)
            if entry is not None and isinstance(entry.data.get("total"), dict):
                data = entry.data
                views.append(scheduler.NodeView(node_id, data["total"], data["available"], len(data.get("actors") or ())))
        return views

    def _schedule(self) -> None:
        now = self.node.now
        self.schedule_at = math.inf
        members = {m.node_id: m.state for m in self.node.membership.members()}
        for actor_id, w in list(self.waiting.items()):
            if w.placing is not None or self.waiting.get(actor_id) is not w:
                continue
            if w.retry_at > now:
                self.schedule_at = min(self.schedule_at, w.retry_at)
                continue
            for _ in range(8):
                decision = scheduler.place(
                    w.spec.demand, w.spec.strategy, self.me, self._node_views(), w.tried, None, members, now - w.since
                )
                if isinstance(decision, scheduler.Place) and decision.node_id == self.me:
                    reservation = self.resources.try_reserve(dict(w.spec.demand))
                    if reservation is None:
                        w.tried.add(self.me)
                        continue
                    del self.waiting[actor_id]
                    self._start(w.spec, reservation)
                    self._let_go(actor_id, lg.PLACED)
                elif isinstance(decision, scheduler.Place):
                    self._offer(w, decision.node_id)
                elif isinstance(decision, scheduler.Wait):
                    w.tried.clear()
                    w.retry_at = now + min(RETRY_S, decision.until if decision.until is not None else RETRY_S)
                    self.schedule_at = min(self.schedule_at, w.retry_at)
                else:
                    del self.waiting[actor_id]
                    _, target, _ = scheduler.parse_strategy(w.spec.strategy)
                    state = self.node.state_of(target) if target is not None else None
                    self.ledger.failures.append(lg.Failure(actor_id, self.me, decision.reason, w.spec.strategy, now - w.since, now, state))
                    if w.spec.key is not None:
                        self._release(w.spec.key, actor_id)
                    self._let_go(actor_id, lg.FAILED)
                    self.node.publish()
                break
            else:
                w.retry_at = now + RETRY_S  # every choice refused at once: decide again later
                self.schedule_at = min(self.schedule_at, w.retry_at)

    def _offer(self, w: Waiting, target: str) -> None:
        actor_id = w.spec.actor_id
        w.placing = target

        def on_reply(ok: bool, value: Any) -> None:
            if self.waiting.get(actor_id) is not w or w.placing != target:
                return  # killed meanwhile
            if ok and value is True:
                del self.waiting[actor_id]
                self._let_go(actor_id, lg.PLACED)
                self.node.publish()
                return
            if ok and value == lg.KILLED:
                self._on_kill(actor_id)
                return
            if ok or self.node.state_of(target) in (None, "DEAD", "LEFT"):
                w.tried.add(target)  # refused, or gone: whatever it took died with it
                w.placing = None
                self.schedule_at = self.node.now
                return
            self._offer(w, target)  # no answer: ask the same target again, it may have taken it

        self.node.request(target, "place", w.spec, on_reply)

    def _start(self, spec: Spec, reservation: Reservation) -> None:
        chosen = tuple(keepers.keepers_of(spec.actor_id, self.node.live(), self.me)) if spec.restartable else ()
        spec = dataclasses.replace(spec, keepers=chosen)
        self.hosted[spec.actor_id] = Hosted(spec, self.node.membership.incarnation, reservation)
        self._hold(spec.actor_id)
        self.ledger.started.append((self.node.now, self.me, spec.actor_id, spec.incarnation, self.node.membership.incarnation))
        for keeper in chosen:
            self.node.send(keeper, "keep", (spec, self.me))
        self.node.publish()

    def _stop(self, actor_id: str, reason: str, *, release_name: bool) -> None:
        hosted = self.hosted.pop(actor_id)
        self.resources.release(hosted.reservation)
        key = hosted.spec.key
        if release_name and key is not None:
            self._release(key, actor_id)
        if reason == lg.KILLED:
            for keeper in hosted.spec.keepers:
                self.node.send(keeper, "kill", actor_id)
        self._let_go(actor_id, reason)
        self.node.publish()
        self.schedule_at = self.node.now

    # ------------------------------------------------------------------ messages from other nodes

    def on_app(self, sender: str, kind: str, body: Any, rid: int | None) -> None:
        if kind == "claim":
            key, holder, card = body
            verdict = self._claim(key, holder, card)
            if rid is not None:
                self.node.reply(sender, rid, True, verdict)
        elif kind == "release":
            self.claims.release(*body)
        elif kind == "place":
            value = self._on_place(body)
            if rid is not None:
                self.node.reply(sender, rid, True, value)
        elif kind == "keep":
            self._on_keep(*body)
        elif kind == "want_keep":
            hosted = self.hosted.get(body)
            if hosted is not None and sender in hosted.spec.keepers:
                self.node.send(sender, "keep", (hosted.spec, self.me))
        elif kind == "unkeep":
            self._on_unkeep(sender, *body)
        elif kind == "kill":
            self._on_kill(body)

    def _on_place(self, spec: Spec) -> Any:
        actor_id = spec.actor_id
        if actor_id in self.killed:
            return lg.KILLED
        hosted = self.hosted.get(actor_id)
        if hosted is not None and hosted.spec.incarnation >= spec.incarnation:
            return True  # a retry of a placement taken
        reservation = self.resources.try_reserve(dict(spec.demand))
        if reservation is None:
            self.node.publish()  # our entry in the sender's view was stale
            return "no room"
        if hosted is not None:
            self._stop(actor_id, lg.SUPERSEDED, release_name=False)
        self._start(spec, reservation)
        return True

    def _on_keep(self, spec: Spec, host: str) -> None:
        actor_id = spec.actor_id
        kept = self.kept.get(actor_id)
        if actor_id in self.killed or actor_id in self.hosted or (kept is not None and kept.spec.incarnation > spec.incarnation):
            return
        self.kept[actor_id] = Kept(spec, host, kept is not None and kept.seen and kept.host == host)
        self._hold(actor_id)
        if host not in self.node.live():
            self._recreate_orphans()  # the host died before its creation reached us

    def _on_unkeep(self, sender: str, actor_id: str, incarnation: int) -> None:
        kept = self.kept.get(actor_id)
        if kept is not None and kept.host == sender and kept.spec.incarnation <= incarnation:
            del self.kept[actor_id]  # the host chose other keepers
            self._let_go(actor_id, lg.MOVED)

    def _on_kill(self, actor_id: str) -> None:
        if actor_id not in self.killed:
            self.killed.add(actor_id)
            self.ledger.kill_done.setdefault(actor_id, self.node.now)
            self.node.publish()
        if actor_id in self.hosted:
            self._stop(actor_id, lg.KILLED, release_name=True)
        waiting = self.waiting.pop(actor_id, None)
        if waiting is not None:
            if waiting.placing is not None:
                self.node.send(waiting.placing, "kill", actor_id)
            if waiting.spec.key is not None:
                self._release(waiting.spec.key, actor_id)
            self._let_go(actor_id, lg.KILLED)
            self.node.publish()
        if self.kept.pop(actor_id, None) is not None:
            self._let_go(actor_id, lg.KILLED)

    # ------------------------------------------------------------------ what membership and gossip tell this node

    def on_member(self, change: Changed) -> None:
        live = self.node.live()
        for hosted in self.hosted.values():
            # Keepers are chosen again when one dies or a member joins: the list is the rendezvous order of the live.
            if not hosted.spec.restartable:
                continue
            chosen = tuple(keepers.keepers_of(hosted.spec.actor_id, live, self.me))
            if chosen != hosted.spec.keepers:
                for dropped in sorted(set(hosted.spec.keepers) - set(chosen)):
                    self.node.send(dropped, "unkeep", (hosted.spec.actor_id, hosted.spec.incarnation))
                hosted.spec = dataclasses.replace(hosted.spec, keepers=chosen)
                for keeper in chosen:
                    self.node.send(keeper, "keep", (hosted.spec, self.me))
                self.node.publish()
        self._recreate_orphans()
        self.schedule_at = self.node.now

    def _recreate_orphans(self) -> None:
        """Creations whose host died: the first live keeper makes them again, the others follow through gossip.

        A keeper ahead of us that does not show the actor again within ``ESCALATE_S`` per rank may never have
        received the creation (its keep was lost with the host): it is passed over, so the next one acts.
        """
        now = self.node.now
        live = self.node.live()
        view = self.view()
        for actor_id, kept in list(self.kept.items()):
            if kept.host in live:
                kept.orphaned_at = None
                continue
            seen = view.actors.get(actor_id)
            if seen is not None and seen[0] in live and seen[1].incarnation > kept.spec.incarnation:
                del self.kept[actor_id]  # another keeper made it again already: follow it through gossip
                self._let_go(actor_id, lg.SUPERSEDED)
                continue
            if kept.orphaned_at is None:
                kept.orphaned_at = now
            waited = now - kept.orphaned_at
            candidates = [k for rank, k in enumerate(kept.spec.keepers) if k == self.me or waited < ESCALATE_S * (rank + 1)]
            if keepers.recreator(candidates, live) != self.me:
                continue
            rank = kept.spec.keepers.index(self.me)
            spec = dataclasses.replace(
                kept.spec, incarnation=keepers.next_incarnation(kept.spec.incarnation, rank), keepers=(), origin=self.me
            )
            del self.kept[actor_id]
            self._accept(spec)
            self._let_go(actor_id, lg.RECREATING)

    def on_buried(self, incarnation: int) -> None:
        for actor_id, hosted in list(self.hosted.items()):
            if hosted.node_incarnation <= incarnation:
                self.ledger.buried_stops.add(actor_id)
                self._stop(actor_id, lg.BURIED, release_name=True)

    def on_entries(self) -> None:
        for node_id in self.node.live()[1:]:
            entry = self.node.gossip.entry(node_id)
            killed = entry.data.get("killed") if entry is not None else None
            for actor_id in killed or ():
                if actor_id not in self.killed:
                    self._on_kill(actor_id)
        view = self.view()
        live = set(self.node.live())
        for actor_id, hosted in list(self.hosted.items()):
            seen = view.actors.get(actor_id)
            if seen is not None and seen[0] != self.me and seen[1].state != WAITING and seen[1].incarnation > hosted.spec.incarnation:
                self._stop(actor_id, lg.SUPERSEDED, release_name=False)  # fenced: the higher incarnation is the actor
        records: list[Hosted | Waiting] = [*self.hosted.values(), *self.waiting.values()]
        for record in records:
            key = record.spec.key
            winner = view.names.get(key) if key is not None else None
            if key is not None and winner is not None and winner.actor_id != record.spec.actor_id:
                record.spec = dataclasses.replace(record.spec, name=None)  # both sides of a split granted it: the younger loses it
                self._release(key, record.spec.actor_id)
                self.node.publish()
        self._pull_creations(view)
        for actor_id, kept in list(self.kept.items()):
            rows = view.by_node.get(kept.host)
            seen = view.actors.get(actor_id)
            if seen is not None and seen[0] in live and seen[1].incarnation > kept.spec.incarnation and seen[1].state != WAITING:
                if self.me not in seen[1].keepers:
                    del self.kept[actor_id]  # it lives on at a higher incarnation, kept by others
                    self._let_go(actor_id, lg.SUPERSEDED)
            elif rows is not None and actor_id in rows:
                kept.seen = True
            elif rows is not None and kept.seen:
                del self.kept[actor_id]  # its host, alive, lists it no more: stopped there
                self._let_go(actor_id, lg.GONE)
        self.schedule_at = self.node.now

    def _pull_creations(self, view: View) -> None:
        """A host's row names us a keeper of a creation we do not hold (its keep was lost): ask for it."""
        now = self.node.now
        for node_id, rows in sorted(view.by_node.items()):
            for actor_id, row in rows.items():
                if node_id == self.me or row.state == WAITING or self.me not in row.keepers or actor_id in self.killed:
                    continue
                kept = self.kept.get(actor_id)
                if kept is not None and kept.host == node_id and kept.spec.incarnation >= row.incarnation:
                    continue
                if now - self.asked_keep.get(actor_id, -math.inf) >= CONFIG.sync_interval_s:
                    self.asked_keep[actor_id] = now
                    self.node.send(node_id, "want_keep", actor_id)

    # ------------------------------------------------------------------ time

    def tick(self) -> None:
        now = self.node.now
        if now >= self.next_prune:
            self.next_prune = now + CONFIG.sync_interval_s
            view = self.view()
            self.claims.prune(view.names, now, PRUNE_GRACE_S)
            self._pull_creations(view)
            if any(k.host not in self.node.live() for k in self.kept.values()):
                self._recreate_orphans()
        for actor_id, retry_at in list(self.kills.items()):
            if now >= retry_at:
                if self._send_kill(actor_id, None):
                    self.kills[actor_id] = now + KILL_RETRY_S
                else:
                    del self.kills[actor_id]
        if now >= self.schedule_at:
            self._schedule()

    def next_deadline(self) -> float:
        return min(self.next_prune, self.schedule_at, *self.kills.values()) if self.kills else min(self.next_prune, self.schedule_at)
