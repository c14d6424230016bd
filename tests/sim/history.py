"""A simulated mesh with the actor layer on every node, and the operations a drawn history is made of.

``World`` owns the network, the ledger and the invariant checker, and runs time in steps of ``STEP_S``,
checking after each. Operations pick their nodes at the moment they run (``Pick``): any awake node, the host of
an actor, or one of its keepers, so a history stays meaningful however the mesh changed before it. Faults
that cannot apply (a third death within ``DEATH_WINDOW_S``, a partition while one holds) are skipped, so at
most two nodes die (or freeze) together and a member always stays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sim import invariants
from sim.actor_layer import ActorLayer
from sim.ledger import Ledger, Ticket
from sim.network import Net
from sim.records import Spec
from zmesh.node.core import scheduler

STEP_S = 0.1  # the invariants are checked after every step of this much simulated time
DEATH_WINDOW_S = 8.0  # deaths and freezes further apart than this are separate events for the keepers
MAX_NODES = 8
MIN_NODES = 3
CPUS = 3.0
NAMES = ("alpha", "beta", "gamma")


class World:
    def __init__(self, seed: int, nodes: int = 5, cpus: float = CPUS, tolerate: tuple[str, ...] = ()) -> None:
        self.ledger = Ledger()
        self.cpus = cpus
        self.net = Net(seed, self._layer)
        self.log: list[str] = []
        self.disturbed_at = 0.0  # the last fault, join, death, freeze, thaw, partition or heal
        self.deaths: list[tuple[float, str]] = []  # deaths and freezes, for DEATH_WINDOW_S
        self.actor_ids: list[str] = []
        self.specs: dict[str, Spec] = {}
        for _ in range(nodes):
            self.net.add_node()
        self.checker = invariants.Checker(self, tolerate)

    def _layer(self, node: Any) -> ActorLayer:
        return ActorLayer(node, {"CPU": self.cpus}, self.ledger)

    # ------------------------------------------------------------------ views of the ground truth

    @property
    def now(self) -> float:
        return self.net.now

    def layer(self, node_id: str) -> ActorLayer:
        layer = self.net.nodes[node_id].layer
        assert isinstance(layer, ActorLayer)
        return layer

    def awake(self) -> list[str]:
        return [n.id for n in self.net.awake()]

    def alive(self) -> list[str]:
        return [n.id for n in self.net.alive()]

    def disturb(self, what: str) -> None:
        self.disturbed_at = self.now
        self.log.append(f"{self.now:8.2f} {what}")

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.net.run(min(STEP_S, end - self.now))
            self.checker.check()

    def new_actor_id(self) -> str:
        actor_id = f"a{len(self.actor_ids)}"
        self.actor_ids.append(actor_id)
        return actor_id

    def actor(self, index: int) -> str | None:
        return self.actor_ids[index % len(self.actor_ids)] if self.actor_ids else None

    def keepers_of(self, actor_id: str) -> tuple[str, ...]:
        """The keepers its latest copy chose (that copy's node may have died since)."""
        copies = [
            n.layer.hosted[actor_id] for n in self.net.nodes.values() if isinstance(n.layer, ActorLayer) and actor_id in n.layer.hosted
        ]
        return max(copies, key=lambda h: h.spec.incarnation).spec.keepers if copies else ()

    def host_of(self, actor_id: str) -> str | None:
        hosts = [n for n in self.awake() if actor_id in self.layer(n).hosted]
        return hosts[0] if hosts else None


@dataclasses.dataclass(frozen=True)
class Pick:
    """A node chosen when the operation runs: ``node`` (the index-th awake), ``host`` (of the index-th actor) or
    ``keeper`` (the rank-th keeper of that host's actor); a role that does not resolve falls back to ``node``."""

    kind: str = "node"
    index: int = 0
    rank: int = 0

    def resolve(self, world: World) -> str | None:
        awake = world.awake()
        if not awake:
            return None
        actor_id = world.actor(self.index)
        if actor_id is not None and self.kind == "host":
            host = world.host_of(actor_id)
            if host is not None:
                return host
        if actor_id is not None and self.kind == "keeper":
            chosen = [k for k in world.keepers_of(actor_id) if k in awake]
            if chosen:
                return chosen[self.rank % len(chosen)]
        return awake[self.index % len(awake)]


def _victims(world: World, picks: tuple[Pick, ...]) -> list[str]:
    chosen: list[str] = []
    for pick in picks:
        node = pick.resolve(world)
        if node is not None and node not in chosen:
            chosen.append(node)
    recent = [n for t, n in world.deaths if world.now - t < DEATH_WINDOW_S]
    if len(set(recent) | set(chosen)) > 2 or len(world.alive()) - len(chosen) < 2:
        return []  # a third death within the window, or too few left: not what the invariants promise to survive
    return chosen


@dataclasses.dataclass(frozen=True)
class Create:
    node: int = 0
    name: int | None = None
    get_if_exists: bool = False
    restartable: bool = False
    affinity: Pick | None = None
    soft: bool = False

    def apply(self, world: World) -> None:
        awake = world.awake()
        origin = awake[self.node % len(awake)]
        actor_id = world.new_actor_id()
        strategy: Any = scheduler.DEFAULT
        if self.affinity is not None:
            target = self.affinity.resolve(world)
            strategy = (scheduler.AFFINITY, target, self.soft) if target is not None else scheduler.DEFAULT
        name = NAMES[self.name % len(NAMES)] if self.name is not None else None
        spec = Spec(actor_id, name, {"CPU": 1.0}, strategy, self.restartable, self.restartable, world.now, origin)
        world.specs[actor_id] = spec
        world.ledger.restartable[actor_id] = self.restartable
        ticket = Ticket(actor_id, name, self.get_if_exists, origin, world.now, self.restartable, strategy)
        world.ledger.tickets.append(ticket)
        world.checker.asked(ticket)
        world.layer(origin).create(spec, self.get_if_exists, ticket)


@dataclasses.dataclass(frozen=True)
class Kill:
    actor: int = 0
    node: int = 0

    def apply(self, world: World) -> None:
        actor_id = world.actor(self.actor)
        if actor_id is None:
            return
        granted = [t for t in world.ledger.tickets if t.actor_id == actor_id and t.outcome == "granted"]
        if not granted:
            return  # no caller holds a handle to it
        awake = world.awake()
        killer = awake[self.node % len(awake)]
        world.ledger.kills.setdefault(actor_id, world.now)
        world.checker.killed(actor_id, world.specs[actor_id].name)
        world.layer(killer).kill(actor_id, world.specs[actor_id].origin)


@dataclasses.dataclass(frozen=True)
class Lookup:
    name: int = 0

    def apply(self, world: World) -> None:
        name = NAMES[self.name % len(NAMES)]
        found = {n: world.layer(n).lookup(name) for n in world.awake()}
        world.ledger.lookups.append((world.now, name, found))
        world.checker.looked_up(name, found)


@dataclasses.dataclass(frozen=True)
class Join:
    after: float = 0.2  # the time before the next operation (0: it meets a mesh that does not know the newcomer yet)

    def apply(self, world: World) -> None:
        if len(world.alive()) < MAX_NODES:
            node = world.net.add_node()
            world.disturb(f"join {node.id}")


@dataclasses.dataclass(frozen=True)
class Die:
    victims: tuple[Pick, ...] = (Pick(),)

    def apply(self, world: World) -> None:
        chosen = _victims(world, self.victims)
        if not chosen:
            return
        world.checker.deaths(chosen)
        for node in chosen:
            world.net.kill(node)
            world.ledger.node_died(node, world.now)
            world.deaths.append((world.now, node))
        world.disturb(f"SIGKILL {' '.join(chosen)}")


@dataclasses.dataclass(frozen=True)
class Freeze:
    victims: tuple[Pick, ...] = (Pick(),)
    seconds: float = 2.0

    def apply(self, world: World) -> None:
        chosen = _victims(world, self.victims)
        if not chosen:
            return
        for node in chosen:
            world.net.freeze(node)
            world.deaths.append((world.now, node))
        world.disturb(f"freeze {' '.join(chosen)} for {self.seconds} s")

        def thaw() -> None:
            for node in chosen:
                world.net.thaw(node)
            world.disturb(f"thaw {' '.join(chosen)}")

        world.net.at(world.now + self.seconds, thaw)


@dataclasses.dataclass(frozen=True)
class Partition:
    side: tuple[Pick, ...] = (Pick(),)
    seconds: float = 5.0

    def apply(self, world: World) -> None:
        if world.net.sides:
            return
        chosen = {p.resolve(world) for p in self.side} - {None}
        if not chosen or len(chosen) >= len(world.alive()):
            return
        world.net.partition(sorted(n for n in chosen if n is not None))
        world.disturb(f"partition {sorted(n for n in chosen if n is not None)} from the rest for {self.seconds} s")

        def heal() -> None:
            world.net.heal()
            world.disturb("heal")

        world.net.at(world.now + self.seconds, heal)


@dataclasses.dataclass(frozen=True)
class MessageFaults:
    drop: float = 0.1
    dup: float = 0.1
    max_delay: float = 0.05
    seconds: float = 3.0

    def apply(self, world: World) -> None:
        world.net.faults.drop, world.net.faults.dup = self.drop, self.dup
        world.net.faults.delay = (0.001, self.max_delay)
        world.disturb(f"message faults drop={self.drop} dup={self.dup} delay<={self.max_delay}")

        def calm() -> None:
            world.net.faults.drop = world.net.faults.dup = 0.0
            world.net.faults.delay = (0.001, 0.01)
            world.disturb("message faults off")

        world.net.at(world.now + self.seconds, calm)


@dataclasses.dataclass(frozen=True)
class Together:
    """Creations at the same instant from several nodes: they race to the name's home, not to gossip."""

    creations: tuple[Create, ...] = ()

    def apply(self, world: World) -> None:
        for creation in self.creations:
            creation.apply(world)


@dataclasses.dataclass(frozen=True)
class Wait:
    seconds: float = 1.0

    def apply(self, world: World) -> None:
        world.run(self.seconds)


Op = Create | Together | Kill | Lookup | Join | Die | Freeze | Partition | MessageFaults | Wait

WARM_UP_S = 10.0  # the nodes find each other, and the mesh is calm (invariants.SETTLE_S) when the history starts
GAP_S = 0.2  # time between two operations
SETTLE_END_S = 20.0  # after the history: every fault is over, and the mesh must converge and hold its invariants


def play(history: list[Op], seed: int = 0, nodes: int = 5, tolerate: tuple[str, ...] = ()) -> World:
    """Run ``history`` on a fresh mesh; raises ``invariants.Violation`` at the first broken invariant.

    ``tolerate``: known bugs (``invariants.KNOWN_BUGS``) counted in ``world.checker.excused`` instead.
    """
    world = World(seed, nodes, tolerate=tolerate)
    world.run(WARM_UP_S)
    for op in history:
        world.log.append(f"{world.now:8.2f} {op!r}")
        op.apply(world)
        world.run(op.after if isinstance(op, Join) else GAP_S)
    world.run(SETTLE_END_S)
    world.checker.final()
    return world
