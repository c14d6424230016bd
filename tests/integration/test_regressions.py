"""Regression tests for defects found by trying ordinary workloads; each failed before its fix."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import run_driver

import zmesh
import zmesh.runtime
import zmesh.testing
from zmesh.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, NodeUnavailableError
from zmesh.testing import NodeProcess
from zmesh.transport import rundir


@zmesh.remote
class Echo:
    def echo(self, value: Any) -> Any:
        return value

    def shout(self, size: int) -> int:
        print("y" * size)
        return size


# --- frames of 64 KiB or more (a batch header, a long log line) were dropped as malformed


@pytest.mark.timeout(60)
def test_a_thousand_pipelined_small_calls_make_a_header_over_64_kib(local: None) -> None:
    a = Echo.remote()
    refs = [a.echo.remote(b"x" * 100) for _ in range(1000)]
    assert zmesh.get(refs, timeout=30) == [b"x" * 100] * 1000


@pytest.mark.timeout(60)
def test_calls_queued_before_the_actor_is_up(local: None) -> None:
    a = Echo.remote()
    text = "s" * 1000
    assert zmesh.get([a.echo.remote(text) for _ in range(70)], timeout=30) == [text] * 70


@pytest.mark.timeout(60)
def test_pipelined_7_kb_arguments(local: None) -> None:
    a = Echo.remote()
    zmesh.get(a.echo.remote(None), timeout=30)
    value = b"k" * 7000
    assert zmesh.get([a.echo.remote(value) for _ in range(12)], timeout=30) == [value] * 12


@pytest.mark.timeout(60)
def test_sync_calls_from_16_threads_with_7_kb_arguments(local: None) -> None:
    a = Echo.remote()
    value = b"t" * 7000
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            for _ in range(20):
                assert zmesh.get(a.echo.remote(value), timeout=30) == value
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


@pytest.mark.timeout(60)
def test_a_threaded_actor_prints_a_line_over_64_kib(local: None, capfd: pytest.CaptureFixture[str]) -> None:
    a = Echo.options(max_concurrency=2).remote()
    assert zmesh.get(a.shout.remote(70_000), timeout=30) == 70_000
    zmesh.testing.wait_for(lambda: "y" * 70_000 in capfd.readouterr().out, timeout=10, what="the long line")


# --- large arguments, put values and returned arrays are snapshots


@zmesh.remote
class Holder:
    def __init__(self) -> None:
        import numpy as np

        self.arr = np.zeros(100_000, dtype=np.int64)

    def total(self, arr: Any) -> int:
        return int(arr.sum())

    def current(self) -> Any:
        return self.arr

    def bump(self) -> None:
        self.arr += 1


@pytest.mark.timeout(60)
def test_changing_an_array_after_remote_does_not_change_the_call(local: None) -> None:
    np = pytest.importorskip("numpy")
    h = Holder.remote()
    arr = np.ones(100_000, dtype=np.int64)
    refs = []
    for _ in range(20):
        refs.append(h.total.remote(arr))
        arr += 1  # the caller may change its array at once
    assert zmesh.get(refs, timeout=30) == [100_000 * (i + 1) for i in range(20)]


@pytest.mark.timeout(60)
def test_a_put_value_is_a_read_only_snapshot(local: None) -> None:
    np = pytest.importorskip("numpy")
    arr = np.arange(100_000)
    ref = zmesh.put(arr)
    arr[:] = 0
    got = zmesh.get(ref, timeout=30)
    assert int(got.sum()) == sum(range(100_000))
    with pytest.raises(ValueError, match="read-only"):
        got[0] = 42
    assert int(zmesh.get(ref, timeout=30)[0]) == 0 and int(zmesh.get(ref, timeout=30).sum()) == sum(range(100_000))


@pytest.mark.timeout(60)
def test_a_returned_array_is_not_changed_by_the_next_call(local: None) -> None:
    pytest.importorskip("numpy")
    h = Holder.remote()
    refs = []
    for _ in range(10):
        refs.append(h.current.remote())
        h.bump.remote()
    for i, arr in enumerate(zmesh.get(refs, timeout=30)):
        assert int(arr.min()) == int(arr.max()) == i


# --- the node and its zygote never block on each other; the node's workers follow its zygote


@zmesh.remote(num_cpus=0.001)
class Tiny:
    def pid(self) -> int:
        import os

        return os.getpid()


@pytest.mark.timeout(120)
def test_a_burst_of_600_creations_then_sigterm(driver: NodeProcess) -> None:
    actors = [Tiny.remote() for _ in range(600)]
    assert len(set(zmesh.get([a.pid.remote() for a in actors], timeout=90))) == 600
    # The `driver` fixture then stops the node with SIGTERM and checks it exits 0.


@pytest.mark.timeout(60)
def test_a_dead_zygote_restarts_restartable_actors_and_buries_the_rest(driver: NodeProcess) -> None:
    keeper = Tiny.options(max_restarts=1).remote()
    mortal = Tiny.remote()
    old_pid = zmesh.get(keeper.pid.remote(), timeout=30)
    zmesh.get(mortal.pid.remote(), timeout=30)
    (zygote,) = psutil.Process(driver.pid).children()
    zygote.kill()
    # The old worker dies with the zygote a moment later; then the new one answers.
    zmesh.testing.wait_for(lambda: _answer(keeper) not in (None, old_pid), timeout=20, what="the restarted actor to answer")
    with pytest.raises(ActorDiedError):
        zmesh.get(mortal.pid.remote(), timeout=20)
    status = zmesh.runtime.current().request("status")  # type: ignore[union-attr]
    # One restart, one worker: a spawn the dead zygote never answered is sent once, not twice.
    assert [(a["actor_id"], a["state"], a["restarts"]) for a in status["actors"]] == [(keeper._zmesh_actor_id, "ALIVE", 1)]

    def actor_workers() -> list[psutil.Process]:
        """The zygote's children but the warm workers (forked ahead, waiting for an actor, or leaving)."""
        pool = zmesh.runtime.current().request("status")["warm_workers"]  # type: ignore[union-attr]
        warm = set(pool["parked"]) if not pool["starting"] else None
        found = [p for p in psutil.Process(driver.pid).children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE][1:]
        return [p for p in found if warm is not None and p.pid not in warm]

    zmesh.testing.wait_for(lambda: len(actor_workers()) == 1, timeout=20, what="one worker besides the warm ones")


