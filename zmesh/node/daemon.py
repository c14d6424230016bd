"""The node daemon: binds the node's ROUTER, runs its loop, and keeps actors placed and alive.

One thread owns every socket. Callers reach it for creation, lookup, kill and
status; once an actor is alive its calls go straight to the worker and never
pass through here.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import psutil
import zmq

from zmesh.node.config import NodeConfig
from zmesh.node.core import lifecycle, records
from zmesh.node.core.records import ActorRecord, Client
from zmesh.node.core.resources import Resources
from zmesh.node.discovery import sources as discovery
from zmesh.node.mesh.actors import Deferred, MeshActors, ReplyError, _state_body, _stub_from_row
from zmesh.node.mesh.link import Mesh
from zmesh.node.pool.door import WorkerDoor
from zmesh.node.pool.gate import StartGate
from zmesh.node.pool.warm import Parked, WarmPool
from zmesh.node.pool.zygote_link import ZygoteDied, ZygoteLink
from zmesh.node.sessions import Sessions
from zmesh.transport import protocol, rundir, serialization, sockets
from zmesh.transport.ids import ActorId, ClientId, new_node_id
from zmesh.transport.security import Security, ZapHandler, resolve_key

logger = logging.getLogger(__name__)


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


__all__ = ["Node", "ReplyError", "node_security"]


class Node(MeshActors):
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
        self._actors: dict[ActorId, ActorRecord] = {}
        self._names: dict[tuple[str, str], ActorId] = {}
        self._classes: dict[str, bytes] = {}
        self._waiting: list[ActorId] = []
        self._by_token: dict[str, ActorId] = {}
        self._by_pid: dict[int, ActorId] = {}
        self._dropped = 0
        self._dropped_by_workers: dict[ClientId, int] = {}  # kept after a worker exits: the count is history
        self._last_drop_log: dict[bytes, float] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stopping = False
        self._reschedule = False
        self._dead: deque[ActorId] = deque()
        self._thread: threading.Thread | None = None
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        self._door = WorkerDoor(self._ctx, self.security.max_message_bytes)  # our workers come in here
        self._poller.register(self._door.socket, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)
        if self._zap is not None:
            self._poller.register(self._zap.socket, zmq.POLLIN)
        self._zygote = ZygoteLink(self._poller)
        self._warm = WarmPool(self.config.warm_workers, self.config.warm_idle_s)
        start_limit = self.config.worker_start_limit or 2 * (os.cpu_count() or 1)
        self._gate = StartGate(start_limit, lambda token: self._warm.expects(token) or token in self._by_token)
        self.sessions = Sessions(self._poller, self.security.key.fingerprint if self.security.key is not None else None)
        self._clients = self.sessions.by_id
        self._ops: dict[str, Callable[[Client, tuple[Any, ...], list[Any]], tuple[Any, list[Any]]]] = {
            "create": self._op_create,
            "resolve": self._op_resolve,
            "lookup": self._op_lookup,
            "kill": self._op_kill,
            "status": self._op_status,
            "stop": self._op_stop,
            "init": self._op_init,
            "started": self._op_started,
            "dropped": self._op_dropped,
            "gone": self._op_gone,
            "members": self._op_members,
            "list_actors": self._op_list_actors,
            "kill_named": self._op_kill_named,
            "drain": self._op_drain,
            "subscribe_membership": self._op_subscribe_membership,
        }
        self.started_at = time.time()
        self.mesh: Mesh = None  # type: ignore[assignment]  # made once the address is known (serve_forever)
        self._entry_dirty = True
        self._next_publish = 0.0
        self._current: tuple[bytes, Any] = (b"", None)  # the request being handled, for ops that answer later
        self._mesh_init()

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

    def _start_mesh(self) -> None:
        sources: list[discovery.Source] = []
        if self.config.join:
            sources.append(discovery.Seeds(self.config.join))
        if self.config.cluster is not None and self.config.advertise:
            sources.append(discovery.RunDirectory(self.config.cluster, self.node_id, self.address))
        if self.config.mdns_enabled:
            from zmesh.node.discovery.mdns import MdnsSource
            from zmesh.transport.protocol import PROTOCOL_VERSION, python_version

            host, _, port = self.address.removeprefix("tcp://").rpartition(":")
            key = self.security.key
            mdns = MdnsSource(
                cluster=self.config.cluster or "default",
                node_id=self.node_id,
                host=host,
                port=int(port),
                fingerprint=key.fingerprint if key is not None else None,
                protocol_version=PROTOCOL_VERSION,
                python=python_version(),
            )
            mdns.start()
            sources.append(discovery.Announced(mdns))
        self.mesh = Mesh(self.node_id, self.address, self.config, self.security, self._ctx, self._entry(), self, time.monotonic(), sources)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Run the node on a background thread (the embedded node of ``zmesh.init()``)."""
        self._thread = threading.Thread(target=self.serve_forever, name="zmesh-node", daemon=True)
        self._thread.start()

    def serve_forever(self, on_ready: Callable[[], None] | None = None) -> None:
        """Run the loop in this thread until stopped; ``on_ready`` runs once drivers can find the node."""
        # The zygote is started from the loop's thread: it dies when this thread ends.
        self._zygote.start()
        rundir.remove_stale_sockets()
        self._start_mesh()
        if self._slot is not None:
            proc = psutil.Process()
            key = self.security.key
            rundir.write_node_info(
                {
                    "address": self.address,
                    "pid": os.getpid(),
                    "create_time": proc.create_time(),
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
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        self.request_stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping:
            wait_s = min(
                0.5, max(0.0, min(self.mesh.next_deadline(), self._next_publish if self._entry_dirty else 1e18) - time.monotonic())
            )
            events = self._poller.poll(int(wait_s * 1000) + 1)
            for sock, _ in events:
                try:
                    if sock is self._router or sock is self._door.socket:
                        self._drain_router(sock)
                    elif self._zap is not None and sock is self._zap.socket:
                        self._zap.handle()
                    elif sock == self._wake_r:
                        os.read(self._wake_r, 4096)
                    elif self._zygote.owns(sock):
                        self._on_zygote()
                    elif (exited := self.sessions.exited(sock)) is not None:
                        self._client_gone(exited, "exited")
                except Exception:
                    logger.exception("zmesh node: error while handling an event; continuing")
            try:
                now = time.monotonic()
                self.mesh.tick(now)
                if self._entry_dirty and now >= self._next_publish:
                    # At most one new version of our entry per gossip round, however busy the node is.
                    self._entry_dirty = False
                    self._next_publish = now + self.config.gossip_round_s
                    self.mesh.set_entry(self._entry(), now)
                if self._reschedule:
                    self._reschedule = False
                    self._schedule()
                self._check_waiting()
                self._tend_warm(now)
                if self._drained():
                    logger.info("zmesh node %s: drained; leaving the mesh", self.node_id)
                    self._stopping = True
            except Exception:
                logger.exception("zmesh node: error in the mesh's timers; continuing")
            self._zygote.before_poll()

    def _shutdown(self) -> None:
        if self.mesh is not None:
            try:
                self.mesh.leave(time.monotonic())
            except Exception:
                logger.exception("zmesh node: saying goodbye to the mesh failed")
        for pid, actor_id in list(self._by_pid.items()):
            self._kill_worker(pid)
            sockets.remove_ipc(self._actors[actor_id].address if actor_id in self._actors else None)
        for pid in self._warm.reset():  # warm workers: no actor yet, but socket files already
            _kill(pid)
            rundir.remove_sockets_of(pid)
        for client in self._clients.values():
            if client.kind == "worker":  # killed with their actors above
                sockets.remove_ipc(client.address)
        self._zygote.close()
        self.sessions.close_all()
        if self._slot is not None:
            rundir.remove_node_info(os.getpid())
            os.close(self._slot)
        if self.mesh is not None:
            self.mesh.close()
        # A moment for the answers already queued (the reply to `zmesh stop` among them) to leave.
        self._router.close(linger=200)
        self._door.close()
        if self._zap is not None:
            self._zap.close()
        self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)
        logger.info("zmesh node %s stopped", self.node_id)

    # ------------------------------------------------------------------ the zygote

    def _on_zygote(self) -> None:
        try:
            events = self._zygote.events()
        except ZygoteDied:
            self._zygote_died()
            return
        for event in events:
            self._on_zygote_event(event)

    def _zygote_died(self) -> None:
        """Its workers died with it (PDEATHSIG): restart or bury their actors, then start a new zygote."""
        self._zygote.restart()
        self._gate.reset()
        for pid in self._warm.reset():  # they died with it (PDEATHSIG), before they had an actor
            rundir.remove_sockets_of(pid)
        # Spawn requests the dead zygote had not answered; restarts below send their own (never twice).
        unanswered = [r for r in self._actors.values() if r.state in (records.STARTING, records.RESTARTING) and r.pid is None]
        for pid, actor_id in list(self._by_pid.items()):
            del self._by_pid[pid]
            rundir.remove_sockets_of(pid)
            record = self._actors.get(actor_id)
            if record is not None:
                self._worker_exited(record, pid, -signal.SIGKILL)
        for record in unanswered:
            self._spawn(record)

    def _on_zygote_event(self, event: dict[str, Any]) -> None:
        if event.get("ev") == "spawned":
            self._gate.spawned(event["token"], event["pid"])
            if self._warm.spawned(event["token"], event["pid"]):
                return
            token_owner = self._by_token.get(event["token"])
            spawned = self._actors.get(token_owner) if token_owner else None
            if spawned is not None and spawned.token == event["token"]:
                spawned.pid = event["pid"]
                self._by_pid[event["pid"]] = spawned.actor_id
            elif event["pid"] not in self._by_pid:  # not already known from the worker's own init
                _kill(event["pid"])  # its actor was killed before it even started
        elif event.get("ev") == "exited":
            self._start_workers(self._gate.exited(event["pid"]))
            actor_id = self._by_pid.pop(event["pid"], None)
            rundir.remove_sockets_of(event["pid"])
            if actor_id is not None and actor_id in self._actors:
                self._worker_exited(self._actors[actor_id], event["pid"], event["code"])
            elif actor_id is None:
                self._warm.exited(event["pid"], time.monotonic())

    def _spawn(self, record: ActorRecord) -> None:
        record.pid = None
        if self._bind_warm(record):
            return
        self._by_token[record.token] = record.actor_id
        self._start_workers(self._gate.submit(record.token, self._spawn_request(record.token, _worker_env(record))))

    def _start_workers(self, requests: list[dict[str, Any]]) -> None:
        for request in requests:
            self._zygote.spawn(request)

    def _spawn_request(self, token: str, env: dict[str, str]) -> dict[str, Any]:
        return {
            "op": "spawn",
            "token": token,
            "address": self._door.address,
            "host": self.config.host,
            "env": env,
            "security": self.security.spawn_env(),
            "warm": self._warm.owns(token),
        }

    def _bind_warm(self, record: ActorRecord) -> bool:
        """Give the actor a warm worker by answering its parked ``init``; False when none waits."""
        while (worker := self._warm.take(time.monotonic())) is not None:
            value, payload = self._init_reply(record)
            if self._send(worker.identity, protocol.encode(protocol.REPLY, (worker.req_id, True, value), payload)):
                record.pid = worker.pid
                self._by_pid[worker.pid] = record.actor_id
                return True
            _kill(worker.pid)  # gone from the socket: never given anything, it is of no use
        return False

    def _tend_warm(self, now: float) -> None:
        """Ask for the warm workers the pool wants, and send away those no creation came for."""
        for token in self._warm.wanted(now):
            self._start_workers(self._gate.submit(token, self._spawn_request(token, {})))
        for worker in self._warm.retire(now):
            self._send_away(worker)

    def _send_away(self, worker: Parked) -> None:
        """Refuse a warm worker's ``init``: it closes its sockets and exits."""
        if not self._send(worker.identity, protocol.encode(protocol.REPLY, (worker.req_id, False, _UNWANTED))):
            _kill(worker.pid)

    # ------------------------------------------------------------------ messages

    def _drain_router(self, router: sockets.Socket) -> None:
        for _ in range(1000):
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
        elif msg.type == protocol.REQUEST:
            req_id, op, args = msg.header
            client = self._clients.get(ClientId(identity))
            handler = self._ops.get(op)
            if client is None:
                self._reply_error(identity, req_id, ReplyError("ConnectionError", "say hello first"))
            elif handler is None:
                self._reply_error(identity, req_id, ReplyError("ValueError", f"unknown request {op!r}"))
            else:
                try:
                    self._current = (identity, req_id)
                    value, payload = handler(client, tuple(args), msg.payload)
                except Deferred:
                    pass  # answered later, through _answer
                except ReplyError as exc:
                    self._reply_error(identity, req_id, exc)
                except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                    # The request's fields are not what the op needs: the caller's mistake, told to the caller.
                    self._reply_error(identity, req_id, ReplyError("ValueError", f"malformed {op!r} request: {type(exc).__name__}: {exc}"))
                except Exception as exc:
                    # Our bug, not the peer's: answer anyway, so the caller never waits for ever, and log it loudly.
                    logger.exception("zmesh node: internal error while handling %r", op)
                    self._reply_error(
                        identity, req_id, ReplyError("ZmeshError", f"internal error in the node while handling {op!r}: {exc!r}")
                    )
                else:
                    self._send(identity, protocol.encode(protocol.REPLY, (req_id, True, value), payload))
        else:
            raise protocol.ProtocolError(f"unexpected message type {msg.type!r} at a node")

    def _answer(self, identity: bytes, req_id: Any, ok: bool, value: Any, payload: list[Any] | None = None) -> None:
        """The late answer to a deferred request (its reply came from another member)."""
        self._send(identity, protocol.encode(protocol.REPLY, (req_id, ok, value), payload or []))

    def on_app(self, sender: str, kind: str, body: dict[str, Any], payload: list[Any], rid: int | None) -> None:
        """An application message from another member; a malformed one raises and is dropped."""
        if kind == "place":
            self._on_place(sender, body, payload, rid)
        elif kind == "claim":
            self._on_claim(sender, body, rid)
        elif kind == "lookup":
            self._on_lookup(sender, body, rid)
        elif kind == "find":
            self._on_find(sender, body, rid)
        elif kind == "watch":
            self._on_watch(sender, body)
        elif kind == "state":
            self._on_state(sender, body)
        elif kind == "keep":
            self._on_keep(sender, body, payload)
        elif kind == "kill":
            self._on_kill(sender, body)
        elif kind == "peer_gone":
            self._on_peer_gone(sender, body)
        elif kind == "drain":
            self._start_drain()
        else:
            raise protocol.ProtocolError(f"unknown mesh message {kind[:40]!r}")

    def _reply_error(self, identity: bytes, req_id: Any, exc: ReplyError) -> None:
        self._send(identity, protocol.encode(protocol.REPLY, (req_id, False, (exc.kind, str(exc)))))

    def _on_hello(self, identity: bytes, hello: dict[str, Any]) -> None:
        problem = self.sessions.refusal(hello)
        if problem is not None:
            logger.warning("zmesh node: refusing a %s (pid %s): %s", str(hello.get("kind"))[:20], str(hello.get("pid"))[:20], problem)
            self._send(identity, protocol.encode_json(protocol.REFUSED_TAG, {"reason": f"this node refuses it: {problem}"}))
            return
        self.sessions.open(identity, hello)
        self._publish()
        info = {
            **protocol.identity(),
            "node_id": self.node_id,
            "address": self.address,
            "pid": os.getpid(),
            "resources": self.resources.total,
        }
        self._send(identity, protocol.encode_json(protocol.WELCOME_TAG, info))

    def _client_gone(self, client_id: ClientId, why: str) -> None:
        client = self.sessions.close(client_id)
        if client is None:
            return
        # Gone at once for anyone who asks (owners, borrowers, lenders), here and on other nodes through gossip.
        self._remember_gone([client.address, client.client_id.hex()], mine=True)
        if why == "exited":
            sockets.remove_ipc(client.address)
        self._tell_creations_of(client.address)
        hosts: set[str] = set()
        for record in list(self._actors.values()):
            record.subscribers.discard(client_id)
            if record.creator == client_id and record.host not in (None, self.node_id):
                hosts.add(str(record.host))
            if record.owner == client_id and record.state != records.DEAD:
                if record.host == self.node_id or record.host is None:
                    self._kill(record, f"its owner ({client.kind} pid {client.pid}) {why}", no_restart=True)
                else:
                    self._kill_remote(record, True, f"its owner ({client.kind} pid {client.pid}) {why}")
        for host in hosts:
            self.mesh.send(host, "peer_gone", {"address": client.address})
        self._publish()

    # ------------------------------------------------------------------ requests

    def _op_create(self, client: Client, args: tuple[Any, ...], payload: list[Any]) -> tuple[Any, list[Any]]:
        spec, class_key = args
        if len(payload) < 2:
            raise ReplyError("ValueError", "create needs the class and its metadata")
        class_blob, meta_blob, args_frames = payload[0], payload[1], list(payload[2:])
        if class_blob:
            self._classes[class_key] = bytes(class_blob)
        elif class_key not in self._classes:
            raise ReplyError("ValueError", "the actor's class was never sent to this node")
        if self.draining:
            raise ReplyError("ZmeshError", f"node {self.node_id} is draining: connect to another node to create actors")
        namespace, name = spec["namespace"], spec.get("name")
        actor_id = ActorId(spec["actor_id"])
        if actor_id in self._actors:
            raise ReplyError("ValueError", f"actor id {actor_id} is already taken")
        from zmesh.node.core.scheduler import parse_strategy

        parse_strategy(spec.get("strategy"))  # a ValueError names a bad one
        demand = {str(k): float(v) for k, v in spec["resources"].items()}
        record = ActorRecord(
            actor_id=actor_id,
            class_name=str(spec["class_name"]),
            class_key=class_key,
            meta_blob=bytes(meta_blob),
            args_frames=args_frames,
            spec=spec,
            owner=None if spec.get("detached") else client.client_id,
            creator=client.client_id,
            owner_address=client.address,
            name=name,
            namespace=namespace,
            demand=demand,
            max_restarts=int(spec.get("max_restarts", 0)),
            waiting_since=time.monotonic(),
        )
        record.origin = self.node_id
        record.owner_node = "" if spec.get("detached") else self.node_id
        record.created_at = time.time()
        record.subscribers.add(client.client_id)
        identity, req_id = self._current
        return self._create(client, identity, req_id, record)

    def _op_resolve(self, client: Client, args: tuple[Any, ...], payload: list[Any]) -> tuple[Any, list[Any]]:
        (actor_id,) = args
        record = self._watch(str(actor_id), client.client_id)
        if record is not None:
            return record.public_state(), []
        identity, req_id = self._current

        def found(record: ActorRecord | None) -> None:
            state: tuple[str, int, str | None, str | None]
            if record is None:
                state = ("DEAD", 1 << 30, None, f"actor {actor_id} is not known to any node of the mesh (it may have died long ago)")
            else:
                record.subscribers.add(client.client_id)
                state = record.public_state()
            self._answer(identity, req_id, True, state)

        self._find(str(actor_id), found)
        raise Deferred

    def _op_lookup(self, client: Client, args: tuple[Any, ...], payload: list[Any]) -> tuple[Any, list[Any]]:
        namespace, name = str(args[0]), str(args[1])
        found = self._find_name((namespace, name))
        if found is not None:
            return self._looked_up(found), []
        from zmesh.node.core.registry import home_of

        missing = (
            "ValueError",
            f"Failed to look up actor with name {name!r} in namespace {namespace!r}: no live actor has that name",
        )
        identity, req_id = self._current

        def by_id(actor_id: Any) -> None:
            """The home granted the name to ``actor_id``, which gossip has not brought here yet: find it."""
            if not isinstance(actor_id, str):
                self._answer(identity, req_id, False, missing)
                return

            def found(record: ActorRecord | None) -> None:
                if record is None or record.state == records.DEAD:
                    self._answer(identity, req_id, False, missing)
                else:
                    self._answer(identity, req_id, True, (record.actor_id, record.class_name, record.meta_blob))

            self._find(actor_id, found)

        home = home_of((namespace, name), self.mesh.live())
        if home is None or home == self.node_id:
            holder = self._claims.holder((namespace, name))
            if holder is None:
                raise ReplyError(*missing)
            by_id(holder.actor_id)
            raise Deferred

        def on_reply(ok: bool, value: Any, _: list[Any]) -> None:
            if ok and isinstance(value, list) and len(value) == 4:
                self._answer(identity, req_id, True, self._looked_up(value))
            elif ok and isinstance(value, list) and len(value) == 1:
                by_id(value[0])
            else:
                self._answer(identity, req_id, False, missing)

        self.mesh.request(home, "lookup", {"ns": namespace, "name": name}, [], on_reply, time.monotonic())
        raise Deferred

    def _looked_up(self, found: list[Any]) -> tuple[Any, ...]:
        actor_id, class_name, meta, node_id = found
        if actor_id not in self._actors and node_id != self.node_id and self._watch(actor_id, None) is None:
            # Known to the name's home before gossip brought it here: watch it where the home saw it.
            row = [class_name, "", None, records.STARTING, None, 0, False, False, 0.0, meta, node_id]
            record = _stub_from_row(ActorId(actor_id), row, node_id)
            record.host = None
            self._actors[record.actor_id] = record
            self._send_watch(record)
        return (actor_id, class_name, meta)

    def _op_kill(self, client: Client, args: tuple[Any, ...], payload: list[Any]) -> tuple[Any, list[Any]]:
        actor_id, no_restart = args
        record = self._watch(str(actor_id), None)
        if record is None:
            raise ReplyError("ValueError", f"actor {actor_id} is not known to this node")
        if record.host == self.node_id:
            self._kill(record, "it was killed with zmesh.kill()", no_restart=bool(no_restart))
        else:
            self._kill_remote(record, bool(no_restart), "it was killed with zmesh.kill()")
        return None, []

    def _op_kill_named(self, client: Client, args: tuple[Any, ...], payload: list[Any]) -> tuple[Any, list[Any]]:
        namespace, name = str(args[0]), str(args[1])
        found = self._find_name((namespace, name))
        if found is None:
            raise ReplyError("ValueError", f"no live actor is named {name!r} in namespace {namespace!r}")
        return self._op_kill(client, (found[0], True), [])

    def _op_gone(self, client: Client, args: tuple[Any, ...], payload: list[Any]) -> tuple[Any, list[Any]]:
        """Which of these processes (by address, or by client id in hex) are not live anywhere in the mesh."""
        (peers,) = args
        return self.gone_addresses(peers), []

    def _op_members(self, client: Client, args: tuple[Any, ...], payload: list[Any]) -> tuple[Any, list[Any]]:
        return self.members(), []

    def _op_list_actors(self, client: Client, args: tuple[Any, ...], payload: list[Any]) -> tuple[Any, list[Any]]:
        (namespace,) = args
        return self.list_actors(None if namespace is None else str(namespace)), []

    def _op_subscribe_membership(self, client: Client, args: tuple[Any, ...], payload: list[Any]) -> tuple[Any, list[Any]]:
        client.membership = True
        return self.members(), []

    def _op_drain(self, client: Client, args: tuple[Any, ...], payload: list[Any]) -> tuple[Any, list[Any]]:
        (node_id,) = args
        if node_id in (None, self.node_id):
            self._start_drain()
            return self.node_id, []
        matches = [m for m in self.mesh.live() if m.startswith(str(node_id))]
        if len(matches) != 1:
            raise ReplyError("ValueError", f"{node_id!r} names {len(matches)} live members; give more of the node id")
        if matches[0] == self.node_id:
            self._start_drain()
        else:
            self.mesh.send(matches[0], "drain", {})
        return matches[0], []

    def _op_dropped(self, client: Client, args: tuple[Any, ...], payload: list[Any]) -> tuple[Any, list[Any]]:
        (count,) = args
        if isinstance(count, int) and count >= 0:
            self._dropped_by_workers[client.client_id] = count
        return None, []

    def _op_status(self, client: Client, args: tuple[Any, ...], payload: list[Any]) -> tuple[Any, list[Any]]:
        return self.status(), []

    def _op_stop(self, client: Client, args: tuple[Any, ...], payload: list[Any]) -> tuple[Any, list[Any]]:
        self.request_stop()
        return None, []

    def _op_init(self, client: Client, args: tuple[Any, ...], payload: list[Any]) -> tuple[Any, list[Any]]:
        (token,) = args
        self._start_workers(self._gate.started(token))  # past its costly start: the next may start
        if self._warm.owns(token):
            # A warm worker: its request waits, unanswered, until an actor is given to it (_bind_warm).
            identity, req_id = self._current
            if self._warm.park(Parked(token, identity, req_id, client.pid), time.monotonic()):
                raise Deferred
            raise ReplyError(*_UNWANTED)
        actor_id = self._by_token.get(token)
        record = self._actors.get(actor_id) if actor_id else None
        if record is None or record.token != token or record.state not in (records.STARTING, records.RESTARTING):
            raise ReplyError(*_UNWANTED)
        if record.pid is None:
            record.pid = client.pid
            self._by_pid[client.pid] = record.actor_id
        return self._init_reply(record)

    def _init_reply(self, record: ActorRecord) -> tuple[Any, list[Any]]:
        """What a worker needs to become ``record``'s: its spec (with its environment) and its class and arguments."""
        spec = dict(record.spec, owner_address=record.owner_address, creator_id=record.creator, env=_worker_env(record))
        blob = self._classes[record.class_key]
        return (record.actor_id, record.incarnation, spec), [blob, record.meta_blob, *record.args_frames]

    def _op_started(self, client: Client, args: tuple[Any, ...], payload: list[Any]) -> tuple[Any, list[Any]]:
        actor_id, incarnation, ok, error, address = args
        record = self._actors.get(actor_id)
        if record is None:
            return None, []
        decision = lifecycle.started(record, incarnation, bool(ok), error, str(address) if address else client.address)
        if isinstance(decision, lifecycle.Ignore):
            return None, []
        self._by_token.pop(record.token, None)
        if isinstance(decision, lifecycle.Alive):
            record.state = records.ALIVE
            record.address = decision.address
            self._notify(record)
        elif isinstance(decision, lifecycle.Bury):
            self._mark_dead(record, decision.reason)
        return None, []

    # ------------------------------------------------------------------ actor lifecycle

    def _check_waiting(self) -> None:
        now = time.monotonic()
        for actor_id in self._waiting:
            record = self._actors[actor_id]
            if not record.warned and now - record.waiting_since > self.config.infeasible_warning_s:
                record.warned = True
                logger.warning(
                    "actor %s (%s) has waited %.0f s for resources %s (available now: %s)",
                    record.class_name, actor_id, now - record.waiting_since, record.demand, self.resources.available,
                )  # fmt: skip

    def _notify(self, record: ActorRecord) -> None:
        frames = protocol.encode(protocol.ACTOR_STATE, (record.actor_id, *record.public_state()))
        for client_id in list(record.subscribers):
            if not self._send(client_id, frames):
                record.subscribers.discard(client_id)
        if record.host == self.node_id or record.watchers:
            body = _state_body(record)
            for node_id in list(record.watchers):
                if not self.mesh.send(node_id, "state", body):
                    record.watchers.discard(node_id)
        self._publish()

    def _worker_exited(self, record: ActorRecord, pid: int, code: int) -> None:
        decision = lifecycle.worker_exited(record, pid, code)
        if record.pid == pid:
            sockets.remove_ipc(record.address)  # the worker's call socket; killed, it could not remove it
            record.pid = None  # never signal this pid again: the kernel may give it to another process
        if isinstance(decision, lifecycle.Restart):
            logger.info("actor %s (%s) worker exited with code %s; restarting", record.class_name, record.actor_id, code)
            self._restart(record)
        elif isinstance(decision, lifecycle.Bury):
            self._mark_dead(record, decision.reason)

    def _restart(self, record: ActorRecord) -> None:
        """Replace the actor's worker; callers hear of it before anything else we send them."""
        old = record.pid
        sockets.remove_ipc(record.address)
        lifecycle.next_incarnation(record, records.RESTARTING)
        self._notify(record)
        if old is not None:
            self._kill_worker(old)
        self._spawn(record)

    def _start_drain(self) -> None:
        """Take no more creations, move the restartable actors to other members, then leave."""
        if self.draining:
            return
        logger.info("zmesh node %s: draining", self.node_id)
        self.draining = True
        for record in list(self._actors.values()):
            if record.host != self.node_id or record.state == records.DEAD:
                continue
            if record.can_restart():
                pid = record.pid
                if record.reservation is not None:
                    self.resources.release(record.reservation)
                    record.reservation = None
                record.pid = None
                if pid is not None:
                    self._kill_worker(pid)
                sockets.remove_ipc(record.address)
                lifecycle.next_incarnation(record, records.WAITING)
                record.host = None
                record.tried = {self.node_id}
                self._waiting.append(record.actor_id)
                self._notify(record)
        self._publish()
        self._reschedule = True

    def _drained(self) -> bool:
        """Every actor that could move has a new host: time to leave."""
        return self.draining and not any(r.state in (records.WAITING, records.PLACING) for r in self._actors.values())

    def _kill_worker(self, pid: int) -> None:
        """SIGKILL a worker of ours; only pids the zygote has not yet reported dead, so never a reused one."""
        if pid in self._by_pid:
            _kill(pid)

    def _kill(self, record: ActorRecord, why: str, *, no_restart: bool) -> None:
        decision = lifecycle.killed(record, why, no_restart=no_restart)
        if isinstance(decision, lifecycle.Bury):
            self._mark_dead(record, decision.reason)
        elif isinstance(decision, lifecycle.Restart):
            self._restart(record)

    def _mark_dead(self, record: ActorRecord, error: str) -> None:
        record.state = records.DEAD
        self._by_token.pop(record.token, None)  # a worker still starting for it is killed when it reports
        record.error = error
        if record.pid is not None:
            self._kill_worker(record.pid)
        if record.reservation is not None:
            self.resources.release(record.reservation)
            record.reservation = None
        if record.actor_id in self._waiting:
            self._waiting.remove(record.actor_id)
        if record.name is not None and self._names.get((record.namespace, record.name)) == record.actor_id:
            del self._names[(record.namespace, record.name)]
            self._claims.release((record.namespace, record.name), record.actor_id)
        self._notify(record)
        record.args_frames = []
        self._dead.append(record.actor_id)
        while len(self._dead) > self.config.keep_dead_actors:
            # Forget the oldest dead actors; a stale handle to one is told it is unknown, hence dead.
            # (A worker still exiting keeps its pid in _by_pid: its socket files go when the zygote reports the exit.)
            self._actors.pop(self._dead.popleft(), None)
        self._reschedule = True  # freed resources may let a waiting creation start

    def status(self) -> dict[str, Any]:
        live = [r.describe() for r in self._actors.values() if r.state != records.DEAD]
        dead = [r.describe() for r in self._actors.values() if r.state == records.DEAD]
        return {
            "node_id": self.node_id,
            "address": self.address,
            "pid": os.getpid(),
            "uptime_s": time.time() - self.started_at,
            "resources_total": dict(self.resources.total),
            "resources_available": dict(self.resources.available),
            "actors": live,
            "dead_actors": dead[-50:],
            "waiting": [r.describe() for r in self._waiting_records()],
            "members": self.members() if self.mesh is not None else [],
            "draining": self.draining,
            "clients": len(self._clients),
            "dropped_messages": self._dropped + sum(self._dropped_by_workers.values()),
            "dropped_by_node": self._dropped,
            # Handshakes refused at this node's port: peers without the cluster key.
            "refused_connections": self._zap.refused if self._zap is not None else 0,
            "secure": not self.security.insecure,
            "cluster": self.security.key.fingerprint if self.security.key is not None else None,
            "warm_workers": self._warm.describe(),
        }


_UNWANTED = ("ActorDiedError", "this worker is no longer wanted")


def _worker_env(record: ActorRecord) -> dict[str, str]:
    """The environment of the actor's worker, set before any of its code runs: the GPUs it reserved."""
    if record.reservation is not None and record.reservation.gpu_ids:
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, record.reservation.gpu_ids))}
    return {}


def _kill(pid: int) -> None:
    if pid <= 0:
        return  # 0 and negatives would signal whole process groups
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
