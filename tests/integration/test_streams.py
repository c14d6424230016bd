"""Streaming generators: one ObjectRef per item, in order, as each is produced, paced by the consumer."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zmesh
from zmesh.exceptions import ActorDiedError, GetTimeoutError
from zmesh.testing import wait_for

pytestmark = pytest.mark.timeout(120)


def _read_count(path: Path) -> int:
    data = path.read_bytes() if path.exists() else b""
    return int(data) if data.strip() else 0


@zmesh.remote
class Producer:
    """A sequential actor whose generators count the items they produced in a file (seen from the test)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def numbers(self, n: int, count_path: str | None = None) -> Iterator[int]:
        fd = os.open(count_path, os.O_WRONLY | os.O_CREAT) if count_path else None
        try:
            for i in range(n):
                if fd is not None:
                    os.pwrite(fd, b"%012d" % (i + 1), 0)
                yield i
        finally:
            if fd is not None:
                os.close(fd)

    def endless(self, count_path: str, closed_path: str) -> Iterator[int]:
        fd = os.open(count_path, os.O_WRONLY | os.O_CREAT)
        i = 0
        try:
            while True:
                i += 1
                os.pwrite(fd, b"%012d" % i, 0)
                yield i
        finally:
            os.close(fd)
            Path(closed_path).write_text("closed")

    def fails_after(self, n: int) -> Iterator[int]:
        yield from range(n)
        raise ValueError(f"failed after {n}")

    def nested(self, n: int) -> Iterator[int]:
        def inner() -> Iterator[int]:
            yield from range(n)

        yield from inner()
        yield from iter([100, 101])

    def empty(self) -> Iterator[int]:
        return
        yield  # a generator that yields nothing

    def blobs(self, sizes: list[int]) -> Iterator[bytes]:
        for k, size in enumerate(sizes):
            yield bytes([k % 251]) * size

    def boxed(self, n: int) -> Iterator[list[zmesh.ObjectRef]]:
        for i in range(n):
            yield [zmesh.put(i * 3)]  # a ref inside an item: lent to the caller with it

    def record(self, what: str) -> list[str]:
        self.calls.append(what)
        return list(self.calls)

    def recording(self, n: int) -> Iterator[int]:
        for i in range(n):
            self.calls.append(f"item {i}")
            yield i

    @zmesh.method(num_returns="streaming")
    def declared(self, n: int) -> list[int]:
        return list(range(n))  # any iterable streams when the method is declared streaming

    def pause_then(self, gate_path: str) -> Iterator[int]:
        yield 1
        wait_for(lambda: Path(gate_path).exists(), timeout=60)
        yield 2


def test_items_arrive_in_order_and_each_as_it_is_produced(local: None, tmp_path: Path) -> None:
    p = Producer.remote()
    gate = tmp_path / "gate"
    gen = p.pause_then.remote(str(gate))
    assert isinstance(gen, zmesh.ObjectRefGenerator)
    first = next(gen)
    assert zmesh.get(first, timeout=30) == 1  # held while the producer still works on item 2
    assert not gen.next_ready()
    with pytest.raises(GetTimeoutError):
        gen._next_sync(timeout_s=0.05)
    gate.write_text("go")
    assert zmesh.get(next(gen), timeout=30) == 2
    with pytest.raises(StopIteration):
        next(gen)
    assert gen.is_finished()
    assert zmesh.get(gen.completed(), timeout=30) == 2  # the producer's result: how many items it sent


def test_a_slow_consumer_keeps_the_producer_within_its_window(local: None, tmp_path: Path) -> None:
    count = tmp_path / "count"
    window = 16
    p = Producer.remote()
    gen = p.numbers.options(_generator_backpressure_num_objects=window).remote(10_000, str(count))
    for consumed in range(10_000):
        if consumed % 1000 == 0:
            # The producer runs up to exactly a window past the consumer, then waits for it.
            wait_for(lambda c=consumed: _read_count(count) == min(c + window, 10_000), timeout=30)  # type: ignore[misc]
        assert _read_count(count) <= consumed + window
        assert zmesh.get(next(gen), timeout=30) == consumed
    with pytest.raises(StopIteration):
        next(gen)


