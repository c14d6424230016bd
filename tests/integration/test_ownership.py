"""Reference counting across real processes: values live while a reference is held anywhere, and no longer."""

from __future__ import annotations

import gc
import os
from typing import Any

import psutil
import pytest

import zmesh
import zmesh.runtime
from zmesh.exceptions import ObjectLostError
from zmesh.testing import wait_for

MB = 2**20


@zmesh.remote
class Holder:
    def __init__(self) -> None:
        self.kept: list[Any] = []

    def size(self, value: bytes) -> int:
        return len(value)

    def make(self, size: int) -> bytes:
        return b"m" * size

    def keep(self, box: list[Any]) -> int:
        self.kept.extend(box)
        return len(self.kept)

    def read(self) -> list[int]:
        return [len(zmesh.get(ref, timeout=10)) for ref in self.kept]

    def forget(self) -> None:
        self.kept.clear()

    def lend(self, size: int) -> list[Any]:
        return [zmesh.put(b"l" * size)]

    def pass_on(self, other: Any) -> int:
        return zmesh.get(other.keep.remote(self.kept), timeout=10)

    def lent_count(self) -> int:
        rt = zmesh.runtime.current()
        assert rt is not None
        return sum(len(v) for v in rt.object_service._lent.values())

    def pid(self) -> int:
        return os.getpid()


def _entries() -> int:
    rt = zmesh.runtime.current()
    assert rt is not None
    gc.collect()
    return len(rt.objects)


def _settled(baseline: int) -> bool:
    return _entries() <= baseline


@pytest.mark.timeout(120)
def test_results_passed_to_another_actor_are_freed(local: None) -> None:
    a, b = Holder.remote(), Holder.remote()
    zmesh.get([a.size.remote(b""), b.size.remote(b"")], timeout=30)
    baseline = _entries()
    rss = psutil.Process().memory_info().rss
    for _ in range(30):
        assert zmesh.get(b.size.remote(a.make.remote(10 * MB)), timeout=30) == 10 * MB
    wait_for(lambda: _settled(baseline), timeout=10, what="the driver to free the passed results")
    assert psutil.Process().memory_info().rss - rss < 100 * MB  # 300 MB passed through


@pytest.mark.timeout(60)
def test_a_nested_ref_an_actor_keeps_outlives_the_drivers_ref(local: None) -> None:
    a = Holder.remote()
    zmesh.get(a.size.remote(b""), timeout=30)
    baseline = _entries()
    ref = zmesh.put(b"k" * 1000)
    assert zmesh.get(a.keep.remote([ref]), timeout=30) == 1
    del ref
    gc.collect()
    assert zmesh.get(a.read.remote(), timeout=30) == [1000]  # the actor's borrow keeps it
    assert _entries() == baseline + 1
    zmesh.get(a.forget.remote(), timeout=30)
    wait_for(lambda: _settled(baseline), timeout=10, what="the value to be freed once the actor forgot it")


@pytest.mark.timeout(60)
def test_a_borrow_passed_along_a_chain_of_actors(local: None) -> None:
    a, b = Holder.remote(), Holder.remote()
    zmesh.get([a.size.remote(b""), b.size.remote(b"")], timeout=30)
    baseline = _entries()
    ref = zmesh.put(b"c" * 500)
    zmesh.get(a.keep.remote([ref]), timeout=30)
    assert zmesh.get(a.pass_on.remote(b), timeout=30) == 1
    del ref
    zmesh.get(a.forget.remote(), timeout=30)
    gc.collect()
    assert zmesh.get(b.read.remote(), timeout=30) == [500]  # b borrowed it from a borrower
    zmesh.get(b.forget.remote(), timeout=30)
    wait_for(lambda: _settled(baseline), timeout=10, what="the value to be freed at the end of the chain")


@pytest.mark.timeout(60)
def test_refs_a_worker_returns_are_lent_until_the_caller_lets_go(local: None) -> None:
    a = Holder.remote()
    outer = a.lend.remote(2000)
    (inner,) = zmesh.get(outer, timeout=30)
    assert zmesh.get(a.lent_count.remote(), timeout=30) == 1
    del outer
    gc.collect()
    wait_for(lambda: zmesh.get(a.lent_count.remote(), timeout=30) == 0, timeout=10, what="the worker to stop lending")
    assert zmesh.get(inner, timeout=30) == b"l" * 2000  # our own borrow keeps it now
    del inner
    gc.collect()


@pytest.mark.timeout(60)
def test_a_dead_borrowers_references_stop_counting(local: None) -> None:
    a = Holder.remote()
    zmesh.get(a.size.remote(b""), timeout=30)
    baseline = _entries()
    ref = zmesh.put(b"d" * 100)
    zmesh.get(a.keep.remote([ref]), timeout=30)
    del ref
    gc.collect()
    assert _entries() == baseline + 1
    zmesh.kill(a)
    wait_for(lambda: _settled(baseline), timeout=15, what="the dead borrower's reference to be dropped")


@pytest.mark.timeout(60)
def test_a_value_nobody_holds_is_lost_for_late_fetchers(local: None) -> None:
    a = Holder.remote()
    ref = zmesh.put(b"x" * 10)
    oid, owner = ref.id, ref.owner
    del ref
    gc.collect()
    rt = zmesh.runtime.current()
    assert rt is not None
    wait_for(lambda: rt.objects.get_locked(oid) is None, timeout=10, what="the value to be freed")
    with pytest.raises(ObjectLostError, match="freed"):
        rt.get([(oid, owner)], timeout=10)
    zmesh.kill(a)
