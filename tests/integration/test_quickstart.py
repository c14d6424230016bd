"""The actors page's own examples, run as written (with ray replaced by zmesh)."""

from __future__ import annotations

import asyncio
import time

import zmesh


@zmesh.remote
class Counter:
    def __init__(self, start: int = 0):
        self.value = start

    def increment(self) -> int:
        self.value += 1
        return self.value

    def get(self) -> int:
        return self.value


def test_counter_prints_15(local: None) -> None:
    counter = Counter.remote(10)
    assert zmesh.get([counter.increment.remote() for _ in range(5)], timeout=30) == [11, 12, 13, 14, 15]
    assert zmesh.get(counter.get.remote(), timeout=30) == 15


def test_calls_run_in_submission_order(local: None) -> None:
    counter = Counter.remote()
    refs = [counter.increment.remote() for _ in range(500)]
    assert zmesh.get(refs, timeout=30) == list(range(1, 501))


def test_named_detached_actor_found_by_name(local: None) -> None:
    counter = Counter.options(name="global_counter", lifetime="detached").remote()
    zmesh.get(counter.increment.remote(), timeout=30)
    again = zmesh.get_actor("global_counter")
    assert zmesh.get(again.get.remote(), timeout=30) == 1


def test_async_actor_interleaves(local: None) -> None:
    @zmesh.remote
    class AsyncFetcher:
        async def fetch(self, url):
            await asyncio.sleep(0.5)
            return url

    fetcher = AsyncFetcher.remote()
    zmesh.get(fetcher.fetch.remote("warm"), timeout=30)
    start = time.monotonic()
    urls = [f"u{i}" for i in range(20)]
    assert zmesh.get([fetcher.fetch.remote(u) for u in urls], timeout=30) == urls
    # Twenty 0.5 s sleeps that interleave finish long before 20 * 0.5 s.
    assert time.monotonic() - start < 5


def test_max_concurrency_service(local: None) -> None:
    import threading

    @zmesh.remote(max_concurrency=4)
    class Service:
        def __init__(self):
            self.inside = 0
            self.peak = 0
            self.lock = threading.Lock()
            self.gate = threading.Barrier(4, timeout=10)

        def work(self):
            with self.lock:
                self.inside += 1
                self.peak = max(self.peak, self.inside)
            self.gate.wait()  # only passes if 4 calls run at once
            with self.lock:
                self.inside -= 1
            return self.peak

    service = Service.remote()
    assert max(zmesh.get([service.work.remote() for _ in range(4)], timeout=30)) == 4


def test_kill(local: None) -> None:
    counter = Counter.remote()
    zmesh.get(counter.increment.remote(), timeout=30)
    zmesh.kill(counter)
    try:
        zmesh.get(counter.increment.remote(), timeout=10)
    except zmesh.exceptions.ActorDiedError:
        pass
    else:
        raise AssertionError("a killed actor answered")
