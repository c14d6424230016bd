"""What the mesh promises (docs: DESIGN.md, "Invariants the mesh keeps"), checked after every simulated step.

The mesh is *calm* when no fault is in progress, none happened for ``SETTLE_S``, and every awake node sees
exactly the awake nodes as live; it has *converged* when it is calm and every node holds every other's
latest entry. Then:

- (a) names: no name has two live holders (hosting or waiting to place it), every node resolves a name to
  the same actor, and no node's claims name another holder than the one gossip shows;
- (b) a name killed while calm is free everywhere within ``KILL_FREE_S``: no node runs, waits for or shows
  the actor, and no node's claims hold the name for it;
- (c) the creators and ``get_if_exists`` callers of one name, asked and answered while calm and with no
  kill of its holder in between, all got one actor;
- (d) a restartable actor whose node died (one or two nodes together, while calm) runs again at a higher
  incarnation within ``RESTART_AFTER_DETECTION_S`` of the last node's detection, when a member has room;
- (e) no actor runs twice, no creation was dropped by a live node without a reason that ends it, none waits
  while a member has room, and an actor the mesh declared dead (its node buried) never runs again;
- (f) a placement fails only when it could never be met: hard affinity to an awake member that fits it, and
  that the origin does not believe dead, does not fail before the scheduler's wait is over.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING, Any

from sim.actor_layer import PRUNE_GRACE_S
from sim.ledger import Ticket
from sim.network import CONFIG
from sim.records import NS, live_copies
from zmesh.node.core import registry, scheduler

if TYPE_CHECKING:
    from sim.history import World

SETTLE_S = 8.0
KILL_FREE_S = 2 * CONFIG.sync_interval_s
RESTART_AFTER_DETECTION_S = 1.0
STUCK_S = 5.0  # a creation waiting this long while a member has room is stuck


# Bugs of the pure cores this checker found (see the report and the xfail tests); a tolerant checker counts
# what matches their signature exactly instead of failing, so drawn histories can go on finding new ones.
UNHEARD_BURIAL = "unheard-burial"  # a node others declared DEAD never learns it (it refuted a suspicion first)
MINORITY_BURIAL = "minority-burial"  # any one member's DEAD buries a node, so restartable actors nobody re-created stop
KNOWN_BUGS = (UNHEARD_BURIAL, MINORITY_BURIAL)


class Violation(AssertionError):
    """An invariant broke; the message says which, and the world's log says what led there."""


@dataclasses.dataclass
class _DeathCheck:
    victims: list[str]
    at: float
    actors: dict[str, int]  # actor id -> its incarnation when its node died
    strategy: dict[str, Any]


