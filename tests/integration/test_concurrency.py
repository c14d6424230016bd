"""Execution modes: sequential order per caller, threads, asyncio, and concurrency groups."""

from __future__ import annotations

import asyncio
import threading

import pytest

import zmesh


@zmesh.remote
class Recorder:
    def __init__(self) -> None:
        self.seen: list[int] = []

    def add(self, value: int) -> int:
        self.seen.append(value)
        return value

    def log(self) -> list[int]:
        return self.seen


def test_calls_from_one_caller_run_in_submission_order(local: None) -> None:
    recorder = Recorder.remote()
    refs = [recorder.add.remote(i) for i in range(2000)]
    zmesh.get(refs, timeout=30)
    assert zmesh.get(recorder.log.remote(), timeout=30) == list(range(2000))


def test_each_thread_keeps_its_own_order(local: None) -> None:
    recorder = Recorder.remote()

    def submit(base: int) -> None:
        zmesh.get([recorder.add.remote(base + i) for i in range(300)], timeout=30)

    threads = [threading.Thread(target=submit, args=(base,)) for base in (0, 10_000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    seen = zmesh.get(recorder.log.remote(), timeout=30)
    assert sorted(seen) == sorted(list(range(300)) + list(range(10_000, 10_300)))
    assert [v for v in seen if v < 10_000] == list(range(300))
    assert [v for v in seen if v >= 10_000] == list(range(10_000, 10_300))


@zmesh.remote
class Peak:
    """Counts how many calls run at once, per group.

    ``hold(group, parties)`` returns once ``parties`` calls of that group are inside together
    (a barrier, so overlap is certain, not hoped for); the peak shows no more ever ran at once.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.barriers: dict[str, threading.Barrier] = {}

    def _enter(self, group: str) -> None:
        with self.lock:
            self.inside[group] = self.inside.get(group, 0) + 1
            self.peak[group] = max(self.peak.get(group, 0), self.inside[group])

    def _leave(self, group: str) -> None:
        with self.lock:
            self.inside[group] -= 1

    def hold(self, group: str, parties: int) -> str:
        with self.lock:
            barrier = self.barriers.setdefault(group, threading.Barrier(parties, timeout=20))
        self._enter(group)
        barrier.wait()
        self._leave(group)
        return group

    @zmesh.method(concurrency_group="io")
    def io(self, parties: int) -> str:
        return self.hold("io", parties)

    @zmesh.method(concurrency_group="compute")
    def compute(self, parties: int) -> str:
        return self.hold("compute", parties)

    def peaks(self) -> dict[str, int]:
        return dict(self.peak)


def test_max_concurrency_runs_that_many_threads_and_no_more(local: None) -> None:
    actor = Peak.options(max_concurrency=3).remote()
    zmesh.get([actor.hold.remote("default", 3) for _ in range(9)], timeout=30)
    assert zmesh.get(actor.peaks.remote(), timeout=30)["default"] == 3


def test_sequential_actor_runs_one_call_at_a_time(local: None) -> None:
    actor = Peak.remote()
    zmesh.get([actor.hold.remote("default", 1) for _ in range(10)], timeout=30)
    assert zmesh.get(actor.peaks.remote(), timeout=30)["default"] == 1


def test_threaded_concurrency_groups_limit_each_group_and_run_side_by_side(local: None) -> None:
    actor = Peak.options(concurrency_groups={"io": 2, "compute": 1}).remote()
    # The compute calls finish while io calls wait for their partners: groups run side by side.
    io_refs = [actor.io.remote(2) for _ in range(3)]
    assert zmesh.get([actor.compute.remote(1) for _ in range(2)], timeout=20) == ["compute", "compute"]
    zmesh.get([*io_refs, actor.io.remote(2)], timeout=20)
    peaks = zmesh.get(actor.peaks.remote(), timeout=30)
    assert peaks["io"] == 2
    assert peaks["compute"] == 1


def test_group_chosen_per_call_with_options(local: None) -> None:
    actor = Peak.options(concurrency_groups={"io": 2}).remote()
    zmesh.get([actor.hold.options(concurrency_group="io").remote("io", 2) for _ in range(4)], timeout=30)
    assert zmesh.get(actor.peaks.remote(), timeout=30)["io"] == 2


@zmesh.remote
class AsyncPeak:
    def __init__(self) -> None:
        self.inside: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.barriers: dict[str, asyncio.Barrier] = {}

    async def hold(self, group: str, parties: int) -> str:
        barrier = self.barriers.setdefault(group, asyncio.Barrier(parties))
        self.inside[group] = self.inside.get(group, 0) + 1
        self.peak[group] = max(self.peak.get(group, 0), self.inside[group])
        await asyncio.wait_for(barrier.wait(), 20)
        self.inside[group] -= 1
        return group

    @zmesh.method(concurrency_group="io")
    async def io(self, parties: int) -> str:
        return await self.hold("io", parties)

    @zmesh.method(concurrency_group="compute")
    async def compute(self, parties: int) -> str:
        return await self.hold("compute", parties)

    async def peaks(self) -> dict[str, int]:
        return dict(self.peak)


def test_async_actor_interleaves_many_calls_by_default(local: None) -> None:
    actor = AsyncPeak.remote()
    zmesh.get([actor.hold.remote("default", 50) for _ in range(50)], timeout=30)
    assert zmesh.get(actor.peaks.remote(), timeout=30)["default"] == 50


def test_async_actor_max_concurrency_limits_interleaving(local: None) -> None:
    actor = AsyncPeak.options(max_concurrency=2).remote()
    zmesh.get([actor.hold.remote("default", 2) for _ in range(6)], timeout=30)
    assert zmesh.get(actor.peaks.remote(), timeout=30)["default"] == 2


def test_async_concurrency_groups(local: None) -> None:
    actor = AsyncPeak.options(concurrency_groups={"io": 3, "compute": 1}).remote()
    io_refs = [actor.io.remote(3) for _ in range(2)]
    assert zmesh.get([actor.compute.remote(1) for _ in range(3)], timeout=20) == ["compute"] * 3
    zmesh.get(io_refs + [actor.io.remote(3) for _ in range(4)], timeout=20)
    peaks = zmesh.get(actor.peaks.remote(), timeout=30)
    assert peaks["io"] == 3
    assert peaks["compute"] == 1


def test_async_method_can_await_another_actor(local: None) -> None:
    recorder = Recorder.remote()

    @zmesh.remote
    class Relay:
        def __init__(self, target: zmesh.ActorHandle) -> None:
            self.target = target

        async def relay(self, value: int) -> int:
            return await self.target.add.remote(value) * 2

    relay = Relay.remote(recorder)
    assert zmesh.get([relay.relay.remote(i) for i in range(5)], timeout=30) == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("options", [{}, {"max_concurrency": 2}])
def test_blocking_get_inside_a_method(local: None, options: dict[str, int]) -> None:
    recorder = Recorder.remote()

    @zmesh.remote
    class Caller:
        def call(self, target: zmesh.ActorHandle, value: int) -> int:
            return zmesh.get(target.add.remote(value), timeout=30) + 1

    caller = Caller.options(**options).remote()
    assert zmesh.get([caller.call.remote(recorder, i) for i in range(5)], timeout=30) == [1, 2, 3, 4, 5]
