"""Fixtures: an isolated run directory per test, an embedded or daemon node, and a leak check."""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from zmq.utils import garbage as zmq_garbage

import zmesh
from zmesh.testing import NodeProcess, wait_for, zmesh_processes
from zmesh.transport import rundir, shm, sockets

# Warm workers (node/pool/warm.py) outlive a test's last creation by warm_idle_s before they are sent away, and
# every test waits for its processes to be gone: a short idle keeps that wait short (nodes and drivers the
# tests start inherit it). Tests of the pool itself set their own.
os.environ.setdefault("ZMESH_WARM_IDLE_S", "0.2")

ROOT = Path(__file__).resolve().parent.parent

# Object-store segments of this test session go in a folder of their own under /dev/shm (nodes and drivers the
# tests start inherit it): the leak check then sees this session's segments only, not another session's. One per
# pytest process (each xdist worker has its own); a zmesh worker that imports this module with a test's actor class
# inherits its session's folder and must not make another.
_SHM_FOR = os.environ.get("PYTEST_XDIST_WORKER", "main")
if os.environ.get("ZMESH_TEST_SHM_FOR") != _SHM_FOR or "ZMESH_SHM_DIR" not in os.environ:
    _SHM_BASE = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    os.environ["ZMESH_SHM_DIR"] = tempfile.mkdtemp(prefix="zmesh-test-", dir=_SHM_BASE)
    os.environ["ZMESH_TEST_SHM_FOR"] = _SHM_FOR
    atexit.register(shutil.rmtree, os.environ["ZMESH_SHM_DIR"], True)

# pyzmq starts one garbage-collector thread (with its own context, socket and descriptors)
# per process, on the first zero-copy send; start it now so no test is blamed for it.
zmq_garbage.gc.start()
zmq_garbage.gc._push_socket  # noqa: B018 (made on first use, kept for the process's life)


@pytest.fixture(scope="session", autouse=True)
def short_socket_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Run directories under pytest's deep temp paths put their sockets in short folders under /tmp (rundir.socket_dir).

    At the session's end the folders of every run directory it made are removed, with what processes it killed
    left in them (a SIGKILLed node cannot remove its socket). Only this session's: another pytest worker's run
    directories live under another base, and their folders may be in use.
    """
    yield
    base = tmp_path_factory.getbasetemp()
    for directory, _, _ in os.walk(base):
        folder = rundir.short_socket_dir(Path(directory))
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_run_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test gets its own run directory, so it never finds another test's node (or a user's)."""
    path = tmp_path_factory.mktemp("run")
    monkeypatch.setenv("ZMESH_RUN_DIR", str(path))
    # The per-user cluster key is made here, not in the real home directory.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
    for name in ("ZMESH_ADDRESS", "ZMESH_CLUSTER_KEY_FILE", "ZMESH_INSECURE"):
        monkeypatch.delenv(name, raising=False)
    yield path


@dataclasses.dataclass
class _Resources:
    """What this test process holds that a test could leak."""

    children: set[int]
    threads: set[int]
    fds: set[int]
    sockets: set[str]
    contexts: int
    segments: set[str]

    @classmethod
    def now(cls, run_dir: Path) -> _Resources:
        me = psutil.Process()
        try:
            children = {p.pid for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}
        except psutil.Error:
            children = set()
        return cls(
            children=children,
            threads={t.ident or 0 for t in threading.enumerate()},
            fds={int(fd) for fd in os.listdir("/proc/self/fd")},
            sockets={p.name for p in rundir.socket_dir().glob("*.sock")},
            contexts=sum(1 for ctx in sockets.live_contexts if not ctx.closed),
            segments=_segments(),
        )

    def leaked_since(self, before: _Resources) -> dict[str, Any]:
        leaks: dict[str, Any] = {}
        if self.children - before.children:
            leaks["child processes"] = sorted(self.children - before.children)
        new_threads = self.threads - before.threads
        if new_threads:
            leaks["threads"] = sorted(t.name for t in threading.enumerate() if t.ident in new_threads)
        if len(self.fds) > len(before.fds):
            leaks["open fds"] = {fd: _fd_target(fd) for fd in sorted(self.fds - before.fds)}
        if self.sockets - before.sockets:
            leaks["IPC socket files"] = sorted(self.sockets - before.sockets)
        if self.contexts > before.contexts:
            leaks["ZeroMQ contexts"] = self.contexts - before.contexts
        if self.segments - before.segments:
            leaks["shared-memory segments"] = sorted(self.segments - before.segments)
        return leaks


def _segments() -> set[str]:
    """Object-store files in /dev/shm; a SIGKILLed node's lock file is no leak (the next node sweeps it), its segments are."""
    names = {p.name for p in shm.directory().glob("zmesh.*")}
    for lock in [n for n in names if n.endswith(".lock")]:
        store = lock[len("zmesh.") : -len(".lock")]
        if not any(n.startswith(f"zmesh.{store}.") and n != lock for n in names) and shm.lock_is_free(store):
            shm.unlink(lock)
            names.discard(lock)
    return names


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


@pytest.fixture(autouse=True)
def no_leaks(isolated_run_dir: Path) -> Iterator[None]:
    """Every test ends with zmesh shut down and nothing it started still there.

    Child processes of any kind, threads, open descriptors, IPC socket files and ZeroMQ
    contexts are compared with what the process had before the test; a test that leaks
    fails, naming what leaked (and its leaked processes are killed).
    """
    before = _Resources.now(isolated_run_dir)
    yield
    if zmesh.is_initialized():
        zmesh.shutdown()
    run_dir = str(isolated_run_dir)
    leaks: dict[str, Any] = {}

    def clean() -> bool:
        nonlocal leaks
        leaks = _Resources.now(isolated_run_dir).leaked_since(before)
        stray = zmesh_processes(run_dir)
        if stray:
            leaks["zmesh processes"] = [(p.pid, " ".join(p.cmdline())) for p in stray]
        return not leaks

    try:
        wait_for(clean, timeout=10, what="the test's processes, threads, descriptors and sockets to be gone")
    except TimeoutError:
        for pid in leaks.get("child processes", []) + [pid for pid, _ in leaks.get("zmesh processes", [])]:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        pytest.fail(f"the test leaked: {leaks}")


@pytest.fixture
def local() -> Iterator[None]:
    """zmesh on an embedded local node."""
    zmesh.init(num_cpus=4)
    yield
    zmesh.shutdown()


@pytest.fixture
def node(isolated_run_dir: Path) -> Iterator[NodeProcess]:
    """A real `zmesh node` daemon, stopped (and checked to stop cleanly) after the test."""
    proc = NodeProcess(str(isolated_run_dir), "--num-cpus", "4")
    yield proc
    if zmesh.is_initialized():
        zmesh.shutdown()
    assert proc.stop() == 0, getattr(proc, "output", "")


@pytest.fixture
def driver(node: NodeProcess) -> Iterator[NodeProcess]:
    """This test process connected to the `node` daemon."""
    zmesh.init(address="auto")
    yield node
    zmesh.shutdown()


def node_with_driver(run_dir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[NodeProcess]:
    """A `zmesh node` daemon in ``run_dir`` with this process as its driver; both stopped after (a fixture's body)."""
    node = NodeProcess(str(run_dir), *args, env=env)
    try:
        zmesh.init(address="auto")
        yield node
    finally:
        if zmesh.is_initialized():
            zmesh.shutdown()
        assert node.stop() == 0, getattr(node, "output", "")


def run_driver(code: str, *, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a separate driver process and return its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
