"""Remote functions (tasks) on one real `zmesh node` daemon: results, inputs, errors, CPU limits, retries, cancel.

Parallelism is measured, not timed: each task returns when it started and ended (the host's monotonic
clock, shared by every process) and the test counts how many ran at once. A task that must still be
running while the test acts on it waits for a gate file, with a deadline, and says it started with a
file of its own.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import node_with_driver
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zmesh
from zmesh.api import _status
from zmesh.exceptions import GetTimeoutError, TaskCancelledError, TaskError, WorkerCrashedError
from zmesh.testing import NodeProcess, wait_for

pytestmark = pytest.mark.timeout(60)

GATE_S = 20.0  # how long a task waits for its gate before giving up (a test failing, not a hang)


# ---------------------------------------------------------------------------- remote functions


@zmesh.remote
def add(a: int, b: int = 0) -> int:
    return a + b


@zmesh.remote
def echo(x: Any) -> Any:
    return x


@zmesh.remote
def size_of(x: bytes) -> tuple[int, bytes]:
    return len(x), x


@zmesh.remote
def spread_out(n: int) -> Any:
    return tuple(range(n)) if n != 1 else 0


@zmesh.remote
def touch(path: str) -> None:
    Path(path).touch()


@zmesh.remote
def kinds_and_values(xs: list[Any]) -> tuple[list[str], list[Any]]:
    return [type(x).__name__ for x in xs], zmesh.get(xs, timeout=20)


@zmesh.remote
def fail(message: str) -> None:
    raise ValueError(message)


@zmesh.remote
def pass_on(x: Any, marker: str) -> Any:
    Path(marker).touch()  # only a task that ran leaves it
    return x


@zmesh.remote
def task_id() -> str | None:
    return zmesh.get_runtime_context().get_task_id()


@zmesh.remote
def gated(gate: str, started: str | None = None, value: Any = None) -> Any:
    """Says it started (``started``), then waits for ``gate`` to exist; returns ``value``."""
    if started:
        Path(started).write_text(str(os.getpid()))
    deadline = time.monotonic() + GATE_S
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} never opened")
        time.sleep(0.01)
    return value


@zmesh.remote
def hold(folder: str, peers: int) -> tuple[float, float]:
    """Runs until ``peers`` tasks run at once (or a deadline), so overlap shows; returns (start, end)."""
    start = time.monotonic()
    mark = Path(folder) / f"{os.getpid()}-{start}"
    mark.touch()
    deadline = start + 5.0
    while len(os.listdir(folder)) < peers and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    mark.unlink()
    return start, time.monotonic()


@zmesh.remote
def nest(depth: int) -> int:
    """Waits in get for a task one level deeper: on a 1-CPU node only lent CPUs let the deeper ones run."""
    if depth == 0:
        return 0
    return 1 + int(zmesh.get(nest.remote(depth - 1), timeout=30))


@zmesh.remote
def fan_out(n: int) -> int:
    return sum(zmesh.get([add.remote(i, 1) for i in range(n)], timeout=30))


@zmesh.remote
class Counter:
    def __init__(self) -> None:
        self.value = 0

    def add(self, n: int) -> int:
        self.value += n
        return self.value


@zmesh.remote
def bump(counter: Any, n: int) -> int:
    return int(zmesh.get(counter.add.remote(n), timeout=20))


@zmesh.remote
def die_once(marker: str) -> int:
    """SIGKILLs its own worker the first time (the marker says which time it is), then returns its pid."""
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


@zmesh.remote
def raise_first(log: str, error: str) -> str:
    """Counts its runs in ``log``; raises ``error`` (a builtin's name) on the first."""
    with open(log, "a") as f:
        f.write("x")
    if Path(log).read_text() == "x":
        raise {"ValueError": ValueError, "KeyError": KeyError}[error]("first run")
    return "ok"


@zmesh.remote
def pid_then_sleep(started: str) -> None:
    Path(started).write_text(str(os.getpid()))
    deadline = time.monotonic() + GATE_S
    while time.monotonic() < deadline:
        time.sleep(0.01)


@zmesh.remote
def pid() -> int:
    return os.getpid()


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def one_cpu(isolated_run_dir: Path) -> Iterator[NodeProcess]:
    yield from node_with_driver(isolated_run_dir, "--num-cpus", "1")


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """How many of ``intervals`` were open at once at most (an end and a start at the same instant do not overlap)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_max_overlap_counts_intervals_open_at_once() -> None:
    assert max_overlap([(0, 1), (1, 2)]) == 1
    assert max_overlap([(0, 3), (1, 2), (1.5, 4), (3.5, 5)]) == 3
    assert max_overlap([]) == 0


# ---------------------------------------------------------------------------- results and inputs


def test_basic_task_kwargs_and_many_returns(driver: NodeProcess, tmp_path: Path) -> None:
    assert zmesh.get(add.remote(1, 2), timeout=20) == 3
    assert zmesh.get(add.remote(a=5, b=6), timeout=20) == 11
    assert zmesh.get(add.remote(7), timeout=20) == 7
    refs = spread_out.options(num_returns=3).remote(3)
    assert isinstance(refs, list) and len(refs) == 3
    assert zmesh.get(refs, timeout=20) == [0, 1, 2]
    marker = tmp_path / "ran"
    assert touch.options(num_returns=0).remote(str(marker)) is None
    wait_for(marker.exists, 20, what="a num_returns=0 task to run")


def test_options_override_and_keep_the_original(driver: NodeProcess) -> None:
    named = task_id.options(name="my-task", num_cpus=0.5, max_retries=0)
    assert zmesh.get(named.remote(), timeout=20) is not None
    three = spread_out.options(num_returns=3)
    assert zmesh.get(three.remote(3), timeout=20) == [0, 1, 2]
    assert zmesh.get(spread_out.remote(1), timeout=20) == 0  # the original keeps num_returns=1
    decorated = zmesh.remote(num_returns=2, num_cpus=2)(lambda: (1, 2))
    assert zmesh.get(decorated.remote(), timeout=20) == [1, 2]


def test_ref_inputs_top_level_resolved_nested_passed_as_refs(driver: NodeProcess) -> None:
    first = add.remote(1, 1)
    assert zmesh.get(add.remote(first, b=add.remote(10)), timeout=20) == 12
    put = zmesh.put("stored")
    assert zmesh.get(echo.remote(put), timeout=20) == "stored"
    names, values = zmesh.get(kinds_and_values.remote([first, put]), timeout=20)
    assert names == ["ObjectRef", "ObjectRef"]
    assert values == [2, "stored"]


def test_error_of_the_first_of_three_chained_tasks_is_raised_by_the_last(driver: NodeProcess, tmp_path: Path) -> None:
    second, third = tmp_path / "second", tmp_path / "third"
    last = pass_on.remote(pass_on.remote(fail.remote("boom at the start"), str(second)), str(third))
    with pytest.raises(TaskError, match="boom at the start") as info:
        zmesh.get(last, timeout=20)
    assert isinstance(info.value, ValueError)  # the user's class still catches it
    assert not second.exists() and not third.exists()  # a failed input fails its task before it is sent


def test_wait_over_task_refs(driver: NodeProcess, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    slow = gated.remote(str(gate), value="slow")
    quick = [add.remote(i) for i in range(3)]
    ready, not_ready = zmesh.wait([slow, *quick], num_returns=3, timeout=20)
    assert ready == quick and not_ready == [slow]
    ready, not_ready = zmesh.wait([slow], timeout=0.2)
    assert (ready, not_ready) == ([], [slow])
    gate.touch()
    ready, _ = zmesh.wait([slow], timeout=20)
    assert ready == [slow] and zmesh.get(slow, timeout=5) == "slow"


def test_task_id_inside_a_task_and_none_in_the_driver(driver: NodeProcess) -> None:
    assert zmesh.get_runtime_context().get_task_id() is None
    ids = zmesh.get([task_id.remote() for _ in range(5)], timeout=20)
    assert all(isinstance(i, str) and i for i in ids)
    assert len(set(ids)) == 5


def test_actor_handles_passed_to_tasks_which_call_the_actor(driver: NodeProcess) -> None:
    counter = Counter.remote()
    totals = zmesh.get([bump.remote(counter, 1) for _ in range(10)], timeout=30)
    assert sorted(totals) == list(range(1, 11))
    assert zmesh.get(counter.add.remote(0), timeout=20) == 10


def test_tasks_submit_tasks(driver: NodeProcess) -> None:
    assert zmesh.get(fan_out.remote(20), timeout=30) == sum(range(1, 21))
    assert zmesh.get([fan_out.remote(5) for _ in range(3)], timeout=30) == [15, 15, 15]


# ---------------------------------------------------------------------------- CPUs


def test_a_four_cpu_node_runs_four_one_cpu_tasks_at_a_time(driver: NodeProcess, tmp_path: Path) -> None:
    intervals = zmesh.get([hold.remote(str(tmp_path), 4) for _ in range(8)], timeout=40)
    assert max_overlap(intervals) == 4


def test_two_cpu_tasks_on_a_four_cpu_node_run_two_at_a_time(driver: NodeProcess, tmp_path: Path) -> None:
    intervals = zmesh.get([hold.options(num_cpus=2).remote(str(tmp_path), 2) for _ in range(4)], timeout=40)
    assert max_overlap(intervals) == 2


def test_nested_tasks_three_deep_on_one_cpu_do_not_deadlock(one_cpu: NodeProcess) -> None:
    # Each level waits in get for the next: without the CPU lent back, the second could never start.
    assert zmesh.get(nest.remote(3), timeout=40) == 3
    tasks = _status()["tasks"]
    assert tasks["waiting"] == []


# ---------------------------------------------------------------------------- retries


def test_a_task_whose_worker_is_killed_runs_again(driver: NodeProcess, tmp_path: Path) -> None:
    marker = tmp_path / "died"
    second = zmesh.get(die_once.remote(str(marker)), timeout=30)
    first = int(marker.read_text())
    assert second != first
    wait_for(lambda: not _pid_alive(first), 10, what="the killed worker to be gone")


def test_no_retries_left_fails_with_worker_crashed(driver: NodeProcess, tmp_path: Path) -> None:
    with pytest.raises(WorkerCrashedError):
        zmesh.get(die_once.options(max_retries=0).remote(str(tmp_path / "died")), timeout=30)
    assert zmesh.get(add.remote(1, 1), timeout=20) == 2  # the node goes on


def test_retry_exceptions(driver: NodeProcess, tmp_path: Path) -> None:
    by_default = tmp_path / "default"
    with pytest.raises(TaskError, match="first run"):
        zmesh.get(raise_first.remote(str(by_default), "ValueError"), timeout=20)
    assert by_default.read_text() == "x"  # application errors are not retried unless asked

    every = tmp_path / "every"
    assert zmesh.get(raise_first.options(retry_exceptions=True).remote(str(every), "KeyError"), timeout=20) == "ok"
    assert every.read_text() == "xx"

    listed = raise_first.options(retry_exceptions=[ValueError])
    retried, not_retried = tmp_path / "retried", tmp_path / "not-retried"
    assert zmesh.get(listed.remote(str(retried), "ValueError"), timeout=20) == "ok"
    assert retried.read_text() == "xx"
    with pytest.raises(KeyError):
        zmesh.get(listed.remote(str(not_retried), "KeyError"), timeout=20)
    assert not_retried.read_text() == "x"


# ---------------------------------------------------------------------------- cancel


def test_cancel_a_task_waiting_for_an_input_that_never_comes(driver: NodeProcess) -> None:
    never = echo.options(resources={"nowhere": 1}).remote(1)
    dependent = add.remote(never, 1)
    zmesh.cancel(dependent)
    with pytest.raises(TaskCancelledError):
        zmesh.get(dependent, timeout=20)
    zmesh.cancel(never)  # queued for a lease the node cannot grant: the request is withdrawn too
    with pytest.raises(TaskCancelledError):
        zmesh.get(never, timeout=20)
    wait_for(lambda: _status()["tasks"]["waiting"] == [], 10, what="the lease request to be withdrawn")


def test_cancel_a_task_queued_behind_a_full_node(driver: NodeProcess, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    started = [tmp_path / f"started-{i}" for i in range(4)]
    busy = [gated.remote(str(gate), str(s), i) for i, s in enumerate(started)]
    wait_for(lambda: all(s.exists() for s in started), 20, what="four tasks to fill the node")
    never_ran = tmp_path / "never"
    queued = touch.remote(str(never_ran))

    def one_request_waits() -> bool:
        tasks = _status()["tasks"]
        return tasks["granted"] == 4 and len(tasks["waiting"]) == 1 and tasks["waiting"][0]["demand"] == {"CPU": 1.0}

    wait_for(one_request_waits, 10, what="four leases granted and the fifth task's request waiting in status")
    zmesh.cancel(queued)
    wait_for(lambda: _status()["tasks"]["waiting"] == [], 10, what="the cancelled task's request to be withdrawn")
    gate.touch()
    assert zmesh.get(busy, timeout=20) == [0, 1, 2, 3]
    with pytest.raises(TaskCancelledError):
        zmesh.get(queued, timeout=20)
    assert zmesh.get(add.remote(2, 2), timeout=20) == 4  # the CPUs are free again
    assert not never_ran.exists()


def test_cancel_a_running_task_interrupts_it_and_keeps_its_worker(driver: NodeProcess, tmp_path: Path) -> None:
    started = tmp_path / "started"
    ref = pid_then_sleep.remote(str(started))
    wait_for(started.exists, 20, what="the task to start")
    worker = int(started.read_text())
    zmesh.cancel(ref)
    with pytest.raises(TaskCancelledError):
        zmesh.get(ref, timeout=10)
    assert _pid_alive(worker)


def test_force_cancel_kills_the_worker(driver: NodeProcess, tmp_path: Path) -> None:
    started = tmp_path / "started"
    ref = pid_then_sleep.remote(str(started))
    wait_for(started.exists, 20, what="the task to start")
    worker = int(started.read_text())
    zmesh.cancel(ref, force=True)
    with pytest.raises(TaskCancelledError):
        zmesh.get(ref, timeout=10)
    wait_for(lambda: not _pid_alive(worker), 10, what="the worker to be killed")
    assert zmesh.get(add.remote(3), timeout=20) == 3


def test_cancel_a_finished_task_does_nothing(driver: NodeProcess) -> None:
    ref = add.remote(40, 2)
    assert zmesh.get(ref, timeout=20) == 42
    zmesh.cancel(ref)
    zmesh.cancel(ref, force=True)
    assert zmesh.get(ref, timeout=5) == 42


# ---------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_named_errors(driver: NodeProcess) -> None:
    lock = threading.Lock()

    def holds_a_lock() -> Any:
        return lock

    unpicklable = zmesh.remote(holds_a_lock)
    with pytest.raises(TypeError, match="holds_a_lock"):
        unpicklable.remote()
    with pytest.raises(TypeError, match="add"):
        add.remote(1, 2, 3)
    with pytest.raises(TypeError, match="add"):
        add.remote(c=1)
    with pytest.raises(TypeError, match=r"add\.remote\(\)"):
        add(1, 2)
    with pytest.raises(ValueError, match="no_such_option"):
        add.options(no_such_option=1)
    with pytest.raises(ValueError, match="no_such_option"):
        zmesh.remote(no_such_option=1)(lambda: None)
    with pytest.raises(ValueError, match="num_returns"):
        add.options(num_returns=-1)


def test_num_returns_mismatch_names_both_counts(driver: NodeProcess) -> None:
    refs = spread_out.options(num_returns=2).remote(3)
    for ref in refs:
        with pytest.raises(TaskError, match=r"num_returns=2.*returned 3"):
            zmesh.get(ref, timeout=20)


def test_an_infeasible_task_waits_shows_in_status_and_warns(driver: NodeProcess) -> None:
    ref = echo.options(resources={"unobtainium": 1}).remote("never")
    with pytest.raises(GetTimeoutError):
        zmesh.get(ref, timeout=0.5)

    def waiting() -> list[dict[str, Any]]:
        return [w for w in _status()["tasks"]["waiting"] if w["demand"].get("unobtainium") == 1]

    assert wait_for(waiting, 10, what="the infeasible task in status")
    wait_for(lambda: "unobtainium" in driver.output_so_far(), 10, what="a warning in the node's log")
    assert "WARNING" in driver.output_so_far()
    zmesh.cancel(ref)
    wait_for(lambda: not waiting(), 10, what="the cancelled request to leave status")


# ---------------------------------------------------------------------------- thresholds (hypothesis)

SIZES = st.one_of(
    st.sampled_from([0, 8 * 1024 - 64, 8 * 1024, 8 * 1024 + 1, 64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1]),
    st.integers(0, 200_000),
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(SIZES)
def test_arguments_and_results_around_the_inline_and_out_of_band_limits(driver: NodeProcess, size: int) -> None:
    data = os.urandom(size)
    assert zmesh.get(size_of.remote(data), timeout=20) == (size, data)
    assert zmesh.get(echo.remote(zmesh.put(data)), timeout=20) == data


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.sampled_from([1, 511, 512, 513, 2000]), st.integers(1, 2000)))
def test_task_counts_across_the_batch_limit_and_pipelining_depth(driver: NodeProcess, count: int) -> None:
    assert zmesh.get([add.remote(i, 1) for i in range(count)], timeout=30) == list(range(1, count + 1))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 5))
def test_num_returns_zero_to_five(driver: NodeProcess, tmp_path: Path, n: int) -> None:
    if n == 0:
        marker = tmp_path / f"zero-{os.urandom(4).hex()}"
        assert touch.options(num_returns=0).remote(str(marker)) is None
        wait_for(marker.exists, 20, what="a num_returns=0 task to run")
        return
    refs = spread_out.options(num_returns=n).remote(n)
    values = zmesh.get(refs if n > 1 else [refs], timeout=20)
    assert values == (list(range(n)) if n > 1 else [0])
