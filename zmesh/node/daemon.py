"""The node daemon: binds the node's ROUTER, runs its loop, and wires the parts. No policy lives here.

One thread owns every socket. Callers reach it for creation, lookup, kill and
status (``requests``); once an actor is alive its calls go straight to the worker and
never pass through here. The parts: ``hosted`` (workers of this node), the mesh's
actor components (``mesh/``), the link to other nodes (``mesh/link.py``), the
worker zygote (``pool/``), connected processes (``sessions``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import zmq

from zmesh.node.config import NodeConfig
from zmesh.node.core import membership, records
from zmesh.node.core.departures import Departures
from zmesh.node.core.entry import EntryChange
from zmesh.node.core.lag import LoopLag
from zmesh.node.core.resources import Resources
from zmesh.node.core.table import ActorTable, Chores
from zmesh.node.discovery import sources as discovery
from zmesh.node.hosted import HostedActors
from zmesh.node.leases import Leases
from zmesh.node.mesh.actors import MeshActors
from zmesh.node.mesh.deaths import Deaths
from zmesh.node.mesh.link import Mesh
from zmesh.node.mesh.names import Names
from zmesh.node.mesh.placement import Placement
from zmesh.node.mesh.relay import Relay
from zmesh.node.mesh.view import MeshView
from zmesh.node.pool.door import WorkerDoor
from zmesh.node.pool.warm import WarmPool
from zmesh.node.pool.workers import WorkerPool
from zmesh.node.pool.zygote_link import ZygoteLink
from zmesh.node.requests import Reply, ReplyError, Requests
from zmesh.node.sessions import Sessions
from zmesh.node.store.service import ObjectStore
from zmesh.transport import protocol, rundir, serialization, sockets
from zmesh.transport.ids import ClientId, new_node_id
from zmesh.transport.security import Security, ZapHandler, resolve_key

logger = logging.getLogger(__name__)

__all__ = ["Node", "ReplyError", "node_security"]

# A burst of messages is handled in slices this long, so timers (probes, gossip) never wait behind it.
_SLICE_S = 0.02


def node_security(config: NodeConfig) -> Security:
    """The node's security from its config; refuses what would expose it."""
    if config.insecure:
        logger.warning(
            "INSECURE: this node uses no encryption and no authentication (--insecure); "
            "any process that can reach %s can run code on it. Use for measuring only.",
            config.host,
        )
        return Security(None)
    key, explicit = resolve_key(config.cluster_key)
    if not config.loopback and not explicit:
        raise ValueError(
            f"listening on {config.host} needs an explicit cluster key: run `zmesh keygen PATH`, copy the file "
            "to every machine of the cluster, and start each node with --cluster-key PATH"
        )
    return Security(key)


