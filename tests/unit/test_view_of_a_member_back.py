"""A member that comes back to life is seen with everything its entry lists, whenever that entry arrived.

Regression (caught by the netns partition test under load): after a partition healed,
a member's entry reached this node through a third member while this node still held
that member dead. The view dropped it then; when the member became alive again nothing
read the entry back, and it changed no more, so this node never listed the member's
actors (a named actor created on the other side during the partition among them).
"""

from __future__ import annotations

import types
from typing import Any

import pytest

from zmesh.node.core import membership
from zmesh.node.core.departures import Departures
from zmesh.node.core.entry import EntryChange
from zmesh.node.core.records import ALIVE, ActorRow
from zmesh.node.core.resources import Resources
from zmesh.node.core.table import ActorTable, Chores
from zmesh.node.mesh.actors import MeshActors
from zmesh.node.mesh.view import MeshView

ME, OTHER = "me", "other"


class _Mesh:
    """What MeshActors reads of the mesh: who is live, and the gossip entries."""

    def __init__(self) -> None:
        self.live_ids: list[str] = []
        self.entries: dict[str, Any] = {}
        self.gossip = types.SimpleNamespace(entry=self.entries.get)

    def live(self) -> list[str]:
        return list(self.live_ids)


class _Bystander:
    """A neighbouring component this test does not look at: every method does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _row(name: str) -> list[Any]:
    return ActorRow("Named", "default", name, ALIVE, "tcp://10.0.0.2:1", 0, False, False, 1.0, b"m", OTHER).wire()


def _actors(mesh: _Mesh, view: MeshView) -> MeshActors:
    return MeshActors(
        ME, "tcp://10.0.0.1:1", ActorTable(ME, 10), view, mesh,  # type: ignore[arg-type]
        Resources({"CPU": 1.0}), Departures(), Chores(),
        _Bystander(), _Bystander(), _Bystander(), _Bystander(),  # names, placement, relay, deaths
        {}, lambda client, frames: True,
    )  # fmt: skip


@pytest.mark.parametrize("order", ["entry while dead, then alive", "alive, then entry"])
def test_a_member_back_alive_is_listed_whatever_came_first(order: str) -> None:
    mesh, view = _Mesh(), MeshView()
    actors = _actors(mesh, view)
    entry = types.SimpleNamespace(data={"actors": {"a1": _row("during")}, "clients": []})
    back = membership.Changed(OTHER, "tcp://10.0.0.2:9", membership.ALIVE, membership.DEAD, 1)
    if order == "entry while dead, then alive":
        mesh.entries[OTHER] = entry
        actors.on_entries([EntryChange(OTHER, True)])
        assert "a1" not in view.actors  # a dead member's entry does not count
        mesh.live_ids.append(OTHER)
        actors.on_member(back)
    else:
        mesh.live_ids.append(OTHER)
        actors.on_member(back)
        mesh.entries[OTHER] = entry
        actors.on_entries([EntryChange(OTHER, True)])
    assert view.actors["a1"][0] == OTHER
    assert view.names[("default", "during")][1] == OTHER
