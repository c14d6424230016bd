"""Plain regression tests for bugs found in tasks: each failed before its fix."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

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
    (fixed above). Counting each member's task leases with its actors made it worse: the caller's idle leases of
    other shapes, lingering, pushed SPREAD away from their nodes; it ranks by actors, CPU load and recent placements.
    """
    spread = where_after.options(scheduling_strategy="SPREAD")
    for _ in range(3):
        refs = []
        for _ in range(3):
            refs.append(spread.remote(1.0))
            # The previous one has its lease before the next is submitted: what made them pile up.
            zmesh.wait([refs[-1]], timeout=0.15)
        assert len(set(zmesh.get(refs, timeout=60))) == 3


@zmesh.remote
class Mailbox:
    def __init__(self) -> None:
        self.refs: list[Any] | None = None

    def put(self, refs: list[Any]) -> None:
        self.refs = refs

    def take(self) -> list[Any] | None:
        return self.refs


@zmesh.remote
def same(x: int) -> int:
    return x


@zmesh.remote
def waits_for_a_later_task(mailbox: Any) -> int:
    deadline = time.monotonic() + 20
    while (refs := zmesh.get(mailbox.take.remote(), timeout=10)) is None:
        assert time.monotonic() < deadline, "the ref never came"
        time.sleep(0.005)
    result: int = zmesh.get(refs[0], timeout=10)
    return result


@pytest.mark.timeout(60)
def test_a_task_waiting_for_one_queued_behind_it_on_its_worker_does_not_deadlock() -> None:
    """Quick tasks let a lease keep many in flight; a task sent behind one that waits for it sat in that worker's
    socket until the wait timed out. The waiting task now gives back what is queued behind it (found by the torture test)."""
    zmesh.init(num_cpus=4)
    try:
        whole = same.options(num_cpus=4)  # one lease holds the node: everything of this shape goes to one worker
        mailbox = Mailbox.remote()
        for _ in range(3):
            assert zmesh.get([whole.remote(i) for i in range(128)], timeout=30) == list(range(128))  # deep pipelining
            waiter = waits_for_a_later_task.options(num_cpus=4).remote(mailbox)
            later = whole.remote(7)  # sent to the same worker, behind the waiter
            mailbox.put.remote([later])
            assert zmesh.get(waiter, timeout=30) == 7
            zmesh.get(mailbox.put.remote(None), timeout=10)
    finally:
        zmesh.shutdown()


@zmesh.remote
def waits_for_the_mailbox(mailbox: Any) -> str:
    deadline = time.monotonic() + 20
    while zmesh.get(mailbox.take.remote(), timeout=10) is None:
        assert time.monotonic() < deadline, "the mailbox stayed empty"
        time.sleep(0.005)
    return "done"


@zmesh.remote
def fresh(x: int) -> int:
    return x + 1


@pytest.mark.timeout(60)
def test_tasks_given_back_keep_their_function_and_their_cancel() -> None:
    """Two bugs of tasks given back by a waiting task (found by the torture test): the first task of a function carries
    its code, and the worker never kept it, so later tasks of it failed there ("never sent to this worker"); and a task
    cancelled while it was away was dropped, never ended."""
    zmesh.init(num_cpus=4)
    try:
        mailbox = Mailbox.remote()
        whole = same.options(num_cpus=4)
        assert zmesh.get([whole.remote(i) for i in range(128)], timeout=30) == list(range(128))  # deep pipelining
        waiter = waits_for_the_mailbox.options(num_cpus=4).remote(mailbox)
        first = fresh.options(num_cpus=4).remote(1)  # behind the waiter, with fresh's code: given back
        doomed = whole.remote(0)  # behind it too, cancelled while it is away
        zmesh.cancel(doomed)
        with pytest.raises(zmesh.exceptions.TaskCancelledError):
            zmesh.get(doomed, timeout=20)
        assert zmesh.get(first, timeout=20) == 2
        mailbox.put.remote(["go"])
        assert zmesh.get(waiter, timeout=20) == "done"
        # The waiter's worker gets fresh's tasks again, without its code now.
        assert zmesh.get([fresh.options(num_cpus=4).remote(i) for i in range(200)], timeout=30) == [i + 1 for i in range(200)]
    finally:
        zmesh.shutdown()


def test_the_first_remote_calls_of_a_function_and_a_class_from_many_threads_at_once(local: None) -> None:
    """The code was made once, in three assignments: a thread racing the first one read a half-made entry (KeyError:
    'path'; found by the task torture test). Fresh function and class objects, so each round races a first use; the
    old window was a few bytecodes wide, so this does not catch it every time (the torture test did, from drivers)."""
    for _ in range(5):
        race_first_use()


def race_first_use() -> None:
    def double(x: int) -> int:
        return 2 * x

    class Box:
        def get(self, x: int) -> int:
            return x

    fn, cls = zmesh.remote(double), zmesh.remote(Box)
    refs: list[Any] = []
    errors: list[BaseException] = []
    gate = threading.Barrier(8)

    def use(i: int) -> None:
        try:
            gate.wait(timeout=10)
            refs.append(fn.remote(i) if i % 2 else cls.remote().get.remote(i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=use, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors, errors
    assert sorted(zmesh.get(refs, timeout=30)) == sorted(2 * i if i % 2 else i for i in range(8))
