"""The node's worker pool: leases workers to opaque tokens, forks them through the zygote, reports their spawns and exits.

A lease is a token (a string the owner picks) that wants one worker. The pool
gets it one: a parked warm worker (``warm.py``), bound by answering its waiting
``init`` with the answer the owner provides, or else a fork, queued through the
start gate (``gate.py``) so a burst does not fork all at once. The pool knows
workers by token and pid only; what a worker runs (an actor now, tasks later) and
what its exit means is the owner's business, told through the callbacks given to
the constructor. It owns the workers' processes: it kills them (never a pid
already reported dead, which the kernel may have given to another process),
removes their socket files when they exit, and takes them all down at shutdown.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from zmesh.node.pool.gate import StartGate
from zmesh.node.pool.warm import Parked, WarmPool
from zmesh.node.pool.zygote_link import ZygoteDied, ZygoteLink
from zmesh.transport import protocol, rundir

logger = logging.getLogger(__name__)

# Sends frames to a client of the node (a worker's init request is answered this way); False when it is gone.
Send = Callable[[bytes, list[Any]], bool]
# What a parked warm worker is told it now runs: the init reply's value and payload frames.
Answer = Callable[[], tuple[Any, list[Any]]]
OnSpawned = Callable[[str, int], None]
OnExited = Callable[[str | None, int, int], None]
OnZygoteDied = Callable[[list[str]], None]


class InitRefused(Exception):
    """A worker asked for work that no longer wants it (its lease forgotten, or a warm worker not needed)."""


UNWANTED = ("ActorDiedError", "this worker is no longer wanted")


class WorkerPool:
    """The I/O shell around the warm pool and the start gate, and the owner of the zygote link.

    ``on_spawned(token, pid)``: the zygote forked the worker of a lease still held.
    ``on_exited(token or None, pid, code)``: a worker exited, with the token it was forked or bound for (None: a
    warm worker never bound);
    its socket files are already removed. ``on_zygote_died(tokens)``: the zygote died and every worker with it;
    ``tokens`` are the leases that were held (queued, forking or running), all of them now forgotten.
    """

    def __init__(
        self,
        zygote: ZygoteLink,
        warm: WarmPool,
        start_limit: int,
        address: str,
        host: str,
        spawn_env: dict[str, Any],
        send: Send,
        on_spawned: OnSpawned,
        on_exited: OnExited,
        on_zygote_died: OnZygoteDied,
        still_wanted: Callable[[str], bool] = lambda token: True,
    ) -> None:
        self._zygote = zygote
        # Asked when a queued fork's turn comes: the owner may have moved on (a new incarnation) without forgetting.
        self._still_wanted = still_wanted
        self._warm = warm  # forked, connected workers waiting for a lease: binding one skips the worker's start
        # At most a few workers start at once; the rest of a burst queues there, and is dropped once unwanted.
        self._gate = StartGate(start_limit, self._wanted)
        self._address = address  # where workers find the node (its workers' door)
        self._host = host
        self._spawn_env = spawn_env
        self._send = send
        self._on_spawned = on_spawned
        self._on_exited = on_exited
        self._on_zygote_died = on_zygote_died
        self._leases: dict[str, int | None] = {}  # held leases -> their worker's pid once known
        # Every worker forked and not yet reported exited -> the token it runs for (warm ones under their own).
        # Only these pids are ever signalled: a reported one may already belong to another process.
        self._live: dict[int, str] = {}

    # ------------------------------------------------------------------ the zygote

    def start(self) -> None:
        """Start the zygote; from the node loop's thread, since the zygote dies with the thread that started it."""
        self._zygote.start()

    def owns(self, fd: Any) -> bool:
        """Whether a poll event on ``fd`` is the pool's (its zygote's)."""
        return self._zygote.owns(fd)

    def before_poll(self) -> None:
        self._zygote.before_poll()

    def on_readable(self) -> None:
        """Handle what the zygote reported; a dead zygote is replaced, and its workers are reported dead."""
        try:
            events = self._zygote.events()
        except ZygoteDied:
            self._zygote.restart()
            self._zygote_died()
            return
        for event in events:
            if event.get("ev") == "spawned":
                self._spawned(event["token"], event["pid"])
            elif event.get("ev") == "exited":
                self._exited(event["pid"], event["code"])

    # ------------------------------------------------------------------ leases

    def lease(self, token: str, env: dict[str, str], answer: Answer) -> int | None:
        """Get ``token`` a worker: a parked warm one at once (its pid is returned), or a fork when the gate lets it.

        ``env`` is set in a forked worker before any of its code runs; a warm worker, forked before anyone
        knew its lease, must get it from ``answer`` and set it before running the owner's code.
        """
        self._leases[token] = None
        while (worker := self._warm.take(time.monotonic())) is not None:
            value, payload = answer()
            if self._send(worker.identity, protocol.encode(protocol.REPLY, (worker.req_id, True, value), payload)):
                self._leases[token] = worker.pid
                self._live[worker.pid] = token
                return worker.pid
            kill_pid(worker.pid)  # gone from the socket: never given anything, it is of no use
        self._fork(token, env)
        return None

    def forget(self, token: str) -> None:
        """``token`` no longer wants a worker: a queued fork is dropped, a worker forked for it is killed when it appears.

        A worker already known keeps running: the owner kills it by pid if it must go.
        """
        self._leases.pop(token, None)

    def said_hello(self, token: Any) -> None:
        """A worker introduced itself: its runtime is up, the costly part of its start is behind it. The next may start."""
        self._start(self._gate.started(token))

    def arrived(self, token: Any, identity: bytes, req_id: Any, pid: int) -> bool:
        """A worker asks for its work (its ``init`` request). True: it is the caller's to answer.

        False: a warm worker, parked; its request is answered when a lease takes it. InitRefused: a warm
        worker the pool does not want (full, or creations stopped coming).
        """
        self._start(self._gate.started(token))  # no-op once it said hello (a worker that skipped it still passes)
        if self._warm.owns(token):
            if self._warm.park(Parked(str(token), identity, req_id, pid), time.monotonic()):
                return False
            raise InitRefused(UNWANTED[1])
        if isinstance(token, str) and token in self._leases and self._leases[token] is None:
            # Here before the zygote's report of its fork (which comes before any report of its exit): alive.
            self._leases[token] = pid
            self._live[pid] = token
        return True

    def kill(self, pid: int) -> None:
        """SIGKILL a worker of ours; only pids the zygote has not yet reported dead, so never a reused one."""
        if pid in self._live:
            kill_pid(pid)

    def tend(self, now: float) -> None:
        """Ask for the warm workers the pool wants, and send away those no lease came for."""
        for token in self._warm.wanted(now):
            self._fork(token, {})
        for worker in self._warm.retire(now):
            # Refusing its init makes it close its sockets and exit.
            if not self._send(worker.identity, protocol.encode(protocol.REPLY, (worker.req_id, False, UNWANTED))):
                kill_pid(worker.pid)

    def describe(self) -> dict[str, Any]:
        """The warm pool's state, for the node's status."""
        return self._warm.describe()

    def shutdown(self) -> None:
        """Kill every worker (warm ones too), stop the zygote, and remove every worker's socket files."""
        self._warm.reset()
        self._gate.reset()
        self._leases.clear()
        for pid in self._live:
            kill_pid(pid)
        self._live.clear()
        # The zygote kills and reaps the workers it still has before it exits, forked ones we never heard of
        # included, and close() waits for it: then no worker is left to make a socket file, and the files of
        # every process gone can go.
        self._zygote.close()
        rundir.remove_stale_sockets()

    # ------------------------------------------------------------------ what the zygote reports

    def _wanted(self, token: str) -> bool:
        """Whether a queued fork is still worth making when its turn comes."""
        if self._warm.expects(token):
            return True
        if token not in self._leases:
            return False
        if self._still_wanted(token):
            return True
        del self._leases[token]  # no fork: the lease ends here
        return False

    def _fork(self, token: str, env: dict[str, str]) -> None:
        request = {
            "op": "spawn",
            "token": token,
            "address": self._address,
            "warm": self._warm.owns(token),
            "host": self._host,
            "env": env,
            "security": self._spawn_env,
        }
        self._start(self._gate.submit(token, request))

    def _start(self, requests: list[dict[str, Any]]) -> None:
        for request in requests:
            self._zygote.spawn(request)

    def _spawned(self, token: Any, pid: int) -> None:
        self._gate.spawned(token, pid)
        known = pid in self._live  # its init came first
        self._live[pid] = str(token)
        if self._warm.spawned(token, pid):
            return
        if isinstance(token, str) and token in self._leases:
            self._leases[token] = pid
            self._on_spawned(token, pid)
        elif not known:
            kill_pid(pid)  # its lease was forgotten before it even started

    def _exited(self, pid: int, code: int) -> None:
        self._start(self._gate.exited(pid))
        token = self._live.pop(pid, None)
        if token is not None and self._leases.get(token) == pid:
            del self._leases[token]  # its worker is gone: the owner leases anew if it wants another
        self._warm.exited(pid, time.monotonic())
        rundir.remove_sockets_of(pid)  # killed, it could not remove them; some it made before saying hello
        self._on_exited(None if token is None or self._warm.owns(token) else token, pid, code)

    def _zygote_died(self) -> None:
        """Its workers died with it (PDEATHSIG): their files go, their leases end, and the owner hears which."""
        self._gate.reset()
        pids = set(self._warm.reset()) | set(self._live)
        lost = list(self._leases)
        self._leases.clear()
        self._live.clear()
        for pid in pids:
            rundir.remove_sockets_of(pid)
        rundir.remove_stale_sockets()  # of workers forked after the zygote last listed its children (all dead now)
        self._on_zygote_died(lost)


def kill_pid(pid: int) -> None:
    if pid <= 0:
        return  # 0 and negatives would signal whole process groups
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
