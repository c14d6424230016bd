"""Plain regression tests for bugs found in tasks: each failed before its fix."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

import zmesh
from zmesh.testing import LocalCluster


@zmesh.remote
def nap(seconds: float) -> tuple[float, float, str]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time(), zmesh.get_runtime_context().get_node_id()


def most_at_once(spans: list[tuple[float, float, str]]) -> int:
    events = sorted([(a, 1) for a, _, _ in spans] + [(b, -1) for _, b, _ in spans])
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(nodes=3, num_cpus=2) as c:
        c.connect()
        try:
            yield c
        finally:
            zmesh.shutdown()


@pytest.mark.timeout(90)
def test_spillback_right_after_a_batch_uses_every_member(cluster: LocalCluster) -> None:
    """A node whose leases went back did not publish its freed CPUs: the next batch stayed on two nodes (found by make bench-mesh)."""
    for _ in range(3):
        spans = zmesh.get([nap.remote(0.4) for _ in range(12)], timeout=60)
        assert most_at_once(spans) == 6
        assert len({node for *_, node in spans}) == 3


@zmesh.remote
def where_after(seconds: float) -> str:
    time.sleep(seconds)
    return zmesh.get_runtime_context().get_node_id()


@pytest.mark.timeout(90)
def test_spread_tasks_submitted_one_after_another_land_on_every_member(cluster: LocalCluster) -> None:
    """SPREAD tasks submitted one after another, each while the one before runs, land on every member.

    The task tests saw them pile up two to a node while members published their freed or reserved CPUs late
    (fixed above); SPREAD now also counts each member's task leases with its actors.
    """
    spread = where_after.options(scheduling_strategy="SPREAD")
    for _ in range(3):
        refs = []
        for _ in range(3):
            refs.append(spread.remote(1.0))
            # The previous one has its lease before the next is submitted: what made them pile up.
            zmesh.wait([refs[-1]], timeout=0.15)
        assert len(set(zmesh.get(refs, timeout=60))) == 3
