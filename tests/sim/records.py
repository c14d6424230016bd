"""The model's records: a creation as it travels (``Spec``), what a node holds of it, and the gossip view's rules."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from zmesh.node.core import registry
from zmesh.node.core.records import WAITING, ActorRow
from zmesh.node.core.resources import Reservation

if TYPE_CHECKING:
    from sim.actor_layer import ActorLayer

NS = "default"


@dataclasses.dataclass(frozen=True)
class Spec:
    """A creation as it travels: to a placement target, to keepers, to a re-creator."""

    actor_id: str
    name: str | None
    demand: Mapping[str, float]
    strategy: Any
    restartable: bool
    detached: bool
    created_at: float
    origin: str
    incarnation: int = 0
    keepers: tuple[str, ...] = ()

    @property
    def key(self) -> registry.Name | None:
        return (NS, self.name) if self.name is not None else None

    def row(self, state: str, origin: str) -> ActorRow:
        return ActorRow(
            "Actor", NS, self.name, state, None, self.incarnation, self.detached, self.restartable,
            self.created_at, b"" if self.name is not None else None, origin, self.keepers,
        )  # fmt: skip


@dataclasses.dataclass
class Hosted:
    spec: Spec
    node_incarnation: int  # this node's membership incarnation when it started: what a burial compares
    reservation: Reservation


@dataclasses.dataclass
class Waiting:
    spec: Spec
    since: float
    tried: set[str] = dataclasses.field(default_factory=set)
    placing: str | None = None  # the member asked to host it, until it answers
    retry_at: float = 0.0


@dataclasses.dataclass
class Kept:
    spec: Spec
    host: str
    seen: bool = False  # the host's entry has listed it: its row vanishing from a live host means it stopped
    orphaned_at: float | None = None  # when this node first saw its host gone


@dataclasses.dataclass
class View:
    """What gossip (and this node's own state) shows: each actor's best row, each name's winner, rows per node."""

    actors: dict[str, tuple[str, ActorRow]]
    names: dict[registry.Name, registry.Holder]
    by_node: dict[str, dict[str, ActorRow]]


def resolve(by_node: Mapping[str, Mapping[str, ActorRow]]) -> View:
    """The view's rules (``zmesh/node/mesh/view.py``): the highest incarnation speaks for an actor, a host before a
    waiting origin; of several actors under one name, ``pick_winner`` holds it."""
    actors: dict[str, tuple[str, ActorRow]] = {}
    for node_id in sorted(by_node):
        for actor_id, row in by_node[node_id].items():
            best = actors.get(actor_id)
            if best is None or (row.incarnation, row.state != WAITING, node_id) > (best[1].incarnation, best[1].state != WAITING, best[0]):
                actors[actor_id] = (node_id, row)
    named: dict[registry.Name, list[registry.Holder]] = {}
    for actor_id, (_, row) in actors.items():
        if row.name is not None:
            named.setdefault((row.namespace, row.name), []).append(registry.Holder(actor_id, row.created_at))
    names = {key: registry.pick_winner(holders) for key, holders in named.items()}
    return View(actors, names, {n: dict(rows) for n, rows in by_node.items()})


def live_copies(layers: Iterable[ActorLayer]) -> dict[str, list[tuple[str, int]]]:
    """Actor id -> (node, incarnation) of every running copy on these layers."""
    out: dict[str, list[tuple[str, int]]] = {}
    for layer in layers:
        for actor_id, hosted in layer.hosted.items():
            out.setdefault(actor_id, []).append((layer.me, hosted.spec.incarnation))
    return out
