"""Actor lifecycle: worker processes, kill, restarts, task retries, names, lifetimes, init/shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, pid_alive, run_driver

import zmesh
from zmesh.exceptions import ActorAlreadyExistsError, ActorDiedError, ActorUnavailableError
from zmesh.testing import NodeProcess, wait_for


@zmesh.remote
class Counter:
    def __init__(self, start: int = 0) -> None:
        self.value = start
        self.inits = 1

    def increment(self) -> int:
        self.value += 1
        return self.value

    def get(self) -> int:
        return self.value

    def pid(self) -> int:
        return os.getpid()

    def crash(self) -> None:
        os._exit(1)


@zmesh.remote
class CrashOnce:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def work(self, x: int) -> tuple[int, int]:
        if not os.path.exists(self.marker):
            Path(self.marker).write_text("crashed")
            os._exit(1)
        return x * 2, os.getpid()


@zmesh.remote
class BadInit:
    def __init__(self) -> None:
        raise RuntimeError("constructor exploded: xyzzy-42")

    def ping(self) -> str:
        return "pong"


@zmesh.remote
class Helper:
    def call_increment(self, handle: Any) -> int:
        return zmesh.get(handle.increment.remote(), timeout=20)

    def spawn_and_use(self) -> tuple[int, int, int]:
        child = Counter.options(name="child-of-helper").remote(100)
        first = zmesh.get(child.increment.remote(), timeout=20)
        again = zmesh.get_actor("child-of-helper")
        second = zmesh.get(again.increment.remote(), timeout=20)
        return first, second, zmesh.get(child.pid.remote(), timeout=20)

    def pid(self) -> int:
        return os.getpid()


def _get(ref: Any) -> Any:
    return zmesh.get(ref, timeout=20)


# ---------------------------------------------------------------------- processes and state


def test_each_actor_has_its_own_worker_process(local: None) -> None:
    actors = [Counter.remote() for _ in range(3)]
    pids = _get([a.pid.remote() for a in actors])
    assert len(set(pids)) == 3
    assert os.getpid() not in pids
    assert all(pid_alive(p) for p in pids)
    for a in actors:
        _get(a.increment.remote())
    _get(actors[0].increment.remote())
    assert _get([a.get.remote() for a in actors]) == [2, 1, 1]


# ---------------------------------------------------------------------- kill


def test_kill_is_permanent(local: None) -> None:
    counter = Counter.remote()
    pid = _get(counter.pid.remote())
    assert _get(counter.increment.remote()) == 1
    zmesh.kill(counter)
    with pytest.raises(ActorDiedError):
        _get(counter.increment.remote())
    with pytest.raises(ActorDiedError):
        _get(counter.get.remote())
    wait_for(lambda: not pid_alive(pid), timeout=10, what="the killed worker to exit")


def test_kill_with_restart_reruns_init(local: None) -> None:
    counter = Counter.options(max_restarts=1).remote(5)
    pid = _get(counter.pid.remote())
    assert _get(counter.increment.remote()) == 6
    zmesh.kill(counter, no_restart=False)
    assert _get(counter.get.remote()) == 5  # __init__ ran again: state reset
    assert _get(counter.increment.remote()) == 6
    new_pid = _get(counter.pid.remote())
    assert new_pid != pid
    wait_for(lambda: not pid_alive(pid), timeout=10, what="the old worker to exit")


# ---------------------------------------------------------------------- crashes and restarts


def test_crash_without_restarts_is_final(local: None) -> None:
    counter = Counter.remote()  # max_restarts defaults to 0
    pid = _get(counter.pid.remote())
    _get(counter.increment.remote())
    with pytest.raises(ActorDiedError):
        _get(counter.crash.remote())
    with pytest.raises(ActorDiedError):
        _get(counter.get.remote())
    assert not pid_alive(pid)


def test_crash_restarts_until_max_restarts(local: None) -> None:
    counter = Counter.options(max_restarts=2).remote(10)
    pids = [_get(counter.pid.remote())]
    for _ in range(2):
        assert _get(counter.increment.remote()) == 11
        with pytest.raises(ActorUnavailableError):
            _get(counter.crash.remote())
        assert _get(counter.get.remote()) == 10  # __init__ ran again
        pids.append(_get(counter.pid.remote()))
    assert len(set(pids)) == 3
    with pytest.raises(ActorDiedError):
        _get(counter.crash.remote())  # the third crash is final
    with pytest.raises(ActorDiedError):
        _get(counter.get.remote())
    with pytest.raises(ActorDiedError):
        _get(counter.increment.remote())


def test_unlimited_restarts(local: None) -> None:
    counter = Counter.options(max_restarts=-1).remote()
    pids = {_get(counter.pid.remote())}
    for _ in range(4):
        _get(counter.increment.remote())
        with pytest.raises(ActorUnavailableError):
            _get(counter.crash.remote())
        assert _get(counter.get.remote()) == 0
        pids.add(_get(counter.pid.remote()))
    assert len(pids) == 5


def test_max_task_retries_retries_the_lost_call(local: None, tmp_path: Path) -> None:
    marker = tmp_path / "crashed"
    actor = CrashOnce.options(max_restarts=1, max_task_retries=1).remote(str(marker))
    value, pid = _get(actor.work.remote(21))
    assert value == 42
    assert marker.exists()  # the first attempt did crash the worker
    assert pid != os.getpid()


def test_failing_init_kills_the_actor_with_its_message(local: None) -> None:
    actor = BadInit.remote()
    with pytest.raises(ActorDiedError, match="xyzzy-42"):
        _get(actor.ping.remote())
    with pytest.raises(ActorDiedError, match="xyzzy-42"):
        _get(actor.ping.remote())


# ---------------------------------------------------------------------- named actors


def test_names_are_unique_per_namespace(local: None) -> None:
    first = Counter.options(name="dup").remote()
    _get(first.increment.remote())
    with pytest.raises(ActorAlreadyExistsError) as info:
        Counter.options(name="dup").remote()
    assert isinstance(info.value, ValueError)
    # The same name in another namespace is a different actor.
    other = Counter.options(name="dup", namespace="elsewhere").remote(50)
    assert _get(other.increment.remote()) == 51
    assert _get(zmesh.get_actor("dup").get.remote()) == 1
    assert _get(zmesh.get_actor("dup", namespace="elsewhere").get.remote()) == 51
    with pytest.raises(ActorAlreadyExistsError):
        Counter.options(name="dup", namespace="elsewhere").remote()


def test_get_if_exists_returns_the_live_actor(local: None) -> None:
    first = Counter.options(name="shared").remote()
    _get(first.increment.remote())
    _get(first.increment.remote())
    same = Counter.options(name="shared", get_if_exists=True).remote(1000)
    assert _get(same.get.remote()) == 2
    assert _get(same.pid.remote()) == _get(first.pid.remote())
    fresh = Counter.options(name="fresh", get_if_exists=True).remote(7)
    assert _get(fresh.get.remote()) == 7


def test_name_is_free_once_its_actor_is_dead(local: None) -> None:
    first = Counter.options(name="reused").remote()
    _get(first.increment.remote())
    zmesh.kill(first)
    with pytest.raises(ValueError):
        zmesh.get_actor("reused")
    second = Counter.options(name="reused").remote(20)
    assert _get(second.get.remote()) == 20
    assert _get(zmesh.get_actor("reused").increment.remote()) == 21


def test_get_actor_of_unknown_name_raises(local: None) -> None:
    with pytest.raises(ValueError, match="nobody"):
        zmesh.get_actor("nobody")
    Counter.options(name="somebody", namespace="ns-a").remote()
    with pytest.raises(ValueError):
        zmesh.get_actor("somebody")  # it lives in another namespace


# ---------------------------------------------------------------------- lifetimes


def test_detached_actor_outlives_its_creator(driver: NodeProcess) -> None:
    code = textwrap.dedent(
        """
        import zmesh

        @zmesh.remote
        class Counter:
            def __init__(self):
                self.value = 0
            def increment(self):
                self.value += 1
                return self.value
            def get(self):
                return self.value

        zmesh.init(address="auto")
        c = Counter.options(name="c", lifetime="detached").remote()
        print(zmesh.get([c.increment.remote() for _ in range(3)], timeout=20))
        """
    )
    result = run_driver(code)
    assert result.returncode == 0, result.stderr
    assert "[1, 2, 3]" in result.stdout
    counter = zmesh.get_actor("c")
    assert _get(counter.get.remote()) == 3
    assert _get(counter.increment.remote()) == 4
    zmesh.kill(counter)
    with pytest.raises(ValueError):
        zmesh.get_actor("c")


def test_non_detached_actor_dies_with_its_creator(driver: NodeProcess) -> None:
    code = textwrap.dedent(
        """
        import os, sys, threading
        import zmesh

        @zmesh.remote
        class Owned:
            def pid(self):
                return os.getpid()

        zmesh.init(address="auto")
        a = Owned.options(name="owned").remote()
        print(zmesh.get(a.pid.remote(), timeout=20), flush=True)
        threading.Event().wait(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip().isdigit(), proc.stderr.read() if proc.stderr else line
        worker_pid = int(line)
        assert pid_alive(worker_pid)
        assert _get(zmesh.get_actor("owned").pid.remote()) == worker_pid
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: not pid_alive(worker_pid), timeout=10, what="the orphaned actor's worker to exit")

        def name_gone() -> bool:
            try:
                zmesh.get_actor("owned")
            except ValueError:
                return True
            return False

        wait_for(name_gone, timeout=10, what="the orphaned actor's name to be released")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