class Node:
    # The parts that need the mesh link, made once the loop's thread starts (``serve_forever``).
    mesh: Mesh
    hosted: HostedActors
    actors: MeshActors
    requests: Requests

    def __init__(self, config: NodeConfig | None = None) -> None:
        self.config = config or NodeConfig()
        self.node_id = new_node_id()
        self.resources = Resources(self.config.total_resources())
        self.security = node_security(self.config)
        self._slot = self._claim_slot()
        self._ctx = sockets.new_context()
        # Bound before the ROUTER: no handshake is ever left unchecked.
        self._zap = ZapHandler(self._ctx, self.security) if not self.security.insecure else None
        self._router, self.address = sockets.router(self._ctx, self.security, self.config.host, self.config.port)
        self.table = ActorTable(self.node_id, self.config.keep_dead_actors)
        self.chores = Chores()
        self.departures = Departures()
        self._dropped = 0
        self._last_drop_log: dict[bytes, float] = {}
        self._wake_r, self._wake_w = os.pipe()
        # A wake-up after shutdown closed the pipe must not write into whatever file gets the number next
        # (a ZeroMQ socket of this process, say). Reentrant: request_stop may run in a signal handler.
        self._wake_lock = threading.RLock()
        os.set_blocking(self._wake_w, False)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._poller = zmq.Poller()
        self._lag = LoopLag()  # how late and how busy _loop runs, for status()
        self._poller.register(self._router, zmq.POLLIN)
        self._door = WorkerDoor(self._ctx, self.security.max_message_bytes)  # our workers come in here
        self._poller.register(self._door.socket, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        if self._zap is not None:
            self._poller.register(self._zap.socket, zmq.POLLIN)
        # One start per two cores by default: a burst of 1,000 on 3 nodes and 2 cores kept the origin's loop lag p99
        # at 32 ms with one, 72 with two and 128 with four, at the same creation rate (benchmarks/mesh.py burst).
        start_limit = self.config.worker_start_limit or max(1, (os.cpu_count() or 1) // 2)
        # Its events go to the hosted actors, made with the mesh link (``_wire``); none comes before the loop runs.
        self.pool = WorkerPool(
            ZygoteLink(self._poller), WarmPool(self.config.warm_workers, self.config.warm_idle_s), start_limit,
            self._door.address, self.config.host, self.security.spawn_env(), self._send,
            self._worker_spawned, self._worker_gone, lambda tokens: self.hosted.zygote_died(tokens),
            lambda token: self.leases.wants(token) if self.leases.owns_token(token) else self.table.by_token(token) is not None,
        )  # fmt: skip
        self.sessions = Sessions(self._poller, self.security.key.fingerprint if self.security.key is not None else None)
        # Made before the mesh link it relays through, so reached through lambdas; nothing calls them before _wire.
        self.store = ObjectStore(
            self.node_id, self.config, self._ctx, self.security, self._poller,
            lambda node_id, kind, body: self.mesh.send(node_id, kind, body),
            lambda holders: self.actors.gone_addresses(holders) if self._started else [],
            self._member_dead,
        )  # fmt: skip
        self.started_at = time.time()
        self._next_publish = 0.0
        self._started = False

    def _claim_slot(self) -> int | None:
        """The run directory's node slot (``address="auto"`` finds it); a node of a named cluster may share the host."""
        if not self.config.advertise:
            return None
        try:
            return rundir.claim_node_slot()
        except rundir.RunDirError:
            if self.config.cluster is None:
                raise
            return None

    def _wire(self) -> None:
        """Make the mesh link and the actor components, each given what it works with."""
        sources = discovery.sources_for(self.config, self.node_id, self.address, self.security.key)
        entry = {"address": self.address, "total": dict(self.resources.total), "available": dict(self.resources.available)}
        self.mesh = Mesh(self.node_id, self.address, self.config, self.security, self._ctx, entry, self, time.monotonic(), sources)
        view = MeshView()
        names: list[Names] = []  # the name component, made below; a death frees its actor's name there
        self.hosted = HostedActors(
            self.node_id, self.table, self.resources, self.pool, self.chores, self._send, self.mesh.send,
            lambda record: names[0].released(record),
        )  # fmt: skip
        relay = Relay(self.node_id, self.table, view, self.mesh, self.hosted)
        names.append(Names(self.node_id, self.config, self.table, view, self.mesh, relay, self.chores))
        placement = Placement(self.node_id, self.config, self.table, view, self.mesh, self.hosted, relay, self.resources, self.chores)
        deaths = Deaths(
            self.node_id, self.table, view, self.mesh, self.hosted, relay, placement, self.departures, self.chores,
            self.sessions.by_id, self._send,
        )  # fmt: skip
        self.actors = MeshActors(
            self.node_id, self.address, self.table, view, self.mesh, self.resources, self.departures, self.chores,
            names[0], placement, relay, deaths, self.sessions.by_id, self._send,
        )  # fmt: skip
        self.leases = Leases(self.node_id, self.config, self.resources, self.pool, self.mesh, placement, self.chores, self._send)
        self.actors.register("lease", lambda s, b, p, r: self.leases.on_lease(s, b, r))
        self.actors.register("lease_lost", lambda s, b, p, r: self.leases.on_lease_lost(s, b))
        self.actors.register("lease_return", lambda s, b, p, r: self.leases.on_return(s, b))
        self.actors.register("lease_kill", lambda s, b, p, r: self.leases.on_kill(s, b))
        self.requests = Requests(
            self.node_id, self.config, self.table, self.hosted, self.actors, self.leases, self.status, self.request_stop
        )
        self.requests.ops.update(self.store.ops())
        self.actors.register("store_free", lambda s, b, p, r: self.store.on_mesh_free(b))
        self.actors.register("store_adopt", lambda s, b, p, r: self.store.on_mesh_adopt(b))
        self._started = True

    # ------------------------------------------------------------------ the mesh link's hooks

    def on_member(self, change: membership.Changed) -> None:
        self.actors.on_member(change)
        if change.state in (membership.DEAD, membership.LEFT):
            self.leases.member_gone(change.node_id)
            self.store.member_gone(change.node_id)

    def _member_dead(self, node_id: str) -> bool:
        """Whether membership holds ``node_id`` dead or gone (unknown is not dead: it may be joining)."""
        member = self.mesh.membership.get(node_id) if self._started else None
        return member is not None and member.state in (membership.DEAD, membership.LEFT)

    def _worker_spawned(self, token: str, pid: int) -> None:
        if self.leases.owns_token(token):
            self.leases.spawned(token, pid)
        else:
            self.hosted.worker_spawned(token, pid)

    def _worker_gone(self, token: str | None, pid: int, code: int) -> None:
        if token is not None and self.leases.owns_token(token):
            self.leases.exited(token, pid, code)
        else:
            self.hosted.worker_gone(token, pid, code)

    def on_entries(self, changes: list[EntryChange]) -> None:
        self.actors.on_entries(changes)

    def on_app(self, sender: str, kind: str, body: dict[str, Any], payload: list[Any], rid: int | None) -> None:
        self.actors.on_app(sender, kind, body, payload, rid)

    def on_buried(self, incarnation: int) -> None:
        self.actors.on_buried(incarnation)
        # At once, not at the next round: the refutation that follows re-sends our entry at a new
        # incarnation, and it must not carry the buried actors back into the others' views.
        self.chores.publish = False
        self.mesh.set_entry(self.actors.entry(), time.monotonic())

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Run the node on a background thread (the embedded node of ``zmesh.init()``)."""
        self._thread = threading.Thread(target=self.serve_forever, name="zmesh-node", daemon=True)
        self._thread.start()

    def serve_forever(self, on_ready: Callable[[], None] | None = None) -> None:
        """Run the loop in this thread until stopped; ``on_ready`` runs once drivers can find the node."""
        # The zygote is started from the loop's thread: it dies when this thread ends.
        self.pool.start()
        rundir.remove_stale_sockets()
        self._wire()
        if self._slot is not None:
            key = self.security.key
            rundir.write_node_info(
                {
                    "address": self.address,
                    "pid": os.getpid(),
                    "create_time": psutil.Process().create_time(),
                    "node_id": self.node_id,
                    # Where the key is, never the key: drivers of this user load it from there.
                    "key_file": key.path if key is not None else None,
                    "fingerprint": key.fingerprint if key is not None else None,
                    "insecure": key is None,
                }
            )
        logger.info("zmesh node %s listening on %s", self.node_id, self.address)
        if on_ready is not None:
            on_ready()
        try:
            self._loop()
        finally:
            self._shutdown()

    def request_stop(self) -> None:
        """Ask the loop to stop; safe from any thread and from signal handlers."""
        self._stopping = True
        self._wake()

    def stop(self, timeout: float = 10.0) -> None:
        self.request_stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _loop(self) -> None:
        chores = self.chores
        while not self._stopping:
            now = time.monotonic()
            deadline = min(self.mesh.next_deadline(), self._next_publish if chores.publish else 1e18, chores.schedule_at)
            timeout_ms = int(min(0.5, max(0.0, deadline - now)) * 1000) + 1
            due = now + timeout_ms / 1000
            events = self._poller.poll(timeout_ms)
            woke = time.monotonic()
            for sock, _ in events:
                try:
                    if sock is self._router or sock is self._door.socket:
                        self._drain_router(sock)
                    elif self._zap is not None and sock is self._zap.socket:
                        self._zap.handle()
                    elif sock == self._wake_r:
                        os.read(self._wake_r, 4096)
                    elif self.pool.owns(sock):
                        self.pool.on_readable()
                    elif self.store.on_readable(sock, woke):
                        pass
                    elif (exited := self.sessions.exited(sock)) is not None:
                        self._client_gone(exited, "exited")
                except Exception:
                    logger.exception("zmesh node: error while handling an event; continuing")
            try:
                self._chores(time.monotonic())
            except Exception:
                logger.exception("zmesh node: error in the mesh's timers; continuing")
            self.pool.before_poll()
            self._lag.iteration(due, woke, time.monotonic())

    def _chores(self, now: float) -> None:
        chores = self.chores
        self.mesh.tick(now)
        self.hosted.node_incarnation = self.mesh.membership.incarnation
        if chores.publish and now >= self._next_publish:
            # At most one new version of our entry per gossip round, however busy the node is.
            chores.publish = False
            self._next_publish = now + self.config.gossip_round_s
            self.mesh.set_entry(self.actors.entry(), now)
        if chores.schedule or now >= chores.schedule_at:
            chores.schedule = False
            chores.schedule_at = float("inf")
            self.actors.placement.schedule(now)
            self.leases.schedule(now)
        self.actors.placement.check_waiting(now)
        self.leases.tend(now)
        self.actors.names.tick(now)
        self.pool.tend(now)
        self.store.tend(now)
        if self.actors.placement.drained():
            logger.info("zmesh node %s: drained; leaving the mesh", self.node_id)
            self._stopping = True

    def _shutdown(self) -> None:
        if self._started:
            try:
                self.mesh.leave(time.monotonic())
            except Exception:
                logger.exception("zmesh node: saying goodbye to the mesh failed")
        if self._started:
            self.hosted.shutdown()
        self.pool.shutdown()  # every worker killed, the zygote stopped, the socket files of every dead process removed
        self.sessions.close_all()
        if self._slot is not None:
            rundir.remove_node_info(os.getpid())
            os.close(self._slot)
        if self._started:
            self.mesh.close()
        # A moment for the answers already queued (the reply to `zmesh stop` among them) to leave.
        self._router.close(linger=200)
        self._door.close()
        if self._zap is not None:
            self._zap.close()
        self.store.close()  # every segment of this node's store unlinked: no reader maps a file that may linger
        self._ctx.term()
        with self._wake_lock:
            wake_w, self._wake_w = self._wake_w, -1
        os.close(wake_w)
        os.close(self._wake_r)
        logger.info("zmesh node %s stopped", self.node_id)

    # ------------------------------------------------------------------ messages

    def _drain_router(self, router: sockets.Socket) -> None:
        """Handle what waits on a ROUTER (the node's, or the workers' door), for one slice of time at most."""
        until = time.monotonic() + _SLICE_S
        for count in range(1000):
            if count % 16 == 15 and time.monotonic() > until:
                self._wake()  # more may be waiting: come back after the timers
                return
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity = frames[0]
            if router is self._door.socket:
                self._door.came_in(identity)
            try:
                hello = protocol.decode_json(frames[1:], protocol.HELLO_TAG)
                if hello is not None:
                    self._on_hello(identity, hello)
                    continue
                msg = protocol.decode(frames[1:])
                if msg.type == protocol.REQUEST and (len(msg.header) != 3 or not isinstance(msg.header[1], str)):
                    raise protocol.ProtocolError("a request is not (id, op, args)")
                if msg.type == protocol.MESH:
                    self.mesh.handle(msg.header, msg.payload, time.monotonic())
                    continue
            except (protocol.ProtocolError, serialization.DeserializationError, ValueError, TypeError, KeyError, IndexError) as exc:
                self._drop(identity, exc)  # only what fails to decode counts as a bad peer's message
                continue
            try:
                self._dispatch(identity, msg)
            except protocol.ProtocolError as exc:
                self._drop(identity, exc)
            except Exception:
                logger.exception("zmesh node: internal error while handling a %r message; continuing", msg.type)
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w < 0:
                return  # stopped
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # a full pipe wakes the loop just as well

    def _drop(self, identity: bytes, reason: BaseException) -> None:
        self._dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log.get(identity, -1e9) >= 60:
            if len(self._last_drop_log) > 10_000:
                self._last_drop_log.clear()  # many distinct peers sending garbage must not grow memory
            self._last_drop_log[identity] = now
            logger.warning("zmesh node: dropped a bad message from peer %s: %s", identity.hex()[:16], reason)

    def _send(self, identity: bytes, frames: list[Any]) -> bool:
        try:
            self._door.socket_for(identity, self._router).send_multipart([identity, *frames], copy=False)
            return True
        except zmq.ZMQError:
            return False  # the peer is gone

    def _dispatch(self, identity: bytes, msg: protocol.Message) -> None:
        if msg.type == protocol.GOODBYE:
            self._client_gone(ClientId(identity), "said goodbye")
            return
        if msg.type != protocol.REQUEST:
            raise protocol.ProtocolError(f"unexpected message type {msg.type!r} at a node")
        req_id, op, args = msg.header
        reply = Reply(self._send, identity, req_id)
        client = self.sessions.by_id.get(ClientId(identity))
        handler = self.requests.ops.get(op)
        if client is None:
            reply.error("ConnectionError", "say hello first")
            return
        if handler is None:
            reply.error("ValueError", f"unknown request {op!r}")
            return
        try:
            handler(client, tuple(args), msg.payload, reply)
        except ReplyError as exc:
            reply.error(exc.kind, str(exc))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            # The request's fields are not what the op needs: the caller's mistake, told to the caller.
            reply.error("ValueError", f"malformed {op!r} request: {type(exc).__name__}: {exc}")
        except Exception as exc:
            # Our bug, not the peer's: answer anyway, so the caller never waits for ever, and log it loudly.
            logger.exception("zmesh node: internal error while handling %r", op)
            reply.error("ZmeshError", f"internal error in the node while handling {op!r}: {exc!r}")

    def _on_hello(self, identity: bytes, hello: dict[str, Any]) -> None:
        problem = self.sessions.refusal(hello)
        if problem is not None:
            logger.warning("zmesh node: refusing a %s (pid %s): %s", str(hello.get("kind"))[:20], str(hello.get("pid"))[:20], problem)
            self._send(identity, protocol.encode_json(protocol.REFUSED_TAG, {"reason": f"this node refuses it: {problem}"}))
            return
        self.sessions.open(identity, hello)
        if hello.get("kind") == "worker":
            self.pool.said_hello(hello.get("token"))
        self.chores.publish = True
        info = {
            **protocol.identity(),
            "node_id": self.node_id,
            "address": self.address,
            "pid": os.getpid(),
            "resources": self.resources.total,
            "store": self.store.info(),
        }
        self._send(identity, protocol.encode_json(protocol.WELCOME_TAG, info))

    def _client_gone(self, client_id: ClientId, why: str) -> None:
        client = self.sessions.close(client_id)
        if client is None:
            return
        if why == "exited":
            sockets.remove_ipc(client.address)
        self.actors.deaths.client_gone(client, why)
        self.leases.client_gone(client)
        self.store.client_gone(client_id.hex())

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        every = self.table.values()
        dead = [r.describe() for r in every if r.state == records.DEAD]
        return {
            "node_id": self.node_id,
            "address": self.address,
            "pid": os.getpid(),
            "uptime_s": time.time() - self.started_at,
            "resources_total": dict(self.resources.total),
            "resources_available": dict(self.resources.available),
            "actors": [r.describe() for r in every if r.state != records.DEAD],
            "dead_actors": dead[-50:],
            "waiting": [r.describe() for r in self.table.waiting()],
            "members": self.actors.members() if self._started else [],
            "draining": self.actors.placement.draining if self._started else False,
            "clients": len(self.sessions.by_id),
            "dropped_messages": self._dropped + (self.requests.dropped_by_workers() if self._started else 0),
            "dropped_by_node": self._dropped,
            # Handshakes refused at this node's port: peers without the cluster key.
            "refused_connections": self._zap.refused if self._zap is not None else 0,
            "secure": not self.security.insecure,
            "cluster": self.security.key.fingerprint if self.security.key is not None else None,
            "warm_workers": self.pool.describe() if self._started else {},
            "tasks": self.leases.describe() if self._started else {},
            "object_store": self.store.describe(),
            **self._lag.summary(time.monotonic()),
        }
