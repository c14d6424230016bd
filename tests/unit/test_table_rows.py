"""The node's gossip rows: built again only for the records that changed, and always what a full rebuild gives.

A node lists every actor it hosts or waits to place in its gossip entry, published up to
ten times a second. Rebuilding every row each time cost a burst of thousands of creations
a busy loop; the table now rebuilds the rows of records whose row fields were set or that
were hosted, queued or buried since the last entry (``records.ROW_FIELDS``).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.node.core import lifecycle, records
from zmesh.node.core.records import ActorRecord
from zmesh.node.core.table import ActorTable
from zmesh.transport.ids import ActorId, ClientId

ME = "me"


def _record(i: int) -> ActorRecord:
    return ActorRecord(
        actor_id=ActorId(f"a{i}"), class_name="C", class_key="k", meta_blob=b"m", args_frames=[], spec={}, owner=ClientId(b"o"),
        creator=ClientId(b"c"), owner_address="tcp://o", name=f"n{i}", namespace="ns", demand={}, max_restarts=1,
    )  # fmt: skip


def _full_rebuild(table: ActorTable) -> dict[str, list[Any]]:
    return {r.actor_id: r.row().wire() for r in (*table.hosted(), *table.waiting()) if r.state != records.DEAD}


def test_a_second_entry_builds_only_the_row_that_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    table = ActorTable(ME, keep_dead=10)
    for i in range(100):
        record = _record(i)
        table.add(record)
        table.set_host(record, ME)
    assert table.gossip_rows() == _full_rebuild(table) and len(_full_rebuild(table)) == 100
    built = []
    row = ActorRecord.row
    monkeypatch.setattr(ActorRecord, "row", lambda self: built.append(self.actor_id) or row(self))
    assert len(table.gossip_rows()) == 100 and built == []
    record = table.get("a7")
    assert record is not None
    record.state, record.address = records.ALIVE, "ipc://w7"
    rows = table.gossip_rows()
    assert built == ["a7"] and rows["a7"][3:5] == [records.ALIVE, "ipc://w7"]


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "host", "host_elsewhere", "wait", "unwait", "starting", "alive", "restart", "keepers", "unname", "bury"]),
        st.integers(0, 2),
    ),
    max_size=60,
)


@settings(max_examples=1000, deadline=None)
@given(_OPS)
def test_the_rows_always_equal_a_full_rebuild(ops: list[tuple[str, int]]) -> None:
    table = ActorTable(ME, keep_dead=2)  # dead records are forgotten too
    for op, i in ops:
        record = table.get(f"a{i}")
        if op == "add":
            table.add(_record(i))  # also replaces a record of the same actor
        elif record is None or record.state == records.DEAD:
            continue
        elif op == "host":
            table.set_host(record, ME)
        elif op == "host_elsewhere":
            table.set_host(record, "other")
        elif op == "wait":
            table.wait(record)
        elif op == "unwait":
            table.unwait(record)
        elif op == "starting":
            record.state = records.STARTING
        elif op == "alive":
            record.state, record.address = records.ALIVE, f"ipc://w{i}"
        elif op == "restart":
            lifecycle.next_incarnation(record, records.RESTARTING)
        elif op == "keepers":
            record.keepers = [*record.keepers, f"k{len(record.keepers)}"]
        elif op == "unname":
            record.name = None
        elif op == "bury":
            record.state = records.DEAD
            table.buried(record)
        assert table.gossip_rows() == _full_rebuild(table), (op, i)  # as the node builds its entry: every round
