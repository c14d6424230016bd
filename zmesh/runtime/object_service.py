"""Objects across processes: values we own and serve, values we fetch, and the references counted between owners.

User threads put, get and drop refs under the runtime's one ``_lock`` (shared with the
other components, passed in); the I/O thread serves fetches, counts borrows and learns
which peers are gone. Rule: no thread sends on a socket while holding ``_lock``; what a
user thread must send goes through the I/O loop's outbox.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from zmesh.exceptions import ObjectLostError, TaskError
from zmesh.runtime import objects, ownership
from zmesh.runtime.inbound import Inbound, header_len
from zmesh.runtime.io_loop import IoLoop
from zmesh.runtime.node_client import NodeClient
from zmesh.runtime.outbox import TO_PEER, Outbox
from zmesh.runtime.peers import Peers
from zmesh.transport import protocol, serialization
from zmesh.transport.ids import ObjectId

logger = logging.getLogger(__name__)

_PEER_CHECK_S = 1.0

# (object id, value frames, ok, error): one object's outcome.
Outcome = tuple[ObjectId, list[Any] | None, bool, BaseException | None]


def _names_an_object(msg: protocol.Message) -> bool:
    return len(msg.header) == 1 and isinstance(msg.header[0], bytes)


def _names_a_borrower(msg: protocol.Message) -> bool:
    return len(msg.header) == 2 and isinstance(msg.header[1], str)


class ObjectService:
    """Owned objects, fetches from other owners, borrows, and the refs lent with results."""

    def __init__(
        self,
        lock: threading.Lock,
        store: objects.ObjectStore,
        borrows: ownership.Borrows,
        address: str,
        loop: IoLoop,
        outbox: Outbox,
        peers: Peers,
        node: NodeClient,
        closed: Callable[[], bool],
    ) -> None:
        self._lock = lock
        self._store = store
        self._address = address
        self._loop = loop
        self._outbox = outbox
        self._peers = peers
        self._node = node
        self._closed = closed
        self._released: deque[ObjectId] = deque()
        self._fetching: dict[str, set[ObjectId]] = {}  # owner address -> objects asked of it
        self._peers_checked = 0.0
        # Reference counting across processes (see ownership.py), guarded by _lock.
        self._borrows = borrows
        self._settled = threading.Condition(lock)
        self._lent: dict[bytes, dict[ObjectId, list[Any]]] = {}  # caller -> result -> refs kept for it

    def register(self, inbound: Inbound) -> None:
        inbound.router.register(protocol.GET_OBJECT, self._on_get_object, _names_an_object)
        inbound.router.register(protocol.BORROW, self._on_borrow, _names_a_borrower)
        inbound.router.register(protocol.UNBORROW, self._on_borrow, _names_a_borrower)
        inbound.router.register(protocol.RELEASE_LENT, lambda identity, m: self.release_lent(identity, m.header[0]), header_len(1))
        inbound.peer.register(protocol.OBJECT, self._on_object, header_len(2))
        inbound.peer.register(protocol.BORROWED, self._on_borrowed, header_len(2))
        inbound.news.register(protocol.PEER_GONE, lambda _, m: self._peer_gone(str(m.header[0])), header_len(1))

    # ------------------------------------------------------------------ user threads

    def put(self, oid: ObjectId, frames: list[Any], refs: list[Any]) -> None:
        with self._lock:
            entry = self._store.new_owned_locked(oid)
            entry.frames, entry.done = frames, True
            entry.contained = refs or None
            self._store.add_ref_locked(oid)

    def add_ref(self, oid: ObjectId, owner: str) -> None:
        with self._lock:
            if self._store.add_ref_locked(oid) == 1 and owner != self._address:
                self._borrows.held(oid, owner)

    def release(self, oid: ObjectId) -> None:
        """An ObjectRef was dropped (called from ``__del__``, in any thread, at any moment).

        Counted at once when the lock is free, so a loop of ``get(put(v))`` holds one value,
        not a second's worth; a thread that holds the lock already (a collection inside a
        locked section) leaves it to the I/O thread's next round. Messages it causes are
        always sent by the I/O thread: ``__del__`` may run in the middle of another send.
        """
        self._released.append(oid)
        if self._lock.acquire(blocking=False):
            try:
                out = self._release_locked()
            finally:
                self._lock.release()
            for message in out:
                self._loop.push((TO_PEER, message.address, message.frames))

    def settle_borrows(self, timeout: float = 30.0) -> None:
        """Register with their owners the foreign refs this process holds, and wait for their answers.

        A worker calls this before it sends a result: once the caller has the result it may
        drop the refs it kept for the call, and our own must be counted by then.
        """
        borrows = self._borrows
        if borrows.settled:
            return
        with self._lock:
            out = borrows.register()
            # What we rely on: ours, and those another thread registered before us (we may hold them too).
            mine = list(borrows.awaiting)
        for message in out:
            self._loop.push((TO_PEER, message.address, message.frames))
        awaiting = borrows.awaiting
        with self._settled:
            if not self._settled.wait_for(lambda: self._closed() or not any(oid in awaiting for oid in mine), timeout):
                logger.warning("owners did not acknowledge %d borrowed reference(s) within %g s", len(mine), timeout)

    def release_lent(self, caller: bytes, oid: ObjectId) -> None:
        """``caller`` is done with result ``oid``: the refs lent with it are ours to drop."""
        with self._lock:
            lent = self._lent.get(caller)
            refs = lent.pop(oid, None) if lent is not None else None
            if lent is not None and not lent:
                del self._lent[caller]
        del refs  # dropped outside the lock: their release is counted on the I/O thread's next round

    def lend(self, caller: bytes, oid: ObjectId, refs: list[Any]) -> None:
        """Keep ``refs`` (pickled into the result ``oid`` for ``caller``) until the caller releases that result."""
        with self._lock:
            self._lent.setdefault(caller, {})[oid] = refs

    def entries_for(self, refs: list[tuple[ObjectId, str]]) -> list[objects.Entry]:
        """The entries behind ``(oid, owner address)`` pairs, fetching foreign ones from their owners."""
        out = []
        fetch: list[tuple[ObjectId, str]] = []
        with self._lock:
            for oid, owner in refs:
                entry = self._store.get_locked(oid)
                if entry is None and owner == self._address:
                    entry = objects.Entry(owned=True)
                    entry.done, entry.ok = True, False
                    entry.error = ObjectLostError(f"object {oid.hex()} was freed: no reference to it was kept")
                elif entry is None or not entry.owned:
                    entry, need_fetch = self._store.fetch_locked(oid)
                    if need_fetch:
                        fetch.append((oid, owner))
                        self._fetching.setdefault(owner, set()).add(oid)
                out.append(entry)
        for oid, owner in fetch:
            self._loop.push((TO_PEER, owner, protocol.encode(protocol.GET_OBJECT, (oid,))))
        return out

    def value_of(self, entry: objects.Entry) -> Any:
        if entry.error is not None:
            # A fresh copy each time: raising the stored one would hang this call's traceback (and
            # through its frames the caller's ObjectRefs) on an error many entries share, for ever.
            raise copy.copy(entry.error)
        frames = entry.frames
        assert frames is not None
        if serialization.is_descriptor(frames):
            # Mapped (or pulled to this node) once per entry: later gets of one ref share the mapping.
            mapped = entry.mapped
            if mapped is None:
                try:
                    mapped = entry.mapped = serialization.read_descriptor(frames)
                except serialization.DeserializationError as exc:
                    raise TaskError(f"could not deserialize the result: {exc}") from None
            frames = mapped[0]
        try:
            value = serialization.loads_value(frames)
        except serialization.DeserializationError as exc:
            raise TaskError(f"could not deserialize the result: {exc}") from None
        if not entry.ok:
            try:
                raise value
            finally:
                # The frame must not keep the error: error -> traceback -> this frame -> error is a cycle
                # only the garbage collector breaks, and until it runs (an idle worker may never allocate
                # enough) every frame on that traceback keeps its locals, the caller's ObjectRefs among them.
                del value
        return value

    # ------------------------------------------------------------------ any thread

    def fail(self, oids: tuple[ObjectId, ...], error: BaseException) -> None:
        self.complete([(oid, None, False, error) for oid in oids])

    def complete(self, results: list[Outcome]) -> None:
        """Record values, wake local waiters and answer peers that asked for them meanwhile."""
        woken = []
        serve = []
        with self._lock:
            for oid, frames, ok, error in results:
                entry, waiters, callbacks, remote = self._store.complete_locked(oid, frames, ok, error)
                woken.append((waiters, callbacks))
                if entry is not None and remote:
                    serve.append((oid, entry, remote))
        for waiters, callbacks in woken:
            objects.wake(waiters, callbacks)
        for oid, entry, idents in serve:
            frames = self._object_frames(oid, entry)
            for identity in idents:
                self._outbox.send_or_push_router([identity, *frames])

    # ------------------------------------------------------------------ the I/O thread

    def after_round(self) -> None:
        """Count the refs dropped since the last round (what ``release`` left to us)."""
        if self._released or self._store.freed_lent:
            with self._lock:
                out = self._release_locked()
            self._send_all(out)

    def watch_peers(self) -> None:
        if self._fetching or self._lent or self._store.borrowers():
            self._check_peers()

    def unsent(self, address: str, msg: protocol.Message, error: BaseException) -> None:
        """No socket to ``address`` could be opened for ``msg``."""
        if msg.type == protocol.GET_OBJECT:  # the fetch can never be answered
            with self._lock:
                self._fetching.get(address, set()).discard(msg.header[0])
            self.fail(msg.header[:1], error)

    def _release_locked(self) -> list[ownership.Outgoing]:
        """Count the dropped ObjectRefs; what to tell owners and lenders about what we no longer hold."""
        out: list[ownership.Outgoing] = []
        borrows = self._borrows
        released = self._released
        while released:
            try:
                oid = released.popleft()
            except IndexError:
                break  # another thread took the last one
            if self._store.release_locked(oid) == 0:
                out.extend(borrows.dropped(oid))
        while self._store.freed_lent:
            oid, lender = self._store.freed_lent.pop()
            out.extend(borrows.letting_go(ownership.Outgoing(lender, protocol.encode(protocol.RELEASE_LENT, (oid,)))))
        return out

    def _send_all(self, messages: list[ownership.Outgoing]) -> None:
        for message in messages:
            if message.address not in self._peers.gone:
                self._outbox.send_to_peer(message.address, message.frames)

    def _check_peers(self) -> None:
        """Ask the node, once a second, which of the processes we depend on have exited.

        Owners we fetch from (their fetches fail), borrowers of our objects (their references
        no longer count) and callers we lent refs to (we keep them no longer). Per-peer socket
        monitors would tell at once, but wedged sockets under load; once a second is enough.
        """
        now = time.monotonic()
        if now - self._peers_checked < _PEER_CHECK_S or self._node.lost is not None:
            return
        self._peers_checked = now
        with self._lock:
            ask = sorted({*self._fetching, *self._store.borrowers()}) + [caller.hex() for caller in self._lent]

        def on_reply(ok: bool, value: Any, payload: list[Any]) -> None:
            if ok:
                for peer in value:
                    if isinstance(peer, str) and "://" in peer:
                        self._peer_gone(peer)
                    elif isinstance(peer, str):
                        with self._lock:
                            self._lent.pop(bytes.fromhex(peer), None)

        self._node.request_nowait("gone", (ask,), [], on_reply)

    def _peer_gone(self, address: str) -> None:
        """A process we fetch from, print to or lend to has exited: fail what it owed us, free what we kept for it."""
        with self._lock:
            lost = self._fetching.pop(address, set())
            self._store.borrower_gone_locked(address)
            out = self._borrows.owner_gone(address)
            self._settled.notify_all()
        self._send_all(out)
        self._peers.mark_gone(address)
        self._peers.drop(address)
        self.complete([(oid, None, False, ObjectLostError(f"object {oid.hex()} is lost: its owner at {address} is gone")) for oid in lost])

    def _on_get_object(self, identity: bytes, msg: protocol.Message) -> None:
        oid = ObjectId(msg.header[0])
        with self._lock:
            entry = self._store.get_locked(oid)
            if entry is not None and not entry.done:
                entry.remote_waiters.append(identity)
                return
        self._outbox.send_router([identity, *self._object_frames(oid, entry)])

    def _object_frames(self, oid: ObjectId, entry: objects.Entry | None) -> list[Any]:
        if entry is None or not entry.owned:
            error = ObjectLostError(f"object {oid.hex()} is not held by its owner any more (freed or owner restarted)")
            return protocol.encode(protocol.OBJECT, (oid, False), serialization.dumps_value(error))
        if entry.error is not None:
            return protocol.encode(protocol.OBJECT, (oid, False), serialization.dumps_value(entry.error))
        return protocol.encode(protocol.OBJECT, (oid, entry.ok), entry.frames or [])

    def _on_borrow(self, identity: bytes, msg: protocol.Message) -> None:
        oid, borrower = ObjectId(msg.header[0]), msg.header[1]
        with self._lock:
            if msg.type == protocol.UNBORROW:
                self._store.unborrow_locked(oid, borrower)
                return
            ok = self._store.borrow_locked(oid, borrower)
        self._outbox.send_router([identity, *protocol.encode(protocol.BORROWED, (oid, ok))])

    def _on_object(self, address: str, msg: protocol.Message) -> None:
        oid, ok = msg.header
        with self._lock:
            self._fetching.get(address, set()).discard(oid)
        self.complete([(oid, list(msg.payload), bool(ok), None)])

    def _on_borrowed(self, address: str, msg: protocol.Message) -> None:
        with self._lock:
            out = self._borrows.answered(ObjectId(msg.header[0]), bool(msg.header[1]))
            self._settled.notify_all()
        self._send_all(out)