def test_the_default_window_is_bounded(local: None, tmp_path: Path) -> None:
    count = tmp_path / "count"
    p = Producer.remote()
    gen = p.numbers.remote(100_000, str(count))
    assert zmesh.get(next(gen), timeout=30) == 0
    wait_for(lambda: _read_count(count) == 64, timeout=30)  # one taken, none acked yet: the first window
    del gen
    assert zmesh.get(p.record.remote("after"), timeout=30) == ["after"]


def test_dropping_the_generator_stops_the_producer(local: None, tmp_path: Path) -> None:
    count, closed = tmp_path / "count", tmp_path / "closed"
    p = Producer.remote()
    gen = p.endless.remote(str(count), str(closed))
    refs = [next(gen) for _ in range(3)]
    del gen
    wait_for(closed.exists, timeout=30)  # the generator was closed: its finally ran
    produced = _read_count(count)
    assert produced <= 3 + 64
    # The sequential actor is free again, and the items taken stay valid.
    assert zmesh.get(p.record.remote("next"), timeout=30) == ["next"]
    assert zmesh.get(refs, timeout=30) == [1, 2, 3]
    assert _read_count(count) == produced


def test_cancel_stops_the_producer(local: None, tmp_path: Path) -> None:
    count, closed = tmp_path / "count", tmp_path / "closed"
    p = Producer.remote()
    gen = p.endless.remote(str(count), str(closed))
    first = next(gen)
    gen._cancel()
    with pytest.raises(StopIteration):
        next(gen)
    wait_for(closed.exists, timeout=30)
    assert zmesh.get(first, timeout=30) == 1


def test_an_error_mid_stream_comes_after_the_items_before_it(local: None) -> None:
    p = Producer.remote()
    gen = p.fails_after.remote(3)
    refs = list(gen)
    assert len(refs) == 4
    assert zmesh.get(refs[:3], timeout=30) == [0, 1, 2]
    with pytest.raises(ValueError, match="failed after 3"):
        zmesh.get(refs[3], timeout=30)
    with pytest.raises(StopIteration):
        next(gen)
    with pytest.raises(ValueError, match="failed after 3"):
        zmesh.get(gen.completed(), timeout=30)
    assert zmesh.get(p.record.remote("alive"), timeout=30) == ["alive"]


def test_yield_from_and_declared_streaming(local: None) -> None:
    p = Producer.remote()
    assert zmesh.get(list(p.nested.remote(3)), timeout=30) == [0, 1, 2, 100, 101]
    assert zmesh.get(list(p.declared.remote(3)), timeout=30) == [0, 1, 2]
    assert zmesh.get(list(p.record.options(num_returns="streaming").remote("x")), timeout=30) == ["x"]  # a list is iterable


def test_refs_inside_items_stay_valid(local: None) -> None:
    p = Producer.remote()
    boxes = zmesh.get(list(p.boxed.remote(5)), timeout=30)
    assert zmesh.get([box[0] for box in boxes], timeout=30) == [0, 3, 6, 9, 12]


def test_an_empty_generator_ends_at_once(local: None) -> None:
    gen = Producer.remote().empty.remote()
    assert list(gen) == []
    assert gen.is_finished()
    assert zmesh.get(gen.completed(), timeout=30) == 0


def test_a_sequential_actor_runs_its_next_call_after_the_generator(local: None) -> None:
    p = Producer.remote()
    gen = p.recording.remote(3)
    after = p.record.remote("after")
    assert zmesh.get(list(gen), timeout=30) == [0, 1, 2]
    assert zmesh.get(after, timeout=30) == ["item 0", "item 1", "item 2", "after"]


