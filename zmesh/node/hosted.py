"""The actors whose workers run on this node: spawning, start reports, exits, restarts, kills and deaths.

The decisions are ``core.lifecycle``'s; this component carries them out: it asks the
zygote for workers, signals them, releases their resources and tells whoever watches
the actor (subscribed clients here, watching nodes elsewhere) each new state.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from zmesh.node.core import lifecycle, records
from zmesh.node.core.records import ActorRecord, Client
from zmesh.node.core.resources import Resources
from zmesh.node.core.table import ActorTable, Chores
from zmesh.node.pool.zygote_link import ZygoteLink
from zmesh.transport import protocol, rundir, sockets
from zmesh.transport.ids import ClientId

logger = logging.getLogger(__name__)

SendToClient = Callable[[ClientId, list[Any]], bool]
SendToNode = Callable[[str, str, dict[str, Any]], bool]


class InitRefused(Exception):
    """A worker asked for an actor that no longer wants it (killed, or already replaced)."""


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
        env = {}
        if record.reservation is not None and record.reservation.gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, record.reservation.gpu_ids))
        self._zygote.spawn(
            {"op": "spawn", "token": record.token, "address": self._address, "host": self._host, "env": env, "security": self._spawn_env}
        )

    def on_zygote_event(self, event: dict[str, Any]) -> None:
        if event.get("ev") == "spawned":
            spawned = self._table.by_token(event["token"])
            if spawned is not None:
                self._table.set_pid(spawned, event["pid"])
            elif not self._table.has_pid(event["pid"]):  # not already known from the worker's own init
                kill_pid(event["pid"])  # its actor was killed before it even started
        elif event.get("ev") == "exited":
            record = self._table.pid_exited(event["pid"])
            rundir.remove_sockets_of(event["pid"])
            if record is not None:
                self.worker_exited(record, event["pid"], event["code"])

    def zygote_died(self) -> None:
        """Its workers died with it (PDEATHSIG): restart or bury their actors; spawn what it had not answered."""
        unanswered = [r for r in self._table.hosted() if r.state in (records.STARTING, records.RESTARTING) and r.pid is None]
        for pid in list(self._table.pids()):
            record = self._table.pid_exited(pid)
            rundir.remove_sockets_of(pid)
            if record is not None:
                self.worker_exited(record, pid, -signal.SIGKILL)
        for record in unanswered:
            if record.state in (records.STARTING, records.RESTARTING) and record.pid is None:
                self.spawn(record)

    def init(self, token: Any, client: Client) -> tuple[Any, list[Any]]:
        """A new worker asks what to build: ``(actor id, incarnation, spec)`` and the class, metadata and arguments."""
        record = self._table.by_token(str(token))
        if record is None or record.state not in (records.STARTING, records.RESTARTING):
            raise InitRefused("this worker is no longer wanted")
        if record.pid is None:
            self._table.set_pid(record, client.pid)
        spec = dict(record.spec, owner_address=record.owner_address, creator_id=record.creator)
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
