"""Shared-memory segments: one file in ``/dev/shm`` per large object, mapped by every reader on the node.

Files, not memfds: a reader finds a segment by its name, and ZeroMQ cannot pass
file descriptors. A segment unlinked while mapped stays readable until the last
mapping goes (Linux keeps the pages), which is what lets the store free an
object at once, whoever still reads it.

Names: ``zmesh.<store id>.<rest>``; the store id is the node's id. Each node
holds an ``flock`` on ``zmesh.<store id>.lock`` for its life, so any node that
starts later can tell a dead store's leftovers (after a SIGKILL) and unlink them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ALIGN = 64  # every frame starts on a cache line: numpy views stay aligned, as in Ray's store
_PREFIX = "zmesh."
_NAME = re.compile(r"^zmesh\.([0-9a-f]{1,32})\.([0-9a-z_-]{1,80})$")


class NoSpaceError(OSError):
    """The shared-memory file system has no room for a segment."""


def directory() -> Path:
    """Where segments live: ``ZMESH_SHM_DIR``, else ``/dev/shm``, else the temp dir (not shared memory, but works)."""
    chosen = os.environ.get("ZMESH_SHM_DIR")
    if chosen:
        return Path(chosen)
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def valid_name(name: str) -> bool:
    return bool(_NAME.match(name)) and not name.endswith(".lock")


def segment_name(store_id: str, rest: str) -> str:
    return f"{_PREFIX}{store_id}.{rest}"


def store_of(name: str) -> str | None:
    match = _NAME.match(name)
    return match.group(1) if match else None


def layout(lengths: Iterable[int]) -> tuple[list[int], int]:
    """Each frame's offset, and the segment's size, with every frame aligned."""
    offsets = []
    pos = 0
    for n in lengths:
        offsets.append(pos)
        pos += (n + ALIGN - 1) // ALIGN * ALIGN
    return offsets, max(pos, 1)


def create(name: str, frames: list[Any], size: int) -> mmap.mmap:
    """Make segment ``name`` holding ``frames`` (one copy each); its mapping stays writable only here."""
    path = directory() / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            # Reserve the pages now: writing into a mapping of a full tmpfs raises SIGBUS, which kills the process.
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                raise NoSpaceError(exc.errno, f"no room for {size:,} bytes in {path.parent}") from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    offsets, _ = layout(memoryview(f).nbytes for f in frames)
    for frame, offset in zip(frames, offsets, strict=True):
        view = memoryview(frame).cast("B")
        mm[offset : offset + view.nbytes] = view
    return mm


def create_empty(name: str, size: int) -> mmap.mmap:
    """A segment to be filled later (a transfer from another node)."""
    return create(name, [], size)


def open_map(name: str) -> mmap.mmap:
    """Map segment ``name`` read-only; FileNotFoundError once it is freed."""
    fd = os.open(directory() / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)


def frames_of(mm: mmap.mmap, lengths: Iterable[int]) -> list[memoryview]:
    """Read-only views of each frame in a mapping: no copy."""
    view = memoryview(mm).toreadonly()
    offsets, _ = layout(lengths := list(lengths))
    return [view[o : o + n] for o, n in zip(offsets, lengths, strict=True)]


def unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory() / name)


class StoreLock:
    """The ``flock`` a live store holds: while it is held, the store's segments are not leftovers."""

    def __init__(self, store_id: str) -> None:
        self.path = directory() / f"{_PREFIX}{store_id}.lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = -1


def lock_is_free(store_id: str) -> bool:
    """Whether no live node holds store ``store_id``'s lock (its node died, or is gone)."""
    try:
        fd = os.open(directory() / f"{_PREFIX}{store_id}.lock", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the probe's own lock, if it got one


def sweep_dead_stores(own_store: str) -> list[str]:
    """Unlink the segments of stores whose node is gone (killed without cleaning up); returns their names."""
    root = directory()
    try:
        names = [p.name for p in root.iterdir() if p.name.startswith(_PREFIX)]
    except OSError:
        return []
    live = {own_store}
    locks = {n[len(_PREFIX) : -len(".lock")] for n in names if n.endswith(".lock")}
    for store in locks - live:
        path = root / f"{_PREFIX}{store}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            live.add(store)  # its node still holds it
            os.close(fd)
            continue
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
    removed = []
    for name in names:
        owner = store_of(name)
        if owner is not None and owner not in live and not name.endswith(".lock"):
            unlink(name)
            removed.append(name)
    return removed
