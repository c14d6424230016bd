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
import ctypes
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


# Mapped with libc's mmap, not Python's: an ``mmap.mmap`` keeps a duplicate descriptor open for its life, and a
# process holding a thousand large objects would run out of descriptors. A mapping here is a ctypes array over
# the mapped bytes; it unmaps itself when the last view of it goes.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class _Unmap:
    """Kept by a mapping's array: unmaps the pages when the array (and so every view of it) is gone."""

    __slots__ = ("address", "size")

    def __init__(self, address: int, size: int) -> None:
        self.address = address
        self.size = size

    def __del__(self) -> None:
        _libc.munmap(self.address, self.size)


def _map(fd: int, size: int, writable: bool, populate: bool = False) -> Any:
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
    address = _libc.mmap(None, size, prot, flags, fd, 0)
    if address is None or address == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot map {size:,} bytes of shared memory: {os.strerror(err)}")
    mapping = (ctypes.c_ubyte * size).from_address(address)
    setattr(mapping, "_unmap", _Unmap(address, size))  # noqa: B010 (the array keeps its unmapper alive)
    return mapping


def view(mapping: Any) -> memoryview:
    """A byte view of a mapping (writable only for the writer's own mapping)."""
    return memoryview(mapping).cast("B")


_directory: tuple[str | None, Path] | None = None


def directory() -> Path:
    """Where segments live: ``ZMESH_SHM_DIR``, else ``/dev/shm``, else the temp dir (not shared memory, but works)."""
    global _directory
    chosen = os.environ.get("ZMESH_SHM_DIR")
    known = _directory
    if known is not None and known[0] == chosen:
        return known[1]  # looked up once per setting: this is on the path of every large value
    if chosen:
        path = Path(chosen)
    else:
        shm = Path("/dev/shm")
        path = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    _directory = (chosen, path)
    return path


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


def create(name: str, frames: list[Any], size: int) -> None:
    """Make segment ``name`` of ``size`` bytes holding ``frames`` (one copy each).

    Written with ``pwrite``, not through a mapping: the kernel fills fresh pages without a page fault
    each, and a full tmpfs answers ENOSPC, where a write into a mapping of it would raise SIGBUS.
    """
    path = directory() / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        _pwrite_frames(fd, frames)
        os.ftruncate(fd, size)  # the last frame's alignment padding, or all of it for an empty segment
    except BaseException as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise NoSpaceError(exc.errno, f"no room for {size:,} bytes in {path.parent}") from None
        raise
    os.close(fd)


def map_to_write(name: str) -> Any:
    """A writable mapping of an existing segment of ours (one that is reused: its pages exist, and stay mapped)."""
    fd = os.open(directory() / name, os.O_RDWR | os.O_CLOEXEC)
    try:
        return _map(fd, os.fstat(fd).st_size, writable=True)
    finally:
        os.close(fd)


def write(mapping: Any, frames: list[Any]) -> None:
    """Copy ``frames`` into a writable mapping, each at its aligned offset (a plain memory copy)."""
    target = view(mapping)
    offsets, _ = layout(memoryview(f).nbytes for f in frames)
    for frame, offset in zip(frames, offsets, strict=True):
        source = memoryview(frame).cast("B")
        target[offset : offset + source.nbytes] = source


def pwrite_at(fd: int, data: Any, offset: int) -> None:
    """All of ``data`` at ``offset`` (one write moves at most about 2 GiB on Linux)."""
    source = memoryview(data).cast("B")
    done = 0
    while done < source.nbytes:
        done += os.pwrite(fd, source[done:], offset + done)


def _pwrite_frames(fd: int, frames: list[Any]) -> None:
    offsets, _ = layout(memoryview(f).nbytes for f in frames)
    for frame, offset in zip(frames, offsets, strict=True):
        pwrite_at(fd, frame, offset)


def open_to_fill(name: str, size: int) -> int:
    """A new empty segment of ``size`` bytes to be filled with ``pwrite_at`` (a transfer); returns its descriptor."""
    path = directory() / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        unlink(name)
        raise
    return fd


def open_map(name: str, populate: bool = False) -> Any:
    """Map segment ``name`` read-only; FileNotFoundError once it is freed.

    ``populate``: map every page now (the node that serves a segment to another reads all of it, and a page
    fault each in ZeroMQ's thread, which also encrypts, would slow the transfer).
    """
    fd = os.open(directory() / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size < 1:
            raise FileNotFoundError(f"segment {name} is empty")
        return _map(fd, size, writable=False, populate=populate)
    finally:
        os.close(fd)


def frames_of(mapping: Any, lengths: Iterable[int]) -> list[memoryview]:
    """Read-only views of each frame in a mapping: no copy."""
    whole = view(mapping).toreadonly()
    offsets, end = layout(lengths := list(lengths))
    if end > whole.nbytes and lengths:
        raise ValueError(f"a descriptor's frames ({end:,} bytes) run past its segment ({whole.nbytes:,} bytes)")
    return [whole[o : o + n] for o, n in zip(offsets, lengths, strict=True)]


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


def remove_store(store_id: str) -> None:
    """Unlink every segment of store ``store_id`` (not its lock): the store is closing."""
    try:
        names = [p.name for p in directory().iterdir() if p.name.startswith(f"{_PREFIX}{store_id}.")]
    except OSError:
        return
    for name in names:
        if not name.endswith(".lock"):
            unlink(name)


def sweep_dead_stores(own_store: str) -> list[str]:
    """Unlink the segments of stores whose node is gone (killed without cleaning up); returns their names."""
    root = directory()
    try:
        names = [p.name for p in root.iterdir() if p.name.startswith(_PREFIX)]
    except OSError:
        return []
    live = {own_store}
    for store in {n[len(_PREFIX) : -len(".lock")] for n in names if n.endswith(".lock")} - live:
        if lock_is_free(store):
            unlink(f"{_PREFIX}{store}.lock")  # its node died: the lock and everything of its store go
        else:
            live.add(store)
    removed = []
    for name in names:
        owner = store_of(name)
        if owner is not None and owner not in live and not name.endswith(".lock"):
            unlink(name)
            removed.append(name)
    return removed