class Checker:
    def __init__(self, world: World, tolerate: tuple[str, ...] = ()) -> None:
        self.world = world
        self.tolerate = tolerate
        self.excused: set[tuple[str, str, str]] = set()  # (known bug, node, actor) met and tolerated
        self.kill_checks: list[tuple[str, str | None, float]] = []  # (actor, name, killed at)
        self.death_checks: list[_DeathCheck] = []
        self.asked_calm: dict[int, bool] = {}  # id(ticket) -> calm when asked
        self.epochs: dict[str, tuple[float, set[str]]] = {}  # name -> (epoch start, actors answered in it)
        self.kill_fence: dict[str, float] = {}  # name -> when its killed holder's name is surely free
        self.seen_failures = 0
        self.seen_answers = 0
        self.counts: collections.Counter[str] = collections.Counter()  # how often each invariant was checked

    def fail(self, what: str) -> None:
        world = self.world
        tail = "\n".join(world.log[-40:])
        raise Violation(f"at {world.now:.2f} s: {what}\n--- the history so far (last 40 lines) ---\n{tail}")

    # ------------------------------------------------------------------ states of the mesh

    def calm(self) -> bool:
        world, net = self.world, self.world.net
        if net.sides or net.faults.active() or any(n.frozen for n in net.alive()):
            return False
        if world.now - world.disturbed_at < SETTLE_S:
            return False
        awake = sorted(world.awake())
        return all(sorted(net.nodes[n].live()) == awake for n in awake)

    def converged(self) -> bool:
        if not self.calm():
            return False
        net = self.world.net
        nodes = [net.nodes[n] for n in self.world.awake()]
        latest = {n.id: n.gossip.entry(n.id) for n in nodes}
        for node in nodes:
            for other in nodes:
                mine, theirs = node.gossip.entry(other.id), latest[other.id]
                if mine is None or theirs is None or mine.key() != theirs.key():
                    return False
        return all(not n.dirty for n in nodes)

    # ------------------------------------------------------------------ what the history tells the checker

    def asked(self, ticket: Ticket) -> None:
        self.asked_calm[id(ticket)] = self.calm()

    def killed(self, actor_id: str, name: str | None) -> None:
        if self.calm():
            self.kill_checks.append((actor_id, name, self.world.now))
        if name is not None:
            self.kill_fence[name] = self.world.now + KILL_FREE_S

    def deaths(self, victims: list[str]) -> None:
        if not self.calm():
            return
        world = self.world
        actors: dict[str, int] = {}
        strategy: dict[str, Any] = {}
        for node in victims:
            for actor_id, hosted in world.layer(node).hosted.items():
                if hosted.spec.restartable and actor_id not in world.ledger.kills:
                    actors[actor_id] = hosted.spec.incarnation
                    strategy[actor_id] = hosted.spec.strategy
        if actors:
            self.death_checks.append(_DeathCheck(victims, world.now, actors, strategy))

    def looked_up(self, name: str, found: dict[str, str | None]) -> None:
        if self.converged() and len(set(found.values())) > 1:
            self.fail(f"(a) nodes resolve the name {name!r} to different actors: {found}")

    # ------------------------------------------------------------------ checks

    def check(self) -> None:
        self._answers()
        self._failures()
        self._kills()
        self._restarts()
        if self.converged():
            self.counts["a,e"] += 1
            self._names()
            self._copies()

    def final(self) -> None:
        """After the history has settled: the mesh must have converged, and everything must hold there."""
        if not self.converged():
            self.fail("(e) the mesh did not converge after every fault ended")
        self.check()

    def _answers(self) -> None:
        world = self.world
        tickets = world.ledger.tickets
        for ticket in tickets[self.seen_answers :]:
            if ticket.outcome is None:
                break
            self.seen_answers += 1
            if ticket.name is None or ticket.outcome == "failed" or ticket.actor is None:
                continue
            if not (self.asked_calm.get(id(ticket)) and self.calm()) or world.disturbed_at > ticket.asked_at:
                continue
            # An epoch of a name ends with any fault, and with a kill of its holder (plus the time its release takes).
            boundary = max(world.disturbed_at, self.kill_fence.get(ticket.name, -1.0))
            if ticket.asked_at < boundary:
                continue
            start, actors = self.epochs.get(ticket.name, (-1.0, set()))
            if start != boundary:
                actors = set()
            actors.add(ticket.actor)
            self.counts["c"] += 1
            self.epochs[ticket.name] = (boundary, actors)
            if len(actors) > 1:
                self.fail(f"(c) callers creating the name {ticket.name!r} got different actors: {sorted(actors)} (last: {ticket})")

    def _failures(self) -> None:
        world = self.world
        for failure in world.ledger.failures[self.seen_failures :]:
            self.seen_failures += 1
            kind, target, soft = scheduler.parse_strategy(failure.strategy)
            self.counts["f"] += 1
            if kind != scheduler.AFFINITY or soft or target not in world.awake():
                continue
            # Failing at once is right for a member the origin's membership has as dead (even wrongly: that is
            # membership's call); not for one it does not know yet, which may be joining.
            believed_dead = failure.target_state in ("DEAD", "LEFT")
            fits = scheduler.fits({"CPU": 1.0}, world.layer(target).resources.total)
            if not believed_dead and fits and failure.waited_s < scheduler.AFFINITY_WAIT_S:
                self.fail(
                    f"(f) a creation with hard affinity to the awake member {target} failed after {failure.waited_s:.2f} s: {failure}"
                )

    def _kills(self) -> None:
        world = self.world
        for check in list(self.kill_checks):
            actor_id, name, at = check
            if world.disturbed_at > at:
                self.kill_checks.remove(check)
                continue
            if world.now < at + KILL_FREE_S:
                continue
            self.kill_checks.remove(check)
            self.counts["b"] += 1
            for node in world.awake():
                layer = world.layer(node)
                if layer.holds(actor_id):
                    self.fail(f"(b) actor {actor_id}, killed at {at:.2f} s, is still held by {node}")
                if actor_id in layer.view().actors:
                    self.fail(f"(b) actor {actor_id}, killed at {at:.2f} s, still shows in {node}'s view")
            if name is not None:
                holder = world.layer(self._home((NS, name))).claims.holder((NS, name))
                if holder is not None and holder.actor_id == actor_id:
                    self.fail(f"(b) the name {name!r} of actor {actor_id}, killed at {at:.2f} s, is still claimed for it at its home")

    def _restarts(self) -> None:
        world, net = self.world, self.world.net
        for check in list(self.death_checks):
            if world.disturbed_at > check.at + 1e-9:
                self.death_checks.remove(check)
                continue
            awake = world.awake()
            seen = [net.declared.get((observer, victim)) for observer in awake for victim in check.victims]
            if any(t is None or t < check.at for t in seen):
                continue  # not every live node has detected the deaths yet
            detected = max(t for t in seen if t is not None)
            if world.now < detected + RESTART_AFTER_DETECTION_S:
                continue
            self.death_checks.remove(check)
            self.counts["d"] += len(check.actors)
            copies = live_copies(world.layer(n) for n in awake)
            for actor_id, incarnation in check.actors.items():
                if actor_id in world.ledger.kills or any(inc > incarnation for _, inc in copies.get(actor_id, [])):
                    continue
                room = self._room_for(check.strategy[actor_id])
                if room:
                    self.fail(
                        f"(d) restartable actor {actor_id} (incarnation {incarnation}) did not run again within "
                        f"{RESTART_AFTER_DETECTION_S} s of the detection of {check.victims} dying at {check.at:.2f} s "
                        f"(detected by all at {detected:.2f} s; room on {room}; copies now {copies.get(actor_id)})"
                    )

    def _names(self) -> None:
        world = self.world
        awake = world.awake()
        layers = [world.layer(n) for n in awake]
        holders: dict[str, set[str]] = {}
        for layer in layers:
            for actor_id, spec in [*((a, h.spec) for a, h in layer.hosted.items()), *((a, w.spec) for a, w in layer.waiting.items())]:
                if spec.name is not None:
                    holders.setdefault(spec.name, set()).add(actor_id)
        for name, actors in sorted(holders.items()):
            if len(actors) > 1:
                self.fail(f"(a) the name {name!r} has {len(actors)} live holders: {sorted(actors)}")
        views = {layer.me: layer.view().names for layer in layers}
        asked = {(NS, t.name) for t in world.ledger.tickets if t.name is not None}
        names = sorted({key for v in views.values() for key in v} | {(NS, n) for n in holders} | asked)
        for key in names:
            resolved = {node: (v[key].actor_id if key in v else None) for node, v in views.items()}
            if len(set(resolved.values())) > 1:
                self.fail(f"(a) nodes resolve the name {key[1]!r} to different actors: {resolved}")
            winner = next(iter(resolved.values()), None)
            # The home's claim: one whose actor gossip does not show yet is in flight (or pruned soon); one for
            # another actor than gossip's would be handed to the next get_if_exists caller. (Former homes may
            # keep a claim until it is pruned: they decide nothing while they are not the home.)
            claimed = world.layer(self._home(key)).claims.holder(key)
            if claimed is not None and winner is not None and claimed.actor_id != winner:
                self.fail(f"(a) the home {self._home(key)} claims the name {key[1]!r} for {claimed.actor_id} while gossip shows {winner}")
            if claimed is not None and winner is None and self._stale(claimed.actor_id):
                self.fail(f"(a) the home {self._home(key)} claims the name {key[1]!r} for {claimed.actor_id}, which no node holds")

    def _stale(self, actor_id: str) -> bool:
        """No node holds the actor, and its claim has had the time of a prune since its creation was asked."""
        world = self.world
        asked = [t.asked_at for t in world.ledger.tickets if t.actor_id == actor_id]
        if not asked or world.now - asked[0] < PRUNE_GRACE_S + 2 * CONFIG.sync_interval_s:
            return False
        return not any(world.layer(n).holds(actor_id) for n in world.awake())

    def _home(self, key: tuple[str, str]) -> str:
        home = registry.home_of(key, self.world.awake())
        assert home is not None
        return home

    def _copies(self) -> None:
        world, ledger = self.world, self.world.ledger
        awake = world.awake()
        for actor_id, copies in sorted(live_copies(world.layer(n) for n in awake).items()):
            if len(copies) > 1:
                self.fail(f"(e) actor {actor_id} runs {len(copies)} times: {copies}")
            killed = ledger.kill_done.get(actor_id)
            if killed is not None and world.now - killed > KILL_FREE_S:
                self.fail(f"(e) actor {actor_id}, killed at {killed:.2f} s, runs again: {copies}")
        for loss in ledger.losses:
            if MINORITY_BURIAL in self.tolerate and loss.actor_id in ledger.buried_stops:
                self.excused.add((MINORITY_BURIAL, loss.node, loss.actor_id))
                continue
            self.fail(
                f"(e) creation {loss.actor_id} was lost: {loss.node}, alive, dropped its last copy ({loss.reason}) at {loss.at:.2f} s"
            )
        ledger.losses.clear()
        failed = {f.actor_id for f in ledger.failures}
        running = {a for n in awake for a in [*world.layer(n).hosted, *world.layer(n).waiting]}
        for ticket in ledger.tickets:
            actor_id = ticket.actor_id
            if ticket.outcome != "granted" or not ticket.restartable or actor_id in running or actor_id in failed:
                continue
            if actor_id in ledger.kills or actor_id in ledger.lost_to_deaths:
                continue  # killed, or every node that held it died (more than the keepers cover, or before it was placed)
            if MINORITY_BURIAL in self.tolerate and actor_id in ledger.buried_stops:
                self.excused.add((MINORITY_BURIAL, "", actor_id))
                continue
            self.fail(f"(e) restartable actor {actor_id} is neither running nor waiting to be placed anywhere")
        buried = world.net.dead_at_incarnation
        for node in awake:
            layer = world.layer(node)
            heard = max((inc for _, n, inc in world.net.burials if n == node), default=-1)
            for actor_id, hosted in layer.hosted.items():
                if hosted.node_incarnation <= buried.get(node, -1):
                    if UNHEARD_BURIAL in self.tolerate and heard < hosted.node_incarnation:
                        self.excused.add((UNHEARD_BURIAL, node, actor_id))
                        continue
                    self.fail(
                        f"(e) {node} was declared dead at incarnation {buried[node]} but still runs actor {actor_id}, "
                        f"started at its incarnation {hosted.node_incarnation}"
                    )
            for actor_id, waiting in layer.waiting.items():
                if waiting.placing is None and world.now - waiting.since > STUCK_S and self._room_for(waiting.spec.strategy):
                    self.fail(f"(e) creation {actor_id} waits at {node} since {waiting.since:.2f} s while a member has room")

    def _room_for(self, strategy: Any) -> list[str]:
        """The awake members that could host a creation now (hard affinity: its target only)."""
        world = self.world
        kind, target, soft = scheduler.parse_strategy(strategy)
        candidates = [target] if kind == scheduler.AFFINITY and not soft else world.awake()
        return [n for n in candidates if n in world.awake() and scheduler.fits({"CPU": 1.0}, world.layer(n).resources.available)]
