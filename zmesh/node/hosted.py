"""The actors whose workers run on this node: spawning, start reports, exits, restarts, kills and deaths.

The decisions are ``core.lifecycle``'s; this component carries them out: it asks the
zygote for workers, signals them, releases their resources and tells whoever watches
the actor (subscribed clients here, watching nodes elsewhere) each new state.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from zmesh.node.core import lifecycle, records
from zmesh.node.core.records import ActorRecord, Client
from zmesh.node.core.resources import Resources
from zmesh.node.core.table import ActorTable, Chores
from zmesh.node.pool.gate import StartGate
from zmesh.node.pool.warm import Parked, WarmPool
from zmesh.node.pool.zygote_link import ZygoteLink
from zmesh.transport import protocol, rundir, sockets
from zmesh.transport.ids import ClientId

logger = logging.getLogger(__name__)

SendToClient = Callable[[ClientId, list[Any]], bool]
SendToNode = Callable[[str, str, dict[str, Any]], bool]


class InitRefused(Exception):
    """A worker asked for an actor that no longer wants it (killed, or already replaced)."""


UNWANTED = ("ActorDiedError", "this worker is no longer wanted")


class HostedActors:
    def __init__(
        self,
        node_id: str,
        address: str,
        host: str,
        spawn_env: dict[str, Any],
        table: ActorTable,
        resources: Resources,
        zygote: ZygoteLink,
        warm: WarmPool,
        gate: StartGate,
        chores: Chores,
        send_to_client: SendToClient,
        send_to_node: SendToNode,
        on_dead: Callable[[ActorRecord], None],
    ) -> None:
        self._node_id = node_id
        self._address = address
        self._host = host
        self._spawn_env = spawn_env
        self._table = table
        self._resources = resources
        self._zygote = zygote
        self._warm = warm  # forked, connected workers waiting for an actor: a creation skips the worker's start
        self._gate = gate  # at most a few workers start at once; the rest of a burst queues here
        self._chores = chores
        self._send_to_client = send_to_client
        self._send_to_node = send_to_node
        self._on_dead = on_dead
        self.node_incarnation = 0  # this node's membership incarnation: stamped on each worker started

    # ------------------------------------------------------------------ workers

    def spawn(self, record: ActorRecord) -> None:
        record.pid = None
        record.node_incarnation = self.node_incarnation
        self._table.expect_worker(record)
        if self._bind_warm(record):
            return
        self._start_workers(self._gate.submit(record.token, self._spawn_request(record.token, worker_env(record))))

    def _start_workers(self, requests: list[dict[str, Any]]) -> None:
        for request in requests:
            self._zygote.spawn(request)

    def _spawn_request(self, token: str, env: dict[str, str]) -> dict[str, Any]:
        return {
            "op": "spawn",
            "token": token,
            "address": self._address,
            "warm": self._warm.owns(token),
            "host": self._host,
            "env": env,
            "security": self._spawn_env,
        }

    def _bind_warm(self, record: ActorRecord) -> bool:
        """Give the actor a warm worker by answering its parked ``init``; False when none waits."""
        while (worker := self._warm.take(time.monotonic())) is not None:
            value, payload = self._init_reply(record)
            if self._send_to_client(ClientId(worker.identity), protocol.encode(protocol.REPLY, (worker.req_id, True, value), payload)):
                self._table.set_pid(record, worker.pid)
                return True
            kill_pid(worker.pid)  # gone from the socket: never given anything, it is of no use
        return False

    def tend_warm(self, now: float) -> None:
        """Ask for the warm workers the pool wants, and send away those no creation came for."""
        for token in self._warm.wanted(now):
            self._start_workers(self._gate.submit(token, self._spawn_request(token, {})))
        for worker in self._warm.retire(now):
            self._send_away(worker)

    def _send_away(self, worker: Parked) -> None:
        """Refuse a warm worker's ``init``: it closes its sockets and exits."""
        if not self._send_to_client(ClientId(worker.identity), protocol.encode(protocol.REPLY, (worker.req_id, False, UNWANTED))):
            kill_pid(worker.pid)

    def on_zygote_event(self, event: dict[str, Any]) -> None:
        if event.get("ev") == "spawned":
            self._gate.spawned(event["token"], event["pid"])
            if self._warm.spawned(event["token"], event["pid"]):
                return
            spawned = self._table.by_token(event["token"])
            if spawned is not None:
                self._table.set_pid(spawned, event["pid"])
            elif not self._table.has_pid(event["pid"]):  # not already known from the worker's own init
                kill_pid(event["pid"])  # its actor was killed before it even started
        elif event.get("ev") == "exited":
            self._start_workers(self._gate.exited(event["pid"]))
            record = self._table.pid_exited(event["pid"])
            rundir.remove_sockets_of(event["pid"])
            if record is not None:
                self.worker_exited(record, event["pid"], event["code"])
            else:
                self._warm.exited(event["pid"], time.monotonic())

    def shutdown(self) -> None:
        """Kill every worker of ours (warm ones too) and remove their socket files."""
        for pid in self._warm.reset():  # warm workers: no actor yet, but socket files already
            kill_pid(pid)
            rundir.remove_sockets_of(pid)
        for pid, actor_id in self._table.pids().items():
            kill_pid(pid)
            record = self._table.get(actor_id)
            sockets.remove_ipc(record.address if record is not None else None)

    def describe_warm(self) -> dict[str, Any]:
        return self._warm.describe()

    def zygote_died(self) -> None:
        """Its workers died with it (PDEATHSIG): restart or bury their actors; spawn what it had not answered."""
        self._gate.reset()
        for pid in self._warm.reset():  # they died with it (PDEATHSIG), before they had an actor
            rundir.remove_sockets_of(pid)
        unanswered = [r for r in self._table.hosted() if r.state in (records.STARTING, records.RESTARTING) and r.pid is None]
        for pid in list(self._table.pids()):
            record = self._table.pid_exited(pid)
            rundir.remove_sockets_of(pid)
            if record is not None:
                self.worker_exited(record, pid, -signal.SIGKILL)
        for record in unanswered:
            if record.state in (records.STARTING, records.RESTARTING) and record.pid is None:
                self.spawn(record)

    def init(self, token: Any, client: Client, identity: bytes, req_id: Any) -> tuple[Any, list[Any]] | None:
        """A new worker asks what to build: ``(actor id, incarnation, spec)`` and the class, metadata and arguments.

        None: a warm worker, whose request waits unanswered until an actor is given to it (``_bind_warm``).
        """
        self._start_workers(self._gate.started(token))  # past its costly start: the next may start
        if self._warm.owns(token):
            if self._warm.park(Parked(str(token), identity, req_id, client.pid), time.monotonic()):
                return None
            raise InitRefused(UNWANTED[1])
        record = self._table.by_token(str(token))
        if record is None or record.state not in (records.STARTING, records.RESTARTING):
            raise InitRefused(UNWANTED[1])
        if record.pid is None:
            self._table.set_pid(record, client.pid)
        return self._init_reply(record)

    def _init_reply(self, record: ActorRecord) -> tuple[Any, list[Any]]:
        """What a worker needs to become ``record``'s: its spec (with its environment) and its class and arguments."""
        spec = dict(record.spec, owner_address=record.owner_address, creator_id=record.creator, env=worker_env(record))
        return (record.actor_id, record.incarnation, spec), [self._table.classes[record.class_key], record.meta_blob, *record.args_frames]

    def started(self, actor_id: str, incarnation: int, ok: bool, error: Any, address: str) -> None:
        record = self._table.get(actor_id)
        if record is None:
            return
        decision = lifecycle.started(record, incarnation, ok, error, address)
        if isinstance(decision, lifecycle.Ignore):
            return
        self._table.forget_token(record)
        if isinstance(decision, lifecycle.Alive):
            record.state = records.ALIVE
            record.address = decision.address
            self.notify(record)
        elif isinstance(decision, lifecycle.Bury):
            self.mark_dead(record, decision.reason)

    def worker_exited(self, record: ActorRecord, pid: int, code: int) -> None:
        decision = lifecycle.worker_exited(record, pid, code)
        if record.pid == pid:
            sockets.remove_ipc(record.address)  # the worker's call socket; killed, it could not remove it
            record.pid = None  # never signal this pid again: the kernel may give it to another process
        if isinstance(decision, lifecycle.Restart):
            logger.info("actor %s (%s) worker exited with code %s; restarting", record.class_name, record.actor_id, code)
            self.restart(record)
        elif isinstance(decision, lifecycle.Bury):
            self.mark_dead(record, decision.reason)

    def restart(self, record: ActorRecord) -> None:
        """Replace the actor's worker; callers hear of it before anything else we send them."""
        old = record.pid
        sockets.remove_ipc(record.address)
        lifecycle.next_incarnation(record, records.RESTARTING)
        self.notify(record)
        if old is not None:
            self.kill_worker(old)
        self.spawn(record)

    def kill_worker(self, pid: int) -> None:
        """SIGKILL a worker of ours; only pids the zygote has not yet reported dead, so never a reused one."""
        if self._table.has_pid(pid):
            kill_pid(pid)

    def stop_here(self, record: ActorRecord) -> None:
        """Stop the worker and free what it held, without deciding the actor's fate (it moves, or the caller buries it)."""
        pid, record.pid = record.pid, None  # its exit is then no reason to restart it here
        if pid is not None:
            self.kill_worker(pid)
        self._table.forget_token(record)
        if record.reservation is not None:
            self._resources.release(record.reservation)
            record.reservation = None
        sockets.remove_ipc(record.address)
        self._chores.schedule = True

    def kill(self, record: ActorRecord, why: str, *, no_restart: bool) -> None:
        decision = lifecycle.killed(record, why, no_restart=no_restart)
        if isinstance(decision, lifecycle.Bury):
            self.mark_dead(record, decision.reason)
        elif isinstance(decision, lifecycle.Restart):
            self.restart(record)

    def mark_dead(self, record: ActorRecord, error: str) -> None:
        record.state = records.DEAD
        record.error = error
        if record.pid is not None:
            self.kill_worker(record.pid)
        if record.reservation is not None:
            self._resources.release(record.reservation)
            record.reservation = None
        self._on_dead(record)  # its name is free: here, and at the name's home
        self._table.buried(record)
        self.notify(record)
        record.args_frames = []
        self._chores.schedule = True  # freed resources may let a waiting creation start

    # ------------------------------------------------------------------ telling watchers

    def notify(self, record: ActorRecord) -> None:
        frames = protocol.encode(protocol.ACTOR_STATE, (record.actor_id, *record.public_state()))
        for client_id in list(record.subscribers):
            if not self._send_to_client(client_id, frames):
                self._table.unsubscribe(record, client_id)
        if record.host == self._node_id or record.watchers:
            body = state_body(record)
            for node_id in list(record.watchers):
                if not self._send_to_node(node_id, "state", body):
                    record.watchers.discard(node_id)
        self._chores.publish = True


def worker_env(record: ActorRecord) -> dict[str, str]:
    """The environment of the actor's worker, set before any of its code runs: the GPUs it reserved."""
    if record.reservation is not None and record.reservation.gpu_ids:
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, record.reservation.gpu_ids))}
    return {}


def state_body(record: ActorRecord) -> dict[str, Any]:
    state, incarnation, address, error = record.public_state()
    return {
        "actor_id": record.actor_id,
        "state": state,
        "incarnation": incarnation,
        "address": address,
        "error": error,
        "restarts": record.restarts,
    }


def kill_pid(pid: int) -> None:
    if pid <= 0:
        return  # 0 and negatives would signal whole process groups
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
