"""The per-user run directory where a node says where it listens, so drivers can find it."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import psutil


class RunDirError(OSError):
    """The run directory is not private to this user, so nothing in it can be trusted."""


# A Unix socket's path must fit in sockaddr_un (107 bytes); the longest socket name zmesh makes takes 28 of them.
MAX_SOCKET_DIR_BYTES = 107 - 40


def run_dir() -> Path:
    """``$ZMESH_RUN_DIR``, else a directory of this user's under the temp dir; always mode 0700.

    Same-host sockets live here unencrypted, protected by these permissions alone, so a
    directory another user owns or can enter is refused rather than used.
    """
    configured = os.environ.get("ZMESH_RUN_DIR")
    path = Path(configured) if configured else Path(tempfile.gettempdir()) / f"zmesh-{os.getuid()}"
    return _private(path, parents=True)


def socket_dir() -> Path:
    """Where this user's processes bind their same-host (IPC) sockets: ``<run dir>/s``.

    A run directory too deep for socket paths (a long home or temp directory) gets a short
    private folder of the same user under /tmp instead, named for it, so every process of
    that run directory finds the same one.
    """
    base = run_dir()
    path = base / "s"
    if len(os.fsencode(path)) > MAX_SOCKET_DIR_BYTES:
        path = short_socket_dir(base)
    return _private(path, parents=False)


def short_socket_dir(base: Path) -> Path:
    """The stand-in socket folder of the run directory ``base``."""
    digest = hashlib.sha256(os.fsencode(base)).hexdigest()[:16]
    return Path("/tmp") / f"zmesh-{os.getuid()}-s-{digest}"


def _private(path: Path, *, parents: bool) -> Path:
    path.mkdir(mode=0o700, parents=parents, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise RunDirError(f"run directory {path} belongs to uid {info.st_uid}, not to you; set ZMESH_RUN_DIR to a directory of yours")
    if stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)
    return path


def remove_stale_sockets() -> None:
    """Delete IPC socket files whose process is gone (they are named ``<pid>-<id>.sock``)."""
    for entry in socket_dir().glob("*.sock"):
        pid = entry.name.partition("-")[0]
        if pid.isdigit() and not running(int(pid)):
            entry.unlink(missing_ok=True)


def remove_sockets_of(pid: int) -> None:
    """Delete the IPC socket files of a process that exited (killed, it could not; some it made before saying hello)."""
    for entry in socket_dir().glob(f"{pid}-*.sock"):
        entry.unlink(missing_ok=True)


def running(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (a killed worker not yet reaped by its new parent) does not."""
    try:
        status: str = psutil.Process(pid).status()
    except psutil.Error:
        return False
    return bool(status != psutil.STATUS_ZOMBIE)


def _node_file() -> Path:
    return run_dir() / "node.json"


def claim_node_slot() -> int:
    """Become the one node of this run directory: an exclusive lock held for the node's life.

    Returns the lock's descriptor (closing it gives the slot up). A second node started
    with the same run directory would take over ``node.json`` and strand the first one's
    drivers, so it is refused, naming the node that holds the slot.
    """
    path = run_dir() / "node.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        info = read_node_info() or {}
        where = f" (pid {info.get('pid')}, at {str(info.get('address', '?')).removeprefix('tcp://')})" if info else ""
        raise RunDirError(
            f"a zmesh node already runs for run directory {run_dir()}{where}; stop it with `zmesh stop`, "
            "or give this node another ZMESH_RUN_DIR"
        ) from None
    return fd


def write_node_info(info: dict[str, Any]) -> None:
    path = _node_file()
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info))
    tmp.chmod(0o600)
    tmp.replace(path)


def remove_node_info(pid: int) -> None:
    path = _node_file()
    info = read_node_info(check_alive=False)
    if info is not None and info.get("pid") == pid:
        path.unlink(missing_ok=True)


def read_node_info(check_alive: bool = True) -> dict[str, Any] | None:
    """The running node's record, or None when no live node wrote one."""
    try:
        info: dict[str, Any] = json.loads(_node_file().read_text())
    except (OSError, ValueError):
        return None
    if check_alive:
        pid = info.get("pid")
        try:
            alive = isinstance(pid, int) and psutil.Process(pid).create_time() == info.get("create_time")
        except psutil.Error:
            alive = False
        if not alive:
            return None
    return info