# ---------------------------------------------------------------------- init / shutdown


def test_init_after_shutdown_embedded() -> None:
    assert not zmesh.is_initialized()
    zmesh.init(num_cpus=2)
    assert zmesh.is_initialized()
    assert _get(Counter.remote(1).increment.remote()) == 2
    zmesh.shutdown()
    assert not zmesh.is_initialized()
    zmesh.init(num_cpus=2)
    assert zmesh.is_initialized()
    assert _get(Counter.remote(2).increment.remote()) == 3
    zmesh.shutdown()
    assert not zmesh.is_initialized()


def test_init_after_shutdown_with_daemon(node: NodeProcess) -> None:
    zmesh.init(address="auto")
    first = Counter.options(name="round1", lifetime="detached").remote()
    assert _get(first.increment.remote()) == 1
    zmesh.shutdown()
    assert not zmesh.is_initialized()
    zmesh.init(address="auto")
    assert zmesh.is_initialized()
    assert _get(zmesh.get_actor("round1").increment.remote()) == 2
    assert _get(Counter.remote().increment.remote()) == 1
    zmesh.shutdown()


def test_second_init_raises_unless_ignored(local: None) -> None:
    with pytest.raises(RuntimeError):
        zmesh.init()
    info = zmesh.init(ignore_reinit_error=True)
    assert isinstance(info, dict)
    assert zmesh.is_initialized()
    assert _get(Counter.remote().increment.remote()) == 1


# ---------------------------------------------------------------------- actors using actors


def test_handles_passed_to_other_actors(local: None) -> None:
    counter = Counter.remote()
    helpers = [Helper.remote() for _ in range(2)]
    assert sorted(_get([h.call_increment.remote(counter) for h in helpers])) == [1, 2]
    assert _get(counter.get.remote()) == 2


def test_actor_creates_and_looks_up_actors(local: None) -> None:
    helper = Helper.remote()
    first, second, child_pid = _get(helper.spawn_and_use.remote())
    assert (first, second) == (101, 102)
    assert child_pid not in (os.getpid(), _get(helper.pid.remote()))
    assert _get(zmesh.get_actor("child-of-helper").get.remote()) == 102
