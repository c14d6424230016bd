"""The actors whose workers run on this node: spawning, start reports, exits, restarts, kills and deaths.

The decisions are ``core.lifecycle``'s; this component carries them out: it leases
workers from the worker pool (``pool/workers.py``) under each actor's worker token,
releases their resources and tells whoever watches the actor (subscribed clients
here, watching nodes elsewhere) each new state. Which record a token or pid stands
for is the actor table's; the pool knows only tokens and pids.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from typing import Any

from zmesh.node.core import lifecycle, records
from zmesh.node.core.records import ActorRecord, Client
from zmesh.node.core.resources import Resources
from zmesh.node.core.table import ActorTable, Chores
from zmesh.node.pool.workers import UNWANTED, InitRefused, WorkerPool
from zmesh.transport import protocol, sockets
from zmesh.transport.ids import ClientId

logger = logging.getLogger(__name__)

SendToClient = Callable[[ClientId, list[Any]], bool]
SendToNode = Callable[[str, str, dict[str, Any]], bool]


class HostedActors:
    def __init__(
        self,
        node_id: str,
        table: ActorTable,
        resources: Resources,
        pool: WorkerPool,
        chores: Chores,
        send_to_client: SendToClient,
        send_to_node: SendToNode,
        on_dead: Callable[[ActorRecord], None],
    ) -> None:
        self._node_id = node_id
        self._table = table
        self._resources = resources
        self._pool = pool
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
        pid = self._pool.lease(record.token, worker_env(record), lambda: self._init_reply(record))
        if pid is not None:  # a warm worker, now this actor's
            self._table.set_pid(record, pid)

    def worker_spawned(self, token: str, pid: int) -> None:
        """The pool forked the worker of ``token`` (a lease not forgotten)."""
        record = self._table.by_token(token)
        if record is not None:
            self._table.set_pid(record, pid)
        elif not self._table.has_pid(pid):  # not already known from the worker's own init
            # Its actor moved on (a new incarnation, in the mesh's hands) before the worker started.
            self._pool.forget(token)
            self._pool.kill(pid)

    def worker_gone(self, token: str | None, pid: int, code: int) -> None:
        """A worker of the pool exited (its socket files are already removed)."""
        record = self._table.pid_exited(pid)
        if record is not None:
            self.worker_exited(record, pid, code)

    def shutdown(self) -> None:
        """Remove our actors' call sockets; the pool kills their workers and removes the rest."""
        for actor_id in self._table.pids().values():
            record = self._table.get(actor_id)
            sockets.remove_ipc(record.address if record is not None else None)

    def zygote_died(self, tokens: list[str]) -> None:
        """Its workers died with it (PDEATHSIG): restart or bury their actors; spawn what it had not answered.

        The pool names the leases it lost (``tokens``), but a running actor's token is no longer indexed
        (forgotten once it started): the table's pids say which actors lost their worker.
        """
        unanswered = [r for r in self._table.hosted() if r.state in (records.STARTING, records.RESTARTING) and r.pid is None]
        for pid in list(self._table.pids()):
            record = self._table.pid_exited(pid)
            if record is not None:
                self.worker_exited(record, pid, -signal.SIGKILL)
        for record in unanswered:
            if record.state in (records.STARTING, records.RESTARTING) and record.pid is None:
                self.spawn(record)

    def init(self, token: Any, client: Client, identity: bytes, req_id: Any) -> tuple[Any, list[Any]] | None:
        """A new worker asks what to build: ``(actor id, incarnation, spec)`` and the class, metadata and arguments.

        None: a warm worker, whose request waits unanswered until an actor is given to it (``spawn``).
        """
        if not self._pool.arrived(token, identity, req_id, client.pid):
            return None
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
        self._forget_token(record)
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
        self._pool.forget(record.token)  # a fork still queued for the old incarnation is of no use now
        lifecycle.next_incarnation(record, records.RESTARTING)
        self.notify(record)
        if old is not None:
            self.kill_worker(old)
        self.spawn(record)

    def kill_worker(self, pid: int) -> None:
        """SIGKILL a worker of ours; the pool signals only pids not yet reported dead, so never a reused one."""
        self._pool.kill(pid)

    def stop_here(self, record: ActorRecord) -> None:
        """Stop the worker and free what it held, without deciding the actor's fate (it moves, or the caller buries it)."""
        pid, record.pid = record.pid, None  # its exit is then no reason to restart it here
        if pid is not None:
            self.kill_worker(pid)
        self._forget_token(record)
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
        self._pool.forget(record.token)  # a worker still queued or forking for it is not wanted
        self._table.buried(record)
        self.notify(record)
        record.args_frames = []
        self._chores.schedule = True  # freed resources may let a waiting creation start

    def _forget_token(self, record: ActorRecord) -> None:
        """The actor wants no (other) worker under its token: the table and the pool both forget it."""
        self._table.forget_token(record)
        self._pool.forget(record.token)

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
