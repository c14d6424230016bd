"""Objects this process owns or has fetched: their values, waiters and reference counts.

Thread-safe under the runtime's lock: user threads wait, the I/O thread completes.
"""

from __future__ import annotations

import _thread
import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from zmesh.exceptions import GetTimeoutError
from zmesh.transport import serialization
from zmesh.transport.ids import ObjectId


class Waiter:
    """A wake-up flag on a bare lock: far cheaper to set than ``threading.Event`` on the hot path."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()  # held means "not set"

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:
            pass  # already set

    def clear(self) -> None:
        self._lock.acquire(blocking=False)

    def wait(self, timeout: float | None) -> bool:
        """True once set (and clears it again); False after ``timeout`` seconds."""
        return self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0))


class Entry:
    __slots__ = (
        "borrowers",
        "callbacks",
        "contained",
        "done",
        "error",
        "fetching",
        "frames",
        "lender",
        "mapped",
        "ok",
        "owned",
        "remote_waiters",
        "waiters",
    )

    def __init__(self, owned: bool) -> None:
        self.frames: list[Any] | None = None
        self.ok = True
        self.error: BaseException | None = None  # an error raised on this side, never serialized
        self.done = False
        self.waiters: list[Waiter] = []
        self.callbacks: list[Callable[[], None]] = []
        self.remote_waiters: list[bytes] = []
        self.owned = owned
        self.fetching = False
        # Owned: processes that told us they hold references to it (address -> how many times).
        self.borrowers: dict[str, int] | None = None
        # The refs pickled inside the value, kept alive as long as the value is (see ownership).
        self.contained: list[Any] | None = None
        # The worker that lent us the refs inside this result: told when we let go of it.
        self.lender: str | None = None
        # A value in shared memory, once read here: its mapped frames and what keeps them (serialization.read_descriptor).
        self.mapped: tuple[list[Any], Any] | None = None


class ObjectStore:
    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._entries: dict[ObjectId, Entry] = {}
        self._refcounts: dict[ObjectId, int] = {}
        self._by_borrower: dict[str, set[ObjectId]] = {}
        # Entries freed whose lender must be told; the runtime sends and clears this.
        self.freed_lent: list[tuple[ObjectId, str]] = []

    def __len__(self) -> int:
        return len(self._entries)

    # --- reference counting (the runtime's lock must be held) ---

    def add_ref_locked(self, oid: ObjectId) -> int:
        """Count one more local reference; returns the count."""
        count = self._refcounts.get(oid, 0) + 1
        self._refcounts[oid] = count
        return count

    def release_locked(self, oid: ObjectId) -> int:
        """Count one local reference less; returns the count (0: the last one here is gone)."""
        count = self._refcounts.get(oid, 0) - 1
        if count > 0:
            self._refcounts[oid] = count
            return count
        self._refcounts.pop(oid, None)
        self._maybe_free(oid)
        return 0

    def _maybe_free(self, oid: ObjectId) -> None:
        """Forget ``oid`` once no reference to it is left here or anywhere, and nobody waits for it."""
        entry = self._entries.get(oid)
        if entry is None or oid in self._refcounts or entry.borrowers or entry.remote_waiters:
            return
        if not entry.done and (entry.owned or entry.waiters):
            # A result still to come (it completes, then goes: a fire-and-forget call), or a waiter that
            # must be woken by it. Once done, a waiter still leaving does not count: it holds the entry itself.
            return
        del self._entries[oid]
        if entry.lender is not None:
            self.freed_lent.append((oid, entry.lender))

    def borrow_locked(self, oid: ObjectId, borrower: str) -> bool:
        """``borrower`` holds a reference to our ``oid``; False when it is no longer here to keep."""
        entry = self._entries.get(oid)
        if entry is None or not entry.owned:
            return False
        if entry.borrowers is None:
            entry.borrowers = {}
        entry.borrowers[borrower] = entry.borrowers.get(borrower, 0) + 1
        self._by_borrower.setdefault(borrower, set()).add(oid)
        return True

    def unborrow_locked(self, oid: ObjectId, borrower: str, all_of_them: bool = False) -> None:
        entry = self._entries.get(oid)
        if entry is None or not entry.borrowers or borrower not in entry.borrowers:
            return
        left = 0 if all_of_them else entry.borrowers[borrower] - 1
        if left > 0:
            entry.borrowers[borrower] = left
            return
        del entry.borrowers[borrower]
        oids = self._by_borrower.get(borrower)
        if oids is not None:
            oids.discard(oid)
            if not oids:
                del self._by_borrower[borrower]
        self._maybe_free(oid)

    def borrower_gone_locked(self, borrower: str) -> None:
        for oid in list(self._by_borrower.get(borrower, ())):
            self.unborrow_locked(oid, borrower, all_of_them=True)

    def borrowers(self) -> list[str]:
        return list(self._by_borrower)

    # --- creation and completion (lock held) ---

    def new_owned_locked(self, oid: ObjectId) -> Entry:
        entry = Entry(owned=True)
        self._entries[oid] = entry
        return entry

    def get_locked(self, oid: ObjectId) -> Entry | None:
        return self._entries.get(oid)

    def fetch_locked(self, oid: ObjectId) -> tuple[Entry, bool]:
        """The entry for a foreign object, and whether a fetch must be sent now."""
        entry = self._entries.get(oid)
        if entry is None:
            entry = Entry(owned=False)
            self._entries[oid] = entry
        if entry.owned or entry.done or entry.fetching:
            return entry, False
        entry.fetching = True
        return entry, True

    def complete_locked(
        self, oid: ObjectId, frames: list[Any] | None, ok: bool = True, error: BaseException | None = None
    ) -> tuple[Entry | None, list[Waiter], list[Callable[[], None]], list[bytes]]:
        """Record a value; returns the entry, what to wake once the lock is released, and the peers to send it to.

        The peers that asked for it meanwhile are taken off the entry here, before it may be freed:
        left on it, they kept an entry nobody referenced any more for ever (the torture test found it).
        """
        # Written for us in shared memory (a result, an item): held while the entry is, let go with it, or now.
        hold = serialization.adopt(frames)
        entry = self._entries.get(oid)
        if entry is None or entry.done:
            return None, [], [], []
        if hold is not None:
            entry.contained = [*(entry.contained or ()), hold]
        entry.frames = frames
        entry.ok = ok
        entry.error = error
        entry.done = True
        waiters, entry.waiters = entry.waiters, []
        callbacks, entry.callbacks = entry.callbacks, []
        remote, entry.remote_waiters = entry.remote_waiters, []
        self._maybe_free(oid)  # nobody holds a reference any more: a fire-and-forget call
        return entry, waiters, callbacks, remote

    # --- waiting (called without the lock) ---

    def wait_done(self, entries: list[Entry], count: int, timeout: float | None) -> int:
        """Block until ``count`` of ``entries`` are done; returns how many are."""
        deadline = None if timeout is None else time.monotonic() + timeout
        event = Waiter()
        if count == len(entries):
            # Waiting for all: wait on each in turn, so a long list costs O(n), not O(n^2).
            for index, entry in enumerate(entries):
                if not self._wait_one(entry, event, deadline):
                    return index + sum(1 for e in entries[index:] if e.done)
            return len(entries)
        try:
            while True:
                with self._lock:
                    pending = [e for e in entries if not e.done]
                    ready = len(entries) - len(pending)
                    if ready >= count:
                        return ready
                    event.clear()
                    for e in pending:
                        e.waiters.append(event)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return ready
                event.wait(remaining)
        finally:
            with self._lock:
                for e in entries:
                    if event in e.waiters:
                        e.waiters.remove(event)

    def _wait_one(self, entry: Entry, event: Waiter, deadline: float | None) -> bool:
        with self._lock:
            if entry.done:
                return True
            event.clear()
            entry.waiters.append(event)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        done = event.wait(remaining)
        with self._lock:
            if event in entry.waiters:
                entry.waiters.remove(event)
            return done or entry.done

    def first_done(self, oids: Iterable[ObjectId], count: int) -> list[int]:
        """Positions of the first ``count`` objects already done, without waiting or fetching."""
        found: list[int] = []
        entries = self._entries
        with self._lock:
            for index, oid in enumerate(oids):
                entry = entries.get(oid)
                if entry is not None and entry.done:
                    found.append(index)
                    if len(found) == count:
                        break
        return found

    def add_callback(self, entry: Entry, callback: Callable[[], None]) -> None:
        with self._lock:
            if not entry.done:
                entry.callbacks.append(callback)
                return
        callback()

    def fail_all_locked(self, error: BaseException) -> list[tuple[list[Waiter], list[Callable[[], None]]]]:
        woken = []
        for oid, entry in list(self._entries.items()):
            if not entry.done:
                _, waiters, callbacks, _ = self.complete_locked(oid, None, ok=False, error=error)
                woken.append((waiters, callbacks))
        return woken


def loop_waiter() -> tuple[asyncio.Future[None], Callable[[], None]]:
    """A future on the running loop, and what any thread calls to complete it (nothing once that loop closed)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def done() -> None:
        if not future.done():
            future.set_result(None)

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(done)
        except RuntimeError:
            pass  # the loop closed while waiting: nobody is left to wake

    return future, wake


def wake(waiters: Iterable[Waiter], callbacks: Iterable[Callable[[], None]]) -> None:
    for event in waiters:
        event.set()
    for callback in callbacks:
        callback()


def timeout_error(timeout: float | None, pending: int) -> GetTimeoutError:
    return GetTimeoutError(f"get timed out after {timeout} s with {pending} object(s) still pending")