def _answer(actor: Any) -> int | None:
    try:
        return int(zmesh.get(actor.pid.remote(), timeout=5))
    except (ActorUnavailableError, GetTimeoutError):
        return None


# --- a driver always notices that its node died (its monitor used to miss the connect event)


@zmesh.remote
class Sleeper:
    def block(self) -> None:
        import time

        time.sleep(60)


@pytest.mark.timeout(120)
def test_a_driver_notices_its_node_died_every_time(isolated_run_dir: Path) -> None:
    for _ in range(6):
        node = NodeProcess(str(isolated_run_dir), "--num-cpus", "2")
        try:
            zmesh.init(address="auto")
            a = Sleeper.remote()
            ref = a.block.remote()
            zmesh.get(Tiny.remote().pid.remote(), timeout=30)  # the node has answered and started workers
            node.proc.kill()
            with pytest.raises((ActorDiedError, NodeUnavailableError)):
                zmesh.get(ref, timeout=20)
            with pytest.raises(NodeUnavailableError):
                zmesh.get_actor("anything")
        finally:
            zmesh.shutdown()
            node.stop()
    # A killed node cannot remove its workers' socket files; the next node started here does.
    zmesh.testing.wait_for(lambda: not zmesh.testing.zmesh_processes(str(isolated_run_dir)), timeout=10, what="workers to exit")
    rundir.remove_stale_sockets()


# --- file descriptors: the soft limit is raised; past the hard one calls fail with a clear error

_MANY_ACTORS = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
import zmesh
from zmesh.exceptions import ZmeshError
zmesh.init(address="auto")

@zmesh.remote(num_cpus=0.001)
class Tiny:
    def ping(self):
        return 1

actors = [Tiny.remote() for _ in range({count})]
ok = failed = 0
for ref in [a.ping.remote() for a in actors]:
    try:
        ok += zmesh.get(ref, timeout=60)
    except ZmeshError as exc:
        assert "cannot open a connection" in str(exc) and "ulimit -n" in str(exc), exc
        failed += 1
