"""A three-stage pipeline that streams items between actors on different nodes.

A reader actor yields records one by one (a generator method: its caller gets an
ObjectRefGenerator and holds record 1 while record 2 is still being made). A parser
actor on a second node calls the reader and yields parsed records as they come, and a
totals actor on a third node calls the parser and sums what it sees: the items travel
from node to node, never through the driver. Each stage runs at most a window of items
ahead of the next, so a slow stage never makes the one before it buffer without bound.

Run it with ``python examples/pipeline.py``: with no mesh around it starts a local one
of three nodes (``zmesh.testing.LocalCluster``), so each stage runs on its own node.
``python examples/pipeline.py HOST:PORT`` uses a running mesh instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import zmesh
from zmesh.testing import LocalCluster
from zmesh.util.scheduling_strategies import NodeAffinitySchedulingStrategy

RECORDS = 20_000


@zmesh.remote
class Reader:
    def records(self, n: int) -> Iterator[str]:
        for i in range(n):
            yield f"{i},sensor-{i % 7},{(i * 37) % 1000 / 10}"


WINDOW = 256  # items a stage may run ahead of the next


@zmesh.remote
class Parser:
    def parse(self, reader: zmesh.ActorHandle, n: int) -> Iterator[tuple[str, float]]:
        for ref in reader.records.options(_generator_backpressure_num_objects=WINDOW).remote(n):
            _, sensor, value = zmesh.get(ref, timeout=60).split(",")
            yield sensor, float(value)


@zmesh.remote
class Totals:
    def consume(self, parser: zmesh.ActorHandle, reader: zmesh.ActorHandle, n: int) -> dict[str, float]:
        totals: dict[str, float] = {}
        for ref in parser.parse.options(_generator_backpressure_num_objects=WINDOW).remote(reader, n):
            sensor, value = zmesh.get(ref, timeout=60)
            totals[sensor] = totals.get(sensor, 0.0) + value
        return totals


def on(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def run() -> None:
    nodes = [n["NodeID"] for n in zmesh.nodes() if n["Alive"]][:3]
    while len(nodes) < 3:
        nodes.append(nodes[-1])  # fewer nodes than stages: some share one
    reader = Reader.options(scheduling_strategy=on(nodes[0])).remote()
    parser = Parser.options(scheduling_strategy=on(nodes[1])).remote()
    totals = Totals.options(scheduling_strategy=on(nodes[2])).remote()

    zmesh.get(totals.consume.remote(parser, reader, 0), timeout=60)  # every stage up before the clock starts
    start = time.perf_counter()
    result = zmesh.get(totals.consume.remote(parser, reader, RECORDS), timeout=300)
    elapsed = time.perf_counter() - start

    expected: dict[str, float] = {}
    for i in range(RECORDS):
        expected[f"sensor-{i % 7}"] = expected.get(f"sensor-{i % 7}", 0.0) + (i * 37) % 1000 / 10
    assert result.keys() == expected.keys() and all(abs(result[k] - expected[k]) < 1e-6 for k in expected), result
    for sensor in sorted(result):
        print(f"{sensor}: {result[sensor]:.1f}")
    print(f"{RECORDS} records through 3 stages on {len(set(nodes))} node(s) in {elapsed:.2f} s: {RECORDS / elapsed:,.0f} records/s")


def main() -> None:
    if len(sys.argv) > 1:
        zmesh.init(address=sys.argv[1])
        run()
        zmesh.shutdown()
        return
    with LocalCluster(nodes=3, num_cpus=2) as cluster:
        cluster.connect()
        run()
        zmesh.shutdown()


if __name__ == "__main__":
    main()
