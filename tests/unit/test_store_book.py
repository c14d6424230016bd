"""The object store's ledger (node/core/store.py), pure: capacity, holders, pulls and renames under random events."""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from zmesh.node.core.store import PULLING, READY, StoreBook

HOLDERS = ["a", "b", "c", "d"]
SOURCES = [("n2", "zmesh.n2.x-1"), ("n2", "zmesh.n2.x-2"), ("n3", "zmesh.n3.y-1")]


class Waiter:
    def __init__(self) -> None:
        self.answer: Any = None


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.book = StoreBook("n1", capacity=100)
        self.counter = 0
        self.unlinked: set[str] = set()
        self.now = 0.0

    def _gone(self, segments: list[Any]) -> None:
        for seg in segments:
            assert seg.name not in self.unlinked, f"{seg.name} freed twice"
            self.unlinked.add(seg.name)

    @rule(size=st.integers(1, 60), holder=st.sampled_from(HOLDERS), writer=st.sampled_from([None, *HOLDERS]))
    def alloc(self, size: int, holder: str, writer: str | None) -> None:
        self.counter += 1
        name = f"zmesh.n1.w-{self.counter}"
        before = self.book.used
        refusal = self.book.alloc(name, size, holder, writer)
        if before + size > self.book.capacity:
            assert refusal is not None and f"{size:,} bytes" in refusal
        else:
            assert refusal is None and self.book.get(name) is not None

    @rule(data=st.data(), holder=st.sampled_from(HOLDERS))
    def free(self, data: st.DataObject, holder: str) -> None:
        names = self.book.names()
        if names:
            self._gone(self.book.free(data.draw(st.sampled_from(names)), holder))

    @rule(gone=st.sets(st.sampled_from(HOLDERS), max_size=2))
    def holders_exit(self, gone: set[str]) -> None:
        self._gone(self.book.holders_gone(gone))
        for writer in gone:
            self.book.writer_gone(writer, self.now)

    @rule(data=st.data(), holder=st.sampled_from(HOLDERS))
    def adopt(self, data: st.DataObject, holder: str) -> None:
        names = self.book.names()
        if names:
            name = data.draw(st.sampled_from(names))
            self.book.adopted(name, holder)
            seg = self.book.get(name)
            if seg is not None and holder in seg.holders:
                assert seg.writer is None and seg.writer_gone_at is None

    @rule(dt=st.floats(0, 10))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        orphans = self.book.orphans(self.now, 5.0)
        assert all(s.writer is not None for s in orphans), "only a segment never adopted goes with its writer"
        self._gone(orphans)

    @rule(source=st.sampled_from(SOURCES), size=st.integers(1, 60), holder=st.sampled_from(HOLDERS))
    def pull(self, source: tuple[str, str], size: int, holder: str) -> None:
        waiter = Waiter()
        refusal, ready, start = self.book.pull(source, size, holder, waiter)
        if refusal:
            assert ready is None and start is None
            return
        if start is not None:
            assert self.book.get(start.name).state == PULLING  # type: ignore[union-attr]
            # Every pull of one source while this copy lives shares it: one transfer per node.
            again = self.book.pull(source, size, holder, Waiter())
            assert again[2] is None
            self._gone(self.book.free(start.name, holder))

    @rule(data=st.data(), ok=st.booleans())
    def transfer_ends(self, data: st.DataObject, ok: bool) -> None:
        pulling = [n for n in self.book.names() if self.book.get(n).state == PULLING]  # type: ignore[union-attr]
        if not pulling:
            return
        name = data.draw(st.sampled_from(pulling))
        if ok:
            self.book.pulled(name)
            assert self.book.get(name).state == READY  # type: ignore[union-attr]
        else:
            seg = self.book.pull_failed(name)
            assert seg is not None and self.book.get(name) is None
            self._gone([seg])

    @rule(data=st.data(), holder=st.sampled_from(HOLDERS))
    def rename(self, data: st.DataObject, holder: str) -> None:
        names = self.book.names()
        if not names:
            return
        old = data.draw(st.sampled_from(names))
        self.counter += 1
        new = f"zmesh.n1.w-{self.counter}"
        seg = self.book.get(old)
        assert seg is not None
        alone = seg.source is None and set(seg.holders) == {holder}
        assert self.book.rename(old, new, holder) == alone
        if alone:
            assert self.book.get(old) is None and self.book.get(new) is seg

    @invariant()
    def counted(self) -> None:
        segments = [self.book.get(n) for n in self.book.names()]
        assert self.book.used == sum(s.size for s in segments if s is not None)
        assert 0 <= self.book.used <= self.book.capacity
        for seg in segments:
            assert seg is not None and seg.holders, "a segment nobody holds must be gone"
            assert all(count > 0 for count in seg.holders.values())
            assert seg.name not in self.unlinked
            assert seg.writer_gone_at is None or self.now - seg.writer_gone_at < 5.0 or seg.writer is not None


TestLedger = LedgerMachine.TestCase
TestLedger.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_a_value_larger_than_the_store_names_both_sizes() -> None:
    book = StoreBook("n1", capacity=8 << 20)
    refusal = book.alloc("zmesh.n1.a-1", 10 << 20, "a")
    assert refusal is not None and "10.0 MiB" in refusal and "8.0 MiB" in refusal and "larger than" in refusal


def test_a_full_store_names_what_is_held() -> None:
    book = StoreBook("n1", capacity=10 << 20)
    assert book.alloc("zmesh.n1.a-1", 6 << 20, "a") is None
    refusal = book.alloc("zmesh.n1.a-2", 6 << 20, "a")
    assert refusal is not None and "is full" in refusal and "6.0 MiB" in refusal and "10.0 MiB" in refusal


def test_readers_of_one_source_share_one_transfer_and_the_copy_goes_with_the_last() -> None:
    book = StoreBook("n1", capacity=1000)
    waiters = [Waiter() for _ in range(6)]
    starts = [book.pull(("n2", "zmesh.n2.big-1"), 200, f"r{i}", w)[2] for i, w in enumerate(waiters)]
    assert sum(1 for s in starts if s is not None) == 1 and book.transfers_started == 1
    name = starts[0].name  # type: ignore[union-attr]
    assert book.pulled(name) == waiters
    assert book.pull(("n2", "zmesh.n2.big-1"), 200, "late", Waiter())[1] is not None  # ready: mapped at once
    for holder in [f"r{i}" for i in range(6)]:
        assert book.free(name, holder) == []
    assert [s.name for s in book.free(name, "late")] == [name]
    assert book.used == 0


@pytest.mark.parametrize("dies", ["reader", "transfer"])
def test_a_copy_in_flight_goes_when_its_readers_or_its_sender_go(dies: str) -> None:
    book = StoreBook("n1", capacity=1000)
    start = book.pull(("n2", "zmesh.n2.big-1"), 300, "r", Waiter())[2]
    assert start is not None
    gone = book.holders_gone({"r"}) if dies == "reader" else [book.pull_failed(start.name)]
    assert [s.name for s in gone if s is not None] == [start.name] and book.used == 0
    assert book.pulling_from("n2") == []