print("RESULT", ok, failed, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


@pytest.mark.timeout(180)
def test_300_actors_with_a_soft_limit_of_1024_files(driver: NodeProcess) -> None:
    out = run_driver(_MANY_ACTORS.format(soft=1024, hard=20000, count=400), timeout=150)
    assert "RESULT 400 0 20000" in out.stdout, out.stdout + out.stderr


@pytest.mark.timeout(180)
def test_calls_past_the_hard_file_limit_fail_with_a_clear_error(driver: NodeProcess) -> None:
    out = run_driver(_MANY_ACTORS.format(soft=160, hard=160, count=150), timeout=150)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line is not None, out.stdout + out.stderr
    _, ok, failed, _ = line.split()
    assert int(ok) + int(failed) == 150 and int(failed) > 0


# --- a detached actor whose creator exited does not keep the lines it prints


_MAKE_PRINTER = """
import zmesh
zmesh.init(address="auto")

@zmesh.remote
class Printer:
    def pid(self):
        import os
        return os.getpid()

    def spew(self, lines, size):
        for i in range(lines):
            print(str(i) * size)
        return lines

p = Printer.options(name="printer", lifetime="detached").remote()
print("PID", zmesh.get(p.pid.remote(), timeout=30))
"""


@pytest.mark.timeout(120)
def test_lines_of_a_detached_actor_whose_creator_exited_are_not_kept(driver: NodeProcess) -> None:
    out = run_driver(_MAKE_PRINTER)
    assert "PID" in out.stdout, out.stderr
    worker = psutil.Process(int(out.stdout.split("PID")[1].split()[0]))
    printer = zmesh.get_actor("printer")
    start = worker.memory_info().rss
    for _ in range(5):
        assert zmesh.get(printer.spew.remote(20, 1_000_000), timeout=60) == 20
    assert worker.memory_info().rss - start < 60 * 2**20
    # Nobody can read them where they were meant to go: they land in the node's log.
    zmesh.testing.wait_for(lambda: "1" * 1000 in driver.output_so_far(), timeout=30, what="lines in the node's log")
    zmesh.kill(printer)


# --- actor code runs in its creator's namespace


@zmesh.remote
class Finder:
    def find(self, name: str) -> Any:
        return zmesh.get(zmesh.get_actor(name).echo.remote("found"), timeout=10)


@pytest.mark.timeout(60)
def test_an_actor_runs_in_its_creators_namespace() -> None:
    zmesh.init(num_cpus=4, namespace="x")
    Echo.options(name="target").remote()
    assert zmesh.get(Finder.remote().find.remote("target"), timeout=30) == "found"
    # Also when the actor itself is named in another namespace: its code still runs in the job's.
    assert zmesh.get(Finder.options(name="f", namespace="y").remote().find.remote("target"), timeout=30) == "found"


# --- wait: Ray's answers at the edges, and a drain that stays linear


def test_wait_on_no_refs_returns_two_empty_lists(local: None) -> None:
    assert zmesh.wait([], timeout=30) == ([], [])


@pytest.mark.parametrize("num_returns", [0, -1, 3, True, 1.0])
def test_wait_with_a_bad_num_returns_raises(local: None, num_returns: Any) -> None:
    refs = [zmesh.put(1), zmesh.put(2)]
    with pytest.raises(ValueError, match="num_returns"):
        zmesh.wait(refs, num_returns=num_returns, timeout=30)


@pytest.mark.timeout(60)
def test_draining_with_wait_returns_every_ref_once_in_order(local: None) -> None:
    a = Echo.remote()
    refs = [a.echo.remote(i) for i in range(5_000)]
    pending: list[Any] = refs
    drained = []
    while pending:
        ready, pending = zmesh.wait(pending, num_returns=min(3, len(pending)), timeout=30)
        drained += ready
    assert drained == refs  # a sequential actor finishes in order, and ready keeps the order of refs


def test_wait_checks_a_returned_list_again_once_it_changed(local: None) -> None:
    refs = [zmesh.put(i) for i in range(3)]
    _, rest = zmesh.wait(refs, timeout=30)
    rest.append(rest[0])
    with pytest.raises(ValueError, match="more than once"):
        zmesh.wait(rest, timeout=30)
    rest[-1] = "not a ref"
    with pytest.raises(TypeError, match="item 2"):
        zmesh.wait(rest, timeout=30)


# --- smaller ones: every request answered, bounded error reports, size cap on put


@zmesh.remote
class AsyncEcho:
    async def echo(self, value: Any) -> Any:
        return value


@pytest.mark.timeout(90)
def test_calls_sent_while_an_async_actors_loop_starts_are_not_lost(local: None) -> None:
    actors = [AsyncEcho.remote() for _ in range(30)]
    refs = [a.echo.remote(i) for i, a in enumerate(actors)]
    assert zmesh.get(refs, timeout=60) == list(range(30))


@pytest.mark.timeout(30)
def test_a_request_the_node_cannot_handle_is_answered(local: None) -> None:
    rt = zmesh.runtime.current()
    assert rt is not None
    with pytest.raises(ValueError, match="malformed 'kill' request"):
        rt.request("kill", ("only-one-field",), timeout=5)
    assert rt.request("status", timeout=5)["dropped_by_node"] == 0  # an answered request is not a dropped message


@zmesh.remote
class Exploding:
    def __init__(self, size: int) -> None:
        raise ValueError("x" * size)

    def ping(self) -> None:
        pass


@pytest.mark.timeout(60)
def test_a_huge_init_error_still_kills_the_actor_with_its_message(local: None) -> None:
    a = Exploding.remote(20 * 2**20)
    with pytest.raises(ActorDiedError, match="ValueError: xxxx"):
        zmesh.get(a.ping.remote(), timeout=30)


def test_put_refuses_a_value_over_the_message_size_cap(isolated_run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cap below the store's threshold: values between the two travel in messages, and are refused at the put."""
    monkeypatch.setenv("ZMESH_MAX_MESSAGE_BYTES", str(2**18))
    zmesh.init()
    with pytest.raises(ValueError, match="ZMESH_MAX_MESSAGE_BYTES"):
        zmesh.put(b"x" * (2**19))
    assert zmesh.get(zmesh.put(b"x" * 1000), timeout=30) == b"x" * 1000
    # From the store's threshold on, a value is in shared memory and only its descriptor travels: no cap applies.
    assert len(zmesh.get(zmesh.put(b"x" * (2 * 2**20)), timeout=30)) == 2 * 2**20


@pytest.mark.timeout(60)
def test_many_actors_dying_at_once_while_the_node_forgets_the_dead(isolated_run_dir: Path) -> None:
    node = NodeProcess(str(isolated_run_dir), "--num-cpus", "4", env={"ZMESH_KEEP_DEAD_ACTORS": "5"})
    try:
        code = "import zmesh\nzmesh.init(address='auto')\n" + _TINY_SOURCE + "\nactors = [Tiny.remote() for _ in range(40)]\n"
        code += "print('PIDS', len(set(zmesh.get([a.pid.remote() for a in actors], timeout=60))))\n"
        out = run_driver(code)  # exits: its 40 actors die at once
        assert "PIDS 40" in out.stdout, out.stderr
        zmesh.init(address="auto")
        zmesh.testing.wait_for(lambda: not node.descendants()[1:], timeout=30, what="the workers to exit")
        status = zmesh.runtime.current().request("status", timeout=5)  # type: ignore[union-attr]
        assert status["actors"] == [] and len(status["dead_actors"]) == 5
        assert zmesh.get(Tiny.remote().pid.remote(), timeout=30) > 0
    finally:
        zmesh.shutdown()
        output = node.stop()
    assert "Traceback" not in node.output and output == 0, node.output


_TINY_SOURCE = """
@zmesh.remote(num_cpus=0.001)
class Tiny:
    def pid(self):
        import os
        return os.getpid()
"""


def test_a_driver_forgets_dead_actors_but_still_fails_late_calls(local: None) -> None:
    rt = zmesh.runtime.current()
    assert rt is not None
    actors = [Tiny.remote() for _ in range(20)]
    zmesh.get([a.pid.remote() for a in actors], timeout=30)
    for a in actors:
        zmesh.kill(a)
    zmesh.testing.wait_for(lambda: not rt.actor_calls._actors, timeout=10, what="the driver to forget its dead actors")
    with pytest.raises(ActorDiedError, match="killed"):
        zmesh.get(actors[0].pid.remote(), timeout=10)


@pytest.mark.timeout(60)
def test_a_forked_child_of_a_driver_gets_a_clear_error_then_can_init(driver: NodeProcess) -> None:
    import os

    ref = zmesh.put(41)
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            try:
                zmesh.get(ref, timeout=5)
            except RuntimeError as exc:
                if "zmesh.init()" in str(exc):
                    zmesh.init(address="auto")
                    code = 0 if zmesh.get(ref, timeout=10) == 41 else 3
                    zmesh.shutdown()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_an_undefined_concurrency_group_is_refused(local: None) -> None:
    @zmesh.remote
    class Grouped:
        @zmesh.method(concurrency_group="io")
        def read(self) -> int:
            return 1

        def other(self) -> int:
            return 2

    plain = Grouped.remote()
    assert zmesh.get(plain.other.remote(), timeout=30) == 2
    with pytest.raises(ValueError, match=r"concurrency group 'io'.*does not define"):
        plain.read.remote()
    g = Grouped.options(concurrency_groups={"io": 2}).remote()
    assert zmesh.get(g.read.remote(), timeout=30) == 1
    with pytest.raises(ValueError, match="concurrency group 'compute'"):
        g.other.options(concurrency_group="compute").remote()


# --- the command line


def _zmesh_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zmesh", *args], capture_output=True, text=True, timeout=30)


def test_a_bad_log_level_is_named_without_a_traceback() -> None:
    out = _zmesh_cmd("node", "--port", "0", "--log-level", "bogus")
    assert out.returncode == 2 and "--log-level" in out.stderr and "bogus" in out.stderr and "Traceback" not in out.stderr


def test_keygen_does_not_make_missing_directories(tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "cluster.key"
    out = _zmesh_cmd("keygen", str(target))
    assert out.returncode == 1 and "directory does not exist" in out.stderr
    assert not target.parent.exists()


def test_a_second_node_with_the_same_run_directory_is_refused(node: NodeProcess) -> None:
    before = Path(node.run_dir, "node.json").read_text()
    out = _zmesh_cmd("node", "--port", "0")
    assert out.returncode == 2 and "already runs for run directory" in out.stderr and str(node.pid) in out.stderr
    assert Path(node.run_dir, "node.json").read_text() == before


@zmesh.remote
class Signals:
    def sigint(self) -> tuple[bool, bool]:
        import signal

        line = subprocess.run(["grep", "SigIgn", "/proc/self/status"], capture_output=True, text=True).stdout
        child_ignores = bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
        return signal.getsignal(signal.SIGINT) is signal.default_int_handler, child_ignores


def test_workers_and_their_programs_take_sigint_by_default(local: None) -> None:
    assert zmesh.get(Signals.remote().sigint.remote(), timeout=30) == (True, False)


@pytest.mark.timeout(30)
def test_kill_and_get_actor_are_bounded_by_a_timeout(local: None) -> None:
    a = Echo.options(name="bounded").remote()
    assert zmesh.get_actor("bounded", timeout=5) == a
    with pytest.raises(ValueError, match="timeout"):
        zmesh.get_actor("bounded", timeout=-1)
    zmesh.kill(a, timeout=5)


# --- found by the torture test: an error raised from get kept the caller's refs alive for ever


@zmesh.remote
class Crasher:
    def echo(self, value: Any) -> Any:
        return value

    def crash(self) -> None:
        import os

        os._exit(1)


@pytest.mark.timeout(60)
def test_refs_of_calls_that_failed_are_freed(local: None) -> None:
    import gc

    rt = zmesh.runtime.current()
    assert rt is not None
    for _ in range(3):
        a = Crasher.remote()
        refs = [a.echo.remote(i) for i in range(3)] + [a.crash.remote()]
        for ref in refs:
            try:
                zmesh.get(ref, timeout=30)
            except ActorDiedError:
                pass
        del refs, ref
        gc.collect()
        zmesh.testing.wait_for(lambda: len(rt.objects) == 0, timeout=10, what="the driver to free every failed call's entry")


@zmesh.remote(max_concurrency=4)
class Threaded:
    def echo(self, value: Any) -> Any:
        return value


@pytest.mark.timeout(60)
def test_one_put_ref_passed_to_a_threaded_actor_many_times_at_once(local: None) -> None:
    # Found by the torture test: a thread waiting for owners' answers missed the moment nothing was left to wait for.
    a = Threaded.remote()
    for _ in range(20):
        ref = zmesh.put(None)
        assert zmesh.get([a.echo.remote(ref) for _ in range(13)], timeout=10) == [None] * 13


def test_a_done_value_whose_waiter_is_still_leaving_is_freed() -> None:
    # Found by the torture test (flaky): a get woken by the value, not yet gone from the waiters,
    # when the last ref was dropped, kept the value for ever.
    from zmesh.runtime.objects import ObjectStore, Waiter
    from zmesh.transport.ids import ObjectId

    store = ObjectStore(threading.Lock())
    oid = ObjectId(b"o" * 16)
    entry = store.new_owned_locked(oid)
    store.add_ref_locked(oid)
    entry.waiters.append(Waiter())
    store.complete_locked(oid, [b"v"])
    entry.waiters.append(Waiter())  # a waiter still on its way out
    assert store.release_locked(oid) == 0
    assert store.get_locked(oid) is None


def test_a_value_asked_for_by_a_peer_and_dropped_by_its_owner_before_it_came_is_freed() -> None:
    # Found by the torture test across a mesh: a worker asked for a pending result (GET_OBJECT), the owner
    # dropped its last ref (the call that passed it ended first), then the result came. The peers that asked
    # were taken off the entry only after the check that frees it, so the entry stayed for ever.
    from zmesh.runtime.objects import ObjectStore
    from zmesh.transport.ids import ObjectId

    store = ObjectStore(threading.Lock())
    oid = ObjectId(b"p" * 16)
    entry = store.new_owned_locked(oid)
    store.add_ref_locked(oid)
    entry.remote_waiters.append(b"worker")
    assert store.release_locked(oid) == 0
    assert store.get_locked(oid) is entry  # pending and owned: its result is still to come
    done, _, _, remote = store.complete_locked(oid, [b"v"])
    assert done is entry and remote == [b"worker"]  # still sent to the peer that asked
    assert store.get_locked(oid) is None


@zmesh.remote
class _Slow:
    def value(self, seconds: float) -> str:
        time.sleep(seconds)
        return "late"


@zmesh.remote
class _TakesArg:
    def take(self, value: Any) -> Any:
        return value


def test_a_result_fetched_by_a_worker_that_died_first_is_freed(driver: NodeProcess) -> None:
    """The same through real processes: the worker that asked for the pending result is killed before it comes."""
    rt = zmesh.runtime.current()
    assert rt is not None
    slow, taker = _Slow.remote(), _TakesArg.remote()
    zmesh.get([slow.value.remote(0), taker.take.remote(None)], timeout=30)
    before = len(rt.objects._entries)
    pending = slow.value.remote(1.0)
    call = taker.take.remote(pending)  # the worker asks the driver for `pending` and waits
    entry = rt.objects._entries[pending.id]
    zmesh.testing.wait_for(lambda: bool(entry.remote_waiters), 10, what="the worker's fetch of the pending result")
    zmesh.kill(taker)
    with pytest.raises(zmesh.exceptions.ActorDiedError):
        zmesh.get(call, timeout=30)
    del call, pending
    zmesh.testing.wait_for(lambda: len(rt.objects._entries) <= before, 10, what="the late result to be freed")


@zmesh.remote
class _Fails:
    def boom(self) -> None:
        raise RuntimeError("boom")


@zmesh.remote(max_concurrency=4)
class _Echoes:
    def echo(self, x: Any) -> Any:
        return x


def test_a_worker_that_raised_a_fetched_error_keeps_no_reference_to_it(driver: NodeProcess) -> None:
    """A failed result passed to an actor made each call fail; the worker kept the argument ref for ever.

    Raising the fetched error left a cycle (error -> traceback -> frame -> error) holding the call's
    frames, and with them the ObjectRefs, until a garbage collection that an idle worker never ran:
    the owner kept the object, counting the worker as a borrower (found by the torture test).
    """
    rt = zmesh.runtime.current()
    assert rt is not None
    failing, echoes = _Fails.remote(), _Echoes.remote()
    bad = failing.boom.remote()
    refs = [echoes.echo.remote(bad) for _ in range(6)]
    for ref in refs:
        with pytest.raises(zmesh.exceptions.TaskError):
            zmesh.get(ref, timeout=30)
    del refs, ref, bad
    zmesh.testing.wait_for(lambda: len(rt.objects._entries) == 0, 5, what="the failed result to be freed")
