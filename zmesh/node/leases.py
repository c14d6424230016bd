"""Leases of task workers: requests waiting for resources, spilling to members with room, reuse, return, reclaim.

A caller that has tasks of one resource shape asks its node for a lease. The node decides where
with the same scheduler and view as actor placement (DEFAULT, SPREAD, node affinity): here, when
the demand fits; else on the least loaded member with room, which reserves or refuses (a refusal
means try the next); else the request waits, in order, until resources free up. A lease here
reserves its demand and binds a task worker: an idle one at once, or a new one from the worker
pool (warm, or forked through the start gate). The answer names the worker's call sockets; the
caller then sends it tasks directly, and hands the lease back when it has nothing left of that
shape. Its worker then waits idle for the next lease; more idle than ``task_workers_idle`` exit
after ``task_idle_s``.

A lease ends with its holder: a caller that exits (or says goodbye) loses its leases, and a worker
still running one of its tasks is killed. A worker that dies, or a member that dies with the workers
it lent, is reported to the holder (``LEASE_LOST``), who runs those tasks again or fails them. While
a task waits in ``zmesh.get`` its lease lends its CPUs back (``blocked``), as Ray does.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from zmesh.node.config import NodeConfig
from zmesh.node.core import scheduler
from zmesh.node.core.records import Client
from zmesh.node.core.resources import Reservation, Resources
from zmesh.node.core.table import Chores
from zmesh.node.mesh.link import Mesh
from zmesh.node.mesh.placement import Placement
from zmesh.node.pool.workers import UNWANTED, InitRefused, WorkerPool
from zmesh.transport import protocol, sockets
from zmesh.transport.ids import ClientId

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "t:"  # the worker pool's tokens of task workers (an actor's are its own)
WAITING, FORWARDED, STARTING, GRANTED = "WAITING", "FORWARDED", "STARTING", "GRANTED"
RETURNED = ("Returned", "the lease was handed back before it was granted")
RECENT_S = 1.0  # a few gossip rounds: how long a placement counts against its member for the next ones
_START_TRIES = 3  # workers that may die starting for one lease before it fails

Answer = Callable[[bool, Any], None]


@dataclasses.dataclass(eq=False)
class Proc:
    """A task worker process of this node."""

    worker_id: str
    token: str
    pid: int | None = None
    address: str | None = None  # its call sockets, once it reported started
    client: ClientId | None = None  # its runtime's session here
    runtime_address: str | None = None
    lease: Lease | None = None
    idle_since: float = 0.0


@dataclasses.dataclass(eq=False)
class Lease:
    lease_id: str
    demand: dict[str, float]
    strategy: Any
    holder: ClientId | None  # the local client that asked; None when another member asked for it
    origin: str  # the member whose client holds it
    answer: Answer | None
    waiting_since: float
    state: str = WAITING
    host: str | None = None  # where it runs: this node, or a member it was forwarded to
    reservation: Reservation | None = None
    proc: Proc | None = None
    tried: set[str] = dataclasses.field(default_factory=set)
    warned: bool = False
    blocked: int = 0  # tasks waiting in get: the CPUs are lent while > 0
    starts: int = 0

    def reply(self, ok: bool, value: Any) -> None:
        answer, self.answer = self.answer, None
        if answer is not None:
            answer(ok, value)


class Leases:
    def __init__(
        self,
        node_id: str,
        config: NodeConfig,
        resources: Resources,
        pool: WorkerPool,
        mesh: Mesh,
        placement: Placement,
        chores: Chores,
        send_to_client: Callable[[ClientId, list[Any]], bool],
    ) -> None:
        self._me = node_id
        self._config = config
        self._resources = resources
        self._pool = pool
        self._mesh = mesh
        self._placement = placement
        self._chores = chores
        self._send_to_client = send_to_client
        self._leases: dict[str, Lease] = {}
        self._waiting: list[Lease] = []
        self._procs: dict[str, Proc] = {}  # by pool token
        self._by_worker: dict[str, Proc] = {}
        self._by_client: dict[ClientId, Proc] = {}
        self._idle: list[Proc] = []
        # Where leases went in the last RECENT_S (here too): gossip shows a member's reservation a round or
        # more after it granted; DEFAULT breaks ties between members with room away from them meanwhile.
        self._recent: collections.deque[tuple[float, str]] = collections.deque()
        self._spread_last = ""  # the member the last SPREAD lease went to: the next goes to the next one that fits
        self._keep_idle = config.task_workers_idle or max(1, int(resources.total.get("CPU", 0)) or (os.cpu_count() or 1))
        self.granted = 0  # leases ever granted here (status)

    # ------------------------------------------------------------------ requests from local clients

    def ask(self, client: Client, lease_id: str, demand: Any, strategy: Any, answer: Answer) -> None:
        if not isinstance(lease_id, str) or lease_id in self._leases:
            raise ValueError(f"lease id {lease_id!r} is not a new string")
        wanted = _demand(demand)
        scheduler.parse_strategy(strategy)  # a ValueError names a bad one
        lease = Lease(lease_id, wanted, strategy, client.client_id, self._me, answer, time.monotonic())
        self._leases[lease_id] = lease
        self._waiting.append(lease)
        self._chores.schedule = True

    def hand_back(self, lease_id: str, kill: bool = False) -> None:
        """The holder is done with ``lease_id`` (granted or not); with ``kill`` its worker may be mid-task: it goes."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        lease.reply(False, RETURNED)
        if lease in self._waiting:
            self._waiting.remove(lease)
        if lease.host not in (None, self._me):
            if lease.state == GRANTED:
                self._mesh.send(lease.host, "lease_return", {"lease_id": lease_id, "kill": kill})
            return  # a forward still unanswered is handed back when its answer comes
        self._free(lease)
        proc = lease.proc
        lease.proc = None
        if proc is not None:
            proc.lease = None
            if kill and proc.pid is not None:
                self._pool.kill(proc.pid)
            elif proc.address is not None:
                self._rest(proc)

    def kill_worker(self, lease_id: str) -> None:
        """``zmesh.cancel(force=True)``: the lease's worker is killed; its holder hears it lost."""
        lease = self._leases.get(lease_id)
        if lease is None:
            return
        if lease.host not in (None, self._me):
            self._mesh.send(lease.host, "lease_kill", {"lease_id": lease_id})
        elif lease.proc is not None and lease.proc.pid is not None:
            self._pool.kill(lease.proc.pid)

    def blocked(self, client: Client, blocked: bool) -> None:
        """The task of ``client`` (a task worker) waits in get (True) or goes on (False): its CPUs are lent meanwhile."""
        proc = self._by_client.get(client.client_id)
        lease = proc.lease if proc is not None else None
        if lease is None or lease.reservation is None:
            return
        cpus = {"CPU": lease.demand["CPU"]} if lease.demand.get("CPU") else {}
        if blocked:
            lease.blocked += 1
            if lease.blocked == 1 and cpus:
                self._resources.release(Reservation(cpus, []))
                self._changed()
        elif lease.blocked > 0:
            lease.blocked -= 1
            if lease.blocked == 0 and cpus:
                self._resources.take(cpus)
                self._changed()

    def client_gone(self, client: Client) -> None:
        """A caller exited: its leases end, and workers it may have left mid-task are killed."""
        for lease in [x for x in self._leases.values() if x.holder == client.client_id]:
            self.hand_back(lease.lease_id, kill=True)
        proc = self._by_client.pop(client.client_id, None)
        if proc is not None:
            proc.client = None

    # ------------------------------------------------------------------ placing waiting leases

    def schedule(self, now: float) -> None:
        if not self._waiting:
            return
        view = self._placement.node_views()
        members = {m.node_id: m.state for m in self._mesh.membership.members()}
        while self._recent and now - self._recent[0][0] > RECENT_S:
            self._recent.popleft()
        recent = collections.Counter(node for _, node in self._recent)
        for lease in list(self._waiting):
            spread = scheduler.spread_after(lease.demand, view, lease.tried, self._spread_last) if lease.strategy == "SPREAD" else None
            if spread is not None:
                self._spread_last = spread.node_id
            decision = spread or scheduler.place(
                lease.demand, lease.strategy, self._me, view, lease.tried, recent,
                members, now - lease.waiting_since, self._config.affinity_wait_s,
            )  # fmt: skip
            if isinstance(decision, scheduler.Fail):
                self._waiting.remove(lease)
                del self._leases[lease.lease_id]
                lease.reply(False, ("ZmeshError", f"the task cannot be scheduled: {decision.reason}"))
            elif isinstance(decision, scheduler.Wait):
                if decision.until is not None:
                    self._chores.schedule_by(now + decision.until)
                if decision.infeasible and not lease.warned:
                    # Only then: a lease that waits for busy resources is the normal state of a long queue of tasks.
                    lease.warned = True
                    logger.warning("tasks needing %s wait: %s; they run once a node that fits joins", lease.demand, decision.reason)
                lease.tried.clear()
            elif decision.node_id == self._me:
                reservation = self._resources.try_reserve(lease.demand)
                if reservation is None:
                    lease.tried.add(self._me)
                    continue
                self._waiting.remove(lease)
                self._chores.publish = True
                self._recent.append((now, self._me))
                recent[self._me] += 1
                lease.reservation, lease.host = reservation, self._me
                self._bind(lease)
                mine = view[0]
                view[0] = scheduler.NodeView(self._me, mine.total, dict(self._resources.available), mine.actors, mine.draining)
            else:
                self._forward(lease, decision.node_id, now)
                self._recent.append((now, decision.node_id))
                recent[decision.node_id] += 1

    def _bind(self, lease: Lease) -> None:
        """Give ``lease`` (resources reserved here) a worker: an idle one, else a new one from the pool."""
        lease.state = STARTING
        while self._idle:
            proc = self._idle.pop()
            if proc.pid is not None and proc.address is not None:
                self._grant(lease, proc)
                return
        worker_id = "t" + os.urandom(8).hex()
        proc = Proc(worker_id, TOKEN_PREFIX + worker_id)
        self._procs[proc.token] = self._by_worker[worker_id] = proc
        proc.lease, lease.proc = lease, proc
        lease.starts += 1
        pid = self._pool.lease(proc.token, {}, lambda: self._init_reply(proc))
        if pid is not None:
            proc.pid = pid

    def _grant(self, lease: Lease, proc: Proc) -> None:
        lease.state, lease.proc, proc.lease = GRANTED, proc, lease
        self.granted += 1
        env = {}
        if lease.reservation is not None and lease.reservation.gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, lease.reservation.gpu_ids))
        lease.reply(True, (lease.lease_id, proc.address, proc.runtime_address, proc.worker_id, self._me, env))

    def _free(self, lease: Lease) -> None:
        """Release what ``lease`` reserved here (less the CPUs a waiting task lent already)."""
        reservation, lease.reservation = lease.reservation, None
        if reservation is None:
            return
        if lease.blocked and reservation.demand.get("CPU"):
            reservation = Reservation({k: v for k, v in reservation.demand.items() if k != "CPU"}, reservation.gpu_ids)
        self._resources.release(reservation)
        self._changed()

    def _changed(self) -> None:
        """Our resources changed: waiting leases may fit now, and the other members must see it (gossip)."""
        self._chores.schedule = True
        self._chores.publish = True

    def _rest(self, proc: Proc) -> None:
        proc.idle_since = time.monotonic()
        self._idle.append(proc)

    def tend(self, now: float) -> None:
        """Workers idle beyond the ones kept exit after ``task_idle_s``."""
        if len(self._idle) <= self._keep_idle:
            return
        self._idle.sort(key=lambda p: p.idle_since)
        extra = len(self._idle) - self._keep_idle
        for proc in [p for p in self._idle[:extra] if now - p.idle_since >= self._config.task_idle_s]:
            self._idle.remove(proc)
            if proc.pid is not None:
                self._pool.kill(proc.pid)

    # ------------------------------------------------------------------ workers (pool and worker requests)

    def owns_token(self, token: Any) -> bool:
        return isinstance(token, str) and token.startswith(TOKEN_PREFIX)

    def owns_worker(self, worker_id: Any) -> bool:
        return worker_id in self._by_worker

    def wants(self, token: str) -> bool:
        """Whether the queued fork for ``token`` is still worth making; if not the pool drops it, and so do we."""
        proc = self._procs.get(token)
        if proc is not None and proc.lease is None:
            # Its lease was handed back before the fork: no worker will come to report started or exited.
            del self._procs[token]
            self._by_worker.pop(proc.worker_id, None)
            return False
        return proc is not None

    def _init_reply(self, proc: Proc) -> tuple[Any, list[Any]]:
        return (proc.worker_id, 0, {"kind": "tasks"}), []

    def init(self, token: Any, client: Client, identity: bytes, req_id: Any) -> tuple[Any, list[Any]] | None:
        if not self._pool.arrived(token, identity, req_id, client.pid):
            return None
        proc = self._procs.get(str(token))
        if proc is None or proc.lease is None:
            raise InitRefused(UNWANTED[1])
        proc.pid = proc.pid or client.pid
        return self._init_reply(proc)

    def spawned(self, token: str, pid: int) -> None:
        proc = self._procs.get(token)
        if proc is not None:
            proc.pid = pid
        else:
            self._pool.kill(pid)

    def started(self, worker_id: str, client: Client, address: str) -> None:
        proc = self._by_worker.get(worker_id)
        if proc is None:
            return
        self._pool.forget(proc.token)
        proc.address, proc.client, proc.runtime_address = address, client.client_id, client.address
        self._by_client[client.client_id] = proc
        lease = proc.lease
        if lease is not None and lease.state == STARTING and lease.lease_id in self._leases:
            self._grant(lease, proc)
        else:
            proc.lease = None
            self._rest(proc)

    def exited(self, token: str, pid: int, code: int) -> None:
        proc = self._procs.pop(token, None)
        if proc is None:
            return
        self._by_worker.pop(proc.worker_id, None)
        if proc.client is not None:
            self._by_client.pop(proc.client, None)
        if proc in self._idle:
            self._idle.remove(proc)
        sockets.remove_ipc(proc.address)
        lease = proc.lease
        if lease is None or lease.lease_id not in self._leases:
            return
        lease.proc = None
        if lease.state == STARTING and lease.starts < _START_TRIES:
            self._bind(lease)  # died before it could serve: another one
            return
        self._free(lease)
        self._lost(lease, f"its worker (pid {pid}) exited with code {code}")

    def _lost(self, lease: Lease, reason: str) -> None:
        """Tell the holder its lease is gone (through the member it asked, if that is not this one)."""
        self._leases.pop(lease.lease_id, None)
        if lease.answer is not None:
            lease.reply(False, ("WorkerCrashedError", reason))
        elif lease.holder is not None:
            self._send_to_client(lease.holder, protocol.encode(protocol.LEASE_LOST, (lease.lease_id, reason)))
        elif lease.origin != self._me:
            self._mesh.send(lease.origin, "lease_lost", {"lease_id": lease.lease_id, "reason": reason})

    # ------------------------------------------------------------------ other members

    def _forward(self, lease: Lease, target: str, now: float) -> None:
        self._waiting.remove(lease)
        lease.state, lease.host = FORWARDED, target
        body = {"lease_id": lease.lease_id, "demand": lease.demand}

        def on_reply(ok: bool, value: Any, _: list[Any]) -> None:
            if self._leases.get(lease.lease_id) is not lease or lease.state != FORWARDED:
                if ok and isinstance(value, list | tuple):
                    self._mesh.send(target, "lease_return", {"lease_id": lease.lease_id, "kill": False})
                return
            if ok and isinstance(value, list | tuple) and len(value) == 6:
                lease.state = GRANTED
                self.granted += 1
                lease.reply(True, tuple(value))
                return
            if not ok:  # unanswered: it may still grant it; then it must let it go
                self._mesh.send(target, "lease_return", {"lease_id": lease.lease_id, "kill": False})
            lease.tried.add(target)
            lease.state, lease.host = WAITING, None
            self._waiting.append(lease)
            self._chores.schedule = True

        self._mesh.request(target, "lease", body, [], on_reply, now)

    def on_lease(self, sender: str, body: dict[str, Any], rid: int | None) -> None:
        """Another member's caller wants a lease here: reserved now and granted once a worker serves, or refused."""
        lease_id = str(body["lease_id"])
        demand = _demand(body["demand"])

        def answer(ok: bool, value: Any) -> None:
            if rid is not None:
                self._mesh.reply(sender, rid, ok, value if ok else "no worker")

        if lease_id in self._leases:
            return  # a retry of one we took: its answer comes when its worker serves
        reservation = None if self._placement.draining or self._mesh.leaving else self._resources.try_reserve(demand)
        if reservation is None:
            answer(True, f"no room for {demand} (available {self._resources.available})")
            return
        lease = Lease(lease_id, demand, "DEFAULT", None, sender, answer, time.monotonic())
        self._chores.publish = True
        lease.reservation, lease.host = reservation, self._me
        self._leases[lease_id] = lease
        self._bind(lease)

    def on_lease_lost(self, sender: str, body: dict[str, Any]) -> None:
        lease = self._leases.get(str(body["lease_id"]))
        if lease is not None and lease.host == sender:
            self._lost(lease, str(body.get("reason") or f"its worker on node {sender} is gone"))

    def on_return(self, sender: str, body: dict[str, Any]) -> None:
        lease = self._leases.get(str(body["lease_id"]))
        if lease is not None and lease.origin == sender and lease.holder is None:
            self.hand_back(lease.lease_id, kill=bool(body.get("kill")))

    def on_kill(self, sender: str, body: dict[str, Any]) -> None:
        lease = self._leases.get(str(body["lease_id"]))
        if lease is not None and lease.origin == sender:
            self.kill_worker(lease.lease_id)

    def member_gone(self, node_id: str) -> None:
        """Leases lent by a dead member are lost to their holders; the ones it held here end (their workers killed)."""
        for lease in list(self._leases.values()):
            if lease.host == node_id and lease.origin == self._me:
                if lease.state == FORWARDED:
                    continue  # its request fails by itself, and the lease waits again
                self._lost(lease, f"node {node_id}, which ran its worker, is gone")
            elif lease.origin == node_id and lease.holder is None:
                self.hand_back(lease.lease_id, kill=True)

    # ------------------------------------------------------------------ status

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "granted": sum(1 for x in self._leases.values() if x.state == GRANTED),
            "granted_total": self.granted,
            "waiting": [{"demand": x.demand, "waited_s": round(now - x.waiting_since, 1), "warned": x.warned} for x in self._waiting],
            "workers": len(self._procs),
            "idle_workers": len(self._idle),
        }


def _demand(value: Any) -> dict[str, float]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, int | float) and v >= 0 for k, v in value.items()):
        raise ValueError(f"a lease's demand must be a dict of resource name -> amount >= 0, got {value!r}")
    return {k: float(v) for k, v in value.items() if v > 0}
