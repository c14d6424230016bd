"""The worker pool on its own: real zygote, real workers, leased to tokens that are not actors.

A small stand-in for the node answers the workers at a real workers' door (their
hello, their ``init``) and drives the pool the way the node's loop does: it knows
nothing of actors, and neither does the pool.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
import zmq

from zmesh.node.pool.door import WorkerDoor
from zmesh.node.pool.warm import WarmPool
from zmesh.node.pool.workers import UNWANTED, InitRefused, WorkerPool
from zmesh.node.pool.zygote_link import ZygoteLink
from zmesh.transport import protocol, rundir, sockets
from zmesh.transport.security import Security

pytestmark = pytest.mark.timeout(60)


class FakeNode:
    """The node's side of the pool: the workers' door, the poll loop, and a record of what the pool reported."""

    def __init__(self, *, start_limit: int, warm: int = 0, warm_idle_s: float = 60.0) -> None:
        security = Security(None)
        self.ctx = sockets.new_context()
        self.door = WorkerDoor(self.ctx, security.max_message_bytes)
        self.poller = zmq.Poller()
        self.poller.register(self.door.socket, zmq.POLLIN)
        self.spawned: list[tuple[str, int]] = []
        self.exited: list[tuple[str | None, int, int]] = []
        self.lost: list[list[str]] = []
        self.asking: dict[str, tuple[bytes, Any, int]] = {}  # token -> (identity, req id, pid): inits ours to answer
        self._pids: dict[bytes, int] = {}
        self.pool = WorkerPool(
            ZygoteLink(self.poller), WarmPool(warm, warm_idle_s), start_limit, self.door.address, "127.0.0.1",
            security.spawn_env(), self._send,
            lambda token, pid: self.spawned.append((token, pid)),
            lambda token, pid, code: self.exited.append((token, pid, code)),
            self.lost.append,
        )  # fmt: skip
        self.pool.start()

    def _send(self, identity: bytes, frames: list[Any]) -> bool:
        try:
            self.door.socket.send_multipart([identity, *frames], copy=False)
            return True
        except zmq.ZMQError:
            return False

    def pump(self, done: Callable[[], bool], timeout: float = 20.0) -> None:
        """Run the loop (the door, the zygote, the pool's tending) until ``done()``; TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the pool did not get there: spawned {self.spawned}, exited {self.exited}")
            for sock, _ in self.poller.poll(20):
                if sock is self.door.socket:
                    self._drain()
                elif self.pool.owns(sock):
                    self.pool.on_readable()
            self.pool.tend(time.monotonic())
            self.pool.before_poll()

    def _drain(self) -> None:
        while True:
            try:
                identity, *frames = self.door.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.door.came_in(identity)
            hello = protocol.decode_json(frames, protocol.HELLO_TAG)
            if hello is not None:
                self._pids[identity] = int(hello["pid"])
                welcome = {**protocol.identity(), "node_id": "fake", "address": self.door.address, "pid": 0, "resources": {}}
                self._send(identity, protocol.encode_json(protocol.WELCOME_TAG, welcome))
                continue
            msg = protocol.decode(frames)
            if msg.type != protocol.REQUEST:
                continue
            req_id, op, args = msg.header
            if op != "init":
                self._send(identity, protocol.encode(protocol.REPLY, (req_id, True, None)))
                continue
            try:
                if self.pool.arrived(args[0], identity, req_id, self._pids[identity]):
                    self.asking[args[0]] = (identity, req_id, self._pids[identity])
            except InitRefused:
                self._send(identity, protocol.encode(protocol.REPLY, (req_id, False, UNWANTED)))

    def refuse(self, token: str) -> None:
        """Answer a worker's init with "not wanted": it exits by itself, with code 0."""
        identity, req_id, _ = self.asking.pop(token)
        self._send(identity, protocol.encode(protocol.REPLY, (req_id, False, UNWANTED)))

    def close(self) -> None:
        self.pool.shutdown()
        self.door.close()
        self.ctx.term()


@pytest.fixture
def node() -> Iterator[FakeNode]:
    fake = FakeNode(start_limit=1)
    yield fake
    fake.close()


def sockets_of(pid: int) -> list[str]:
    return [p.name for p in rundir.socket_dir().glob(f"{pid}-*.sock")]


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def no_answer() -> tuple[Any, list[Any]]:
    raise AssertionError("no warm worker waits: nothing is answered at lease time")


def test_leases_fork_in_turn_and_report_by_token(node: FakeNode) -> None:
    for token in ("job-a", "job-b", "job-c", "job-d"):
        assert node.pool.lease(token, {}, no_answer) is None
    node.pool.forget("job-c")  # queued behind the gate (one start at a time): never forked
    node.pump(lambda: len(node.asking) == 3)
    # One start at a time, in order: each fork waited for the previous worker's init.
    assert [token for token, _ in node.spawned] == ["job-a", "job-b", "job-d"]
    pids = dict(node.spawned)
    assert {token: pid for token, (_, _, pid) in node.asking.items()} == pids

    node.pool.kill(pids["job-a"])
    node.pump(lambda: len(node.exited) == 1)
    assert node.exited == [("job-a", pids["job-a"], -9)]
    assert sockets_of(pids["job-a"]) == []  # killed, it could not remove them: the pool did

    node.refuse("job-b")
    node.pump(lambda: len(node.exited) == 2)
    assert node.exited[1] == ("job-b", pids["job-b"], 0)
    assert sockets_of(pids["job-b"]) == []
    node.pool.kill(pids["job-b"])  # reported dead: never signalled again, whoever has the pid now

    assert not gone(pids["job-d"]) and sockets_of(pids["job-d"])
    node.pool.shutdown()
    assert gone(pids["job-d"]) and sockets_of(pids["job-d"]) == []
    assert not psutil.Process().children(recursive=True)  # the zygote too
    assert node.lost == []


def test_a_worker_forked_for_a_forgotten_lease_is_killed_when_it_appears(node: FakeNode) -> None:
    node.pool.lease("job-x", {}, no_answer)  # its fork is asked for at once (the gate is free)
    node.pool.forget("job-x")
    node.pump(lambda: len(node.exited) == 1)
    assert node.spawned == []  # not the owner's any more: never reported as its worker
    assert node.exited[0][0] == "job-x" and node.exited[0][2] == -9
    assert sockets_of(node.exited[0][1]) == []


def test_a_parked_warm_worker_goes_to_one_lease_without_a_fork() -> None:
    node = FakeNode(start_limit=2, warm=1)
    try:
        node.pool.lease("job-1", {}, no_answer)  # a lease is demand: the warm pool fills while leases keep coming
        node.pump(lambda: "job-1" in node.asking and node.pool.describe()["parked"] != [])
        (warm_pid,) = node.pool.describe()["parked"]
        assert all(pid != warm_pid for _, pid in node.spawned)  # a warm worker is no lease's until bound

        # Bound by its parked init's answer: no fork. This answer is no actor's, so the worker fails and exits.
        answered: list[str] = []

        def answer() -> tuple[Any, list[Any]]:
            answered.append("job-2")
            return ("not-an-actor", 0, {}), []

        assert node.pool.lease("job-2", {}, answer) == warm_pid
        assert answered == ["job-2"] and node.pool.describe()["parked"] == []
        node.pump(lambda: any(pid == warm_pid for _, pid, _ in node.exited))
        ((token, _, code),) = [e for e in node.exited if e[1] == warm_pid]
        assert token == "job-2" and code != 0  # its exit is told under the lease that took it
        assert ("job-2", warm_pid) not in node.spawned  # bound, not forked
        assert sockets_of(warm_pid) == []
    finally:
        node.close()
