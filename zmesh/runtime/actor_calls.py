"""Calls to actors: where each actor lives, the calls queued for it or in flight, and what its results complete.

User threads create actors and submit calls under the runtime's one ``_lock`` (shared
with the other components, passed in), and send through the I/O loop's outbox, except
the ``_send_now`` fast path, which sends from the user thread while the I/O thread
sleeps. The I/O thread applies the node's news about actors, results and refusals.
Rule: no thread sends on a socket while holding ``_lock``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from zmesh.exceptions import NodeUnavailableError
from zmesh.runtime import calls, objects, segments
from zmesh.runtime.actors import ALIVE, DEAD, ActorConn, Call, Recent, apply_state, refuse
from zmesh.runtime.inbound import Inbound, header_len
from zmesh.runtime.io_loop import IoLoop
from zmesh.runtime.node_client import NodeClient, node_error
from zmesh.runtime.object_service import ObjectService, Outcome
from zmesh.runtime.outbox import CALL, RUN, Outbox
from zmesh.runtime.peers import ConnectFailed, Peers
from zmesh.runtime.spin import SpinPolicy, default_limit_ns
from zmesh.transport import protocol, sockets
from zmesh.transport.ids import FINAL_INCARNATION, ActorId, ObjectId

logger = logging.getLogger(__name__)

_REMEMBER_DEAD = 10_000

# Ask the node and wait for its answer: (op, args, payload) -> value (the runtime's ``request``).
Request = Callable[[str, tuple[Any, ...], list[Any]], Any]


class ActorCalls:
    """The caller's side of actor calls: one ActorConn per actor it called or created."""

    def __init__(
        self,
        lock: threading.Lock,
        store: objects.ObjectStore,
        loop: IoLoop,
        outbox: Outbox,
        peers: Peers,
        node: NodeClient,
        request: Request,
        results: ObjectService,
        closed: Callable[[], bool],
    ) -> None:
        self._lock = lock
        self._store = store
        self._loop = loop
        self._outbox = outbox
        self._peers = peers
        self._node = node
        self._request = request
        self._results = results
        self._closed = closed
        self._actors: dict[ActorId, ActorConn] = {}
        # The actors believed to live at each address: one, unless a stale view shares it with the actor there now.
        self._actor_at: dict[str, list[ActorConn]] = {}
        # Dead actors remembered for late calls; bounded, so a long-lived driver stays small.
        self._dead_actors: Recent[ActorId, BaseException] = Recent(_REMEMBER_DEAD)
        self._sent_classes: set[str] = set()
        # The last call sent from a user thread, and its socket: a get of its result polls that socket (spin.py).
        self._sync_call: tuple[ObjectId, sockets.Socket] | None = None
        self._spin = SpinPolicy(default_limit_ns())

    def register(self, inbound: Inbound) -> None:
        """The node's news about actors; results and refusals come through the facade (tasks share them)."""
        inbound.news.register(protocol.ACTOR_STATE, lambda _, m: self._on_actor_state(*m.header), header_len(5))

    # ------------------------------------------------------------------ user threads

    def create(
        self,
        actor_id: ActorId,
        spec: dict[str, Any],
        class_key: str,
        class_blob: bytes,
        meta_blob: bytes,
        args_frames: list[Any],
        wait: bool,
        keep: list[Any] | None,
    ) -> Any:
        with self._lock:
            conn = self._actors.get(actor_id)
            if conn is None:
                conn = self._actors[actor_id] = ActorConn(actor_id)
            conn.resolving = True
            conn.keep_args = keep or None
            send_class = class_key not in self._sent_classes
            self._sent_classes.add(class_key)
        payload = [class_blob if send_class else b"", meta_blob, *args_frames]
        args = (spec, class_key)
        if wait:
            try:
                return self._request("create", args, payload)
            except Exception as exc:
                if isinstance(exc, NodeUnavailableError):
                    with self._lock:
                        self._sent_classes.discard(class_key)
                self._on_actor_state(actor_id, DEAD, FINAL_INCARNATION, None, str(exc))
                raise

        def on_reply(ok: bool, value: Any, payload: list[Any]) -> None:
            if not ok:
                self._on_actor_state(actor_id, DEAD, FINAL_INCARNATION, None, str(node_error(value)))

        self._node.request_nowait("create", args, payload, on_reply)
        return None

    def submit(
        self,
        actor_id: ActorId,
        oids: tuple[ObjectId, ...],
        method: str,
        group: str | None,
        args_frames: list[Any],
        retries: int,
        keep: list[Any] | None,
        window: int | None = None,
    ) -> list[ObjectId]:
        header, frames = calls.call_entry(oids, method, group, args_frames, window)
        call = Call(oids, header, frames, retries, keep or None)
        dest = None
        resolve = False
        alone = False
        failed: BaseException | None = None
        with self._lock:
            for oid in oids:
                self._store.new_owned_locked(oid)
                self._store.add_ref_locked(oid)
            conn = self._actors.get(actor_id)
            if conn is None:
                conn = self._actors[actor_id] = ActorConn(actor_id)
                dead = self._dead_actors.get(actor_id)
                if dead is not None:
                    conn.state, conn.error = DEAD, dead
            if conn.state is ALIVE and not conn.queue:
                alone = not conn.inflight
                conn.send(call)
                dest = conn.address
            elif conn.state is DEAD:
                failed = conn.error
            else:
                conn.queue.append(call)
                if not conn.resolving:
                    conn.resolving = resolve = True
        if dest is not None:
            # A call with nothing else in flight to its actor (the synchronous pattern) goes out
            # from this thread when it can; a stream of calls goes through the I/O thread, in batches.
            if not (alone and self._send_now(dest, call)):
                self._loop.push((CALL, dest, call))
        elif failed is not None:
            self._results.fail(oids, failed)
        elif resolve:
            self._resolve(actor_id)
        return list(oids)

    def _send_now(self, dest: str, call: Call) -> bool:
        """Send ``call`` from this thread if the I/O thread sleeps and nothing is queued before it."""
        loop = self._loop
        if not loop.lock.acquire(blocking=False):
            return False
        try:
            if loop.outbox or dest in self._peers.gone or self._closed():
                return False
            try:
                sock = self._peers.get(dest)
            except ConnectFailed:
                return False  # the I/O thread fails the call with the reason
            sockets.send(sock, calls.message(CALL, [call.header], call.frames, call.target))
            self._sync_call = (call.oids[0], sock)
            # Sending may have consumed the signal of an answer already waiting on this socket.
            if sockets.readable(sock):
                loop.touched(sock)
                loop.wake()
            return True
        finally:
            loop.lock.release()

    def spin_for(self, oid: ObjectId, entry: objects.Entry) -> None:
        """Poll for the answer to the synchronous call just sent, instead of sleeping until the I/O thread has it."""
        sync = self._sync_call
        if sync is None or sync[0] != oid:
            return
        self._sync_call = None
        budget = self._spin.budget()
        if budget:
            self._spin.record(self._loop.serve_until(sync[1], lambda: entry.done, budget))

    def _resolve(self, actor_id: ActorId) -> None:
        def on_reply(ok: bool, value: Any, payload: list[Any]) -> None:
            if ok:
                self._on_actor_state(actor_id, *value)
            else:
                self._on_actor_state(actor_id, DEAD, FINAL_INCARNATION, None, str(node_error(value)))

        self._node.request_nowait("resolve", (actor_id,), [], on_reply)

    # ------------------------------------------------------------------ the I/O thread

    def fail_unsent(self, address: str, entries: list[tuple[Any, ...]], error: BaseException) -> None:
        """Calls that could not be sent fail with the reason; they leave the in-flight table."""
        with self._lock:
            for conn in self._actor_at.get(address, ()):
                for entry in entries:
                    conn.inflight.pop(entry[0][0], None)
        for entry in entries:
            self._results.fail(entry[0], error)

    def on_results(self, address: str, items: list[calls.ResultItem]) -> None:
        results: list[Outcome] = []
        finished = []  # dropped after the lock: the refs they kept are released then
        with self._lock:
            at = self._actor_at.get(address, ())
            for oids, ok, parts, lent in items:
                call = None
                for conn in at:
                    call = conn.inflight.pop(ObjectId(oids[0]), None)
                    if call is not None:
                        break
                if call is None:
                    continue  # a late answer from a worker already declared dead
                finished.append(call)
                if lent & calls.ARGS_RELEASED:
                    segments.reusable(call.keep)
                if lent & calls.LENT:
                    for oid in oids:
                        entry = self._store.get_locked(ObjectId(oid))
                        if entry is not None:
                            entry.lender = address
                results.extend((ObjectId(oid), part, ok, None) for oid, part in zip(oids, parts, strict=True))
        self._results.complete(results)
        del finished

    def on_refused(self, address: str, target: calls.CallTarget, refused: list[tuple[bytes, ...]]) -> None:
        """The worker at ``address`` is not ``target``: the calls did not run; the node says what became of the actor."""
        actor_id = ActorId(target[0])
        with self._lock:
            conn = self._actors.get(actor_id)
            ask = conn is not None and refuse(conn, address, target[1], [ObjectId(oids[0]) for oids in refused])
        if ask:
            logger.info("the worker at %s refused calls for actor %s incarnation %d; asking the node", address, *target)
            self._resolve(actor_id)

    def on_node_lost(self, why: str) -> None:
        """Every actor the node hosted is lost with it."""
        with self._lock:
            actor_ids = [a for a, conn in self._actors.items() if conn.state is not DEAD]
        for actor_id in actor_ids:
            self._on_actor_state(actor_id, DEAD, FINAL_INCARNATION, None, f"actor {actor_id} is lost: {why}")

    def _on_actor_state(self, actor_id: ActorId, state: str, incarnation: int, address: str | None, error: str | None) -> None:
        """Apply the node's news about an actor: flush, fail or retry calls accordingly."""
        on_io_thread = self._loop.on_io_thread
        with self._lock:
            conn = self._actors.get(actor_id)
            step = apply_state(conn, state, incarnation, address, error) if conn is not None else None
            if step is None or conn is None:
                return
            for left in (step.gone, step.detach):
                at = self._actor_at.get(left or "")
                if left is not None and at is not None and conn in at:
                    at.remove(conn)
                    if not at:
                        del self._actor_at[left]
            if step.gone is not None and step.gone in self._actor_at:
                step.gone = None  # another actor's worker took that address since: its connection stays
            if step.gone is not None:
                self._peers.mark_gone(step.gone)
            if conn.state is ALIVE and conn.address is not None:
                at = self._actor_at.setdefault(conn.address, [])
                if conn not in at:
                    at.append(conn)
                self._peers.gone.discard(conn.address)  # a new worker may bind the address of a dead one
            elif conn.state is DEAD and conn.error is not None:
                # Nothing is queued or in flight any more: keep only the error, for late calls.
                del self._actors[actor_id]
                self._dead_actors.add(actor_id, conn.error)
            if step.send and address is not None and not on_io_thread:
                # Queued under the lock, so calls submitted later cannot overtake these.
                for call in step.send:
                    self._loop.push((CALL, address, call))
        if step.send and address is not None and on_io_thread:
            # The I/O thread holds the I/O lock: later calls can only queue behind these, never overtake them.
            self._outbox.send_calls(address, step.send)
        for oids, err in step.fail:
            self._results.fail(oids, err)
        if step.gone is not None:
            gone = step.gone
            peers = self._peers
            if on_io_thread:
                peers.drop(gone)
            else:
                self._loop.push((RUN, None, lambda: peers.drop(gone)))
