"""Async actors interleave calls; max_concurrency and concurrency groups run calls side by side."""

import asyncio
import threading
import time

import zmesh


@zmesh.remote
class AsyncFetcher:
    async def fetch(self, url):
        await asyncio.sleep(0.1)
        return url


@zmesh.remote(max_concurrency=4)
class Service:
    def work(self, seconds: float) -> str:
        time.sleep(seconds)
        return threading.current_thread().name


@zmesh.remote(concurrency_groups={"io": 2, "compute": 1})
class Pipeline:
    @zmesh.method(concurrency_group="io")
    def read(self, seconds: float) -> str:
        time.sleep(seconds)
        return "read"

    @zmesh.method(concurrency_group="compute")
    def compute(self, seconds: float) -> str:
        time.sleep(seconds)
        return "computed"


if __name__ == "__main__":
    zmesh.init()
    fetcher = AsyncFetcher.remote()
    start = time.monotonic()
    urls = zmesh.get([fetcher.fetch.remote(f"https://example.com/{i}") for i in range(10)])
    print(f"fetched {len(urls)} urls in {time.monotonic() - start:.2f} s (interleaved)")

    service = Service.remote()
    start = time.monotonic()
    names = zmesh.get([service.work.remote(0.2) for _ in range(4)])
    print(f"4 calls on {len(set(names))} threads in {time.monotonic() - start:.2f} s")

    pipeline = Pipeline.remote()
    print(zmesh.get([pipeline.read.remote(0.1), pipeline.read.remote(0.1), pipeline.compute.remote(0.1)]))
    zmesh.shutdown()
