"""Objects this process owns or has fetched: their values, waiters and reference counts.

Thread-safe under the runtime's lock: user threads wait, the I/O thread completes.
"""

from __future__ import annotations

import _thread
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from zmesh.exceptions import GetTimeoutError
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
    __slots__ = ("callbacks", "done", "error", "fetching", "frames", "ok", "owned", "pinned", "remote_waiters", "waiters")

    def __init__(self, owned: bool) -> None:
        self.frames: list[Any] | None = None
        self.ok = True
        self.error: BaseException | None = None  # an error raised on this side, never serialized
        self.done = False
        self.waiters: list[Waiter] = []
        self.callbacks: list[Callable[[], None]] = []
        self.remote_waiters: list[bytes] = []
        self.owned = owned
        self.pinned = False
        self.fetching = False


class ObjectStore:
    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._entries: dict[ObjectId, Entry] = {}
        self._refcounts: dict[ObjectId, int] = {}

    # --- reference counting (the runtime's lock must be held) ---

    def add_ref_locked(self, oid: ObjectId) -> None:
        self._refcounts[oid] = self._refcounts.get(oid, 0) + 1

    def release_locked(self, oid: ObjectId) -> None:
        count = self._refcounts.get(oid, 0) - 1
        if count > 0:
            self._refcounts[oid] = count
            return
        self._refcounts.pop(oid, None)
        entry = self._entries.get(oid)
        if entry is not None and not entry.pinned and not entry.waiters and not entry.remote_waiters:
            del self._entries[oid]

    def pin_locked(self, oid: ObjectId) -> None:
        entry = self._entries.get(oid)
        if entry is not None and entry.owned:
            entry.pinned = True

    # --- creation and completion (lock held) ---

    def new_owned_locked(self, oid: ObjectId) -> Entry:
        entry = Entry(owned=True)
        self._entries[oid] = entry
        return entry

    def get_locked(self, oid: ObjectId) -> Entry | None:
        return self._entries.get(oid)

    def borrow_locked(self, oid: ObjectId) -> tuple[Entry, bool]:
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
    ) -> tuple[Entry | None, list[Waiter], list[Callable[[], None]]]:
        """Record a value; returns the entry and what to wake once the lock is released."""
        entry = self._entries.get(oid)
        if entry is None or entry.done:
            return None, [], []
        entry.frames = frames
        entry.ok = ok
        entry.error = error
        entry.done = True
        waiters, entry.waiters = entry.waiters, []
        callbacks, entry.callbacks = entry.callbacks, []
        if oid not in self._refcounts and not entry.pinned and not entry.remote_waiters:
            # Nobody holds a reference any more: a fire-and-forget call.
            del self._entries[oid]
        return entry, waiters, callbacks

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
                _, waiters, callbacks = self.complete_locked(oid, None, ok=False, error=error)
                woken.append((waiters, callbacks))
        return woken


def wake(waiters: Iterable[Waiter], callbacks: Iterable[Callable[[], None]]) -> None:
    for event in waiters:
        event.set()
    for callback in callbacks:
        callback()


def timeout_error(timeout: float | None, pending: int) -> GetTimeoutError:
    return GetTimeoutError(f"get timed out after {timeout} s with {pending} object(s) still pending")