def test_a_call_arriving_while_the_producer_waits_for_credit_runs_after_the_generator(local: None) -> None:
    p = Producer.remote()
    gen = p.recording.options(_generator_backpressure_num_objects=2).remote(40)
    assert zmesh.get(next(gen), timeout=30) == 0
    after = p.record.remote("after")  # reaches the actor while its generator waits for this consumer
    assert zmesh.get(list(gen), timeout=30) == list(range(1, 40))
    assert zmesh.get(after, timeout=30) == [f"item {i}" for i in range(40)] + ["after"]


@zmesh.remote
class Async:
    async def ticks(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            await asyncio.sleep(0)
            yield i * 10

    async def fails(self) -> AsyncIterator[int]:
        yield 1
        raise KeyError("async failure")


def test_async_generator(local: None) -> None:
    a = Async.remote()

    async def consume() -> list[int]:
        return [await ref async for ref in a.ticks.remote(50)]

    assert asyncio.run(consume()) == [i * 10 for i in range(50)]
    assert zmesh.get(list(a.ticks.remote(3)), timeout=30) == [0, 10, 20]  # a sync consumer too
    refs = list(a.fails.remote())
    assert zmesh.get(refs[0], timeout=30) == 1
    with pytest.raises(KeyError):
        zmesh.get(refs[1], timeout=30)


@zmesh.remote(max_concurrency=2)
class Threaded:
    def __init__(self) -> None:
        self.gate = threading.Event()

    def until_opened(self) -> Iterator[str]:
        yield "waiting"
        assert self.gate.wait(60)
        yield "opened"

    def open(self) -> bool:
        self.gate.set()
        return True


def test_threaded_actor_serves_calls_while_a_generator_runs(local: None) -> None:
    t = Threaded.remote()
    gen = t.until_opened.remote()
    assert zmesh.get(next(gen), timeout=30) == "waiting"
    assert zmesh.get(t.open.remote(), timeout=30)  # runs on the second thread while the generator waits
    assert zmesh.get(next(gen), timeout=30) == "opened"
    assert list(gen) == []


_INLINE, _OUT_OF_BAND = 8 * 1024, 64 * 1024
_sizes = st.lists(
    st.one_of(
        st.sampled_from([0, 1, _INLINE - 64, _INLINE, _INLINE + 1, _OUT_OF_BAND - 1, _OUT_OF_BAND, _OUT_OF_BAND + 1]),
        st.integers(0, 3 * _OUT_OF_BAND),
    ),
    max_size=12,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=_sizes)
def test_items_of_every_size_cross_the_inline_and_out_of_band_limits(local: None, sizes: list[int]) -> None:
    p = Producer.options(name="blobs", get_if_exists=True).remote()
    gen = p.blobs.options(_generator_backpressure_num_objects=2).remote(sizes)
    got = zmesh.get(list(gen), timeout=60)
    assert [len(b) for b in got] == sizes
    assert all(b == bytes([k % 251]) * len(b) for k, b in enumerate(got))


@zmesh.remote
class Consumer:
    def total(self, refs: list[zmesh.ObjectRef]) -> int:
        return sum(zmesh.get(refs, timeout=30))

    def consume(self, producer: zmesh.ActorHandle, n: int) -> list[int]:
        return zmesh.get(list(producer.numbers.remote(n)), timeout=30)


def test_a_stream_consumed_from_another_actor_and_its_refs_passed_on(driver: object) -> None:
    p, c = Producer.remote(), Consumer.remote()
    refs = list(p.numbers.remote(200))
    assert zmesh.get(c.total.remote(refs), timeout=30) == sum(range(200))  # items owned by the driver, fetched by c
    assert zmesh.get(c.consume.remote(p, 100), timeout=30) == list(range(100))  # c itself consumes a stream


def test_the_actor_dying_mid_stream_fails_the_next_item_not_the_received_ones(local: None, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    p = Producer.remote()
    gen = p.pause_then.remote(str(gate))
    first = next(gen)
    zmesh.kill(p)
    with pytest.raises(ActorDiedError):
        next(gen)
    assert zmesh.get(first, timeout=30) == 1
