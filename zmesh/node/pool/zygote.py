"""The zygote: a process that has imported the worker's code and forks a worker per actor.

Forking a warm process costs milliseconds where starting Python costs tens of them,
which is what makes actor creation fast. The zygote holds no sockets or threads, so
forking it is safe. It talks to its node over a socketpair in JSON lines:
node -> zygote ``{"op": "spawn", "token", "address", "env"}``;
zygote -> node ``{"ev": "ready"}``, ``{"ev": "spawned", "token", "pid"}``,
``{"ev": "exited", "pid", "code"}``.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import hashlib
import os
import select
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import psutil

from zmesh.node.pool.lines import ChannelClosed, LineChannel

_PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up once in the zygote: each forked worker then skips the dlopen (a quarter of a millisecond)."""
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


def die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent exits, so no worker outlives its node."""
    parent = os.getppid()
    prctl = _prctl()
    if prctl is None:
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _spawn(request: dict[str, Any], channel: LineChannel, wake_r: int, wake_w: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    # The child: drop the zygote's plumbing, become a worker.
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # first: the zygote's own handler is not a worker's
        signal.set_wakeup_fd(-1)
        # Default dispositions, so Ctrl-C reaches the worker and the programs it starts (SIG_IGN survives exec).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        channel.close()
        os.close(wake_r)
        os.close(wake_w)
        die_with_parent()
        os.environ.update(request.get("env") or {})
        from zmesh.transport.security import Security
        from zmesh.worker import main as worker

        security = Security.from_spawn_env(request["security"])
        code = worker.main(request["address"], request["token"], security, request["host"], warm=bool(request.get("warm")))
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)
    return 0  # unreachable


def _reap(channel: LineChannel) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        channel.send({"ev": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})


def main(fd: int) -> int:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the node's to handle
    signal.signal(signal.SIGTERM, _request_stop)
    # Import what every worker needs now, once, so each fork starts warm.
    from zmesh.worker import main as worker  # noqa: F401

    hashlib.sha256(b"")  # OpenSSL sets itself up on first use (a cluster key's fingerprint): once, here
    tempfile.gettempdir()  # its first call writes a probe file to find the temp dir (the default run directory's parent)
    # What was imported is never collected: frozen, a worker's collections do not walk it, nor write to
    # (and so copy) the pages it shares with the zygote.
    gc.freeze()

    channel = LineChannel(socket.socket(fileno=fd))
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    try:
        channel.send({"ev": "ready"})
        while not _stop.requested:  # SIGTERM sets it; the wakeup fd ends the select
            # Never block on a write: the node may be busy writing to us at the same moment.
            writers = [channel.fileno()] if channel.wants_write else []
            try:
                readable, writable, _ = select.select([channel.fileno(), wake_r], writers, [])
            except InterruptedError:
                continue
            if wake_r in readable:
                os.read(wake_r, 4096)
            if writable:
                channel.flush()
            if channel.fileno() in readable:
                for request in channel.receive():
                    if request.get("op") == "spawn":
                        pid = _spawn(request, channel, wake_r, wake_w)
                        channel.send({"ev": "spawned", "token": request.get("token"), "pid": pid})
            _reap(channel)
    except ChannelClosed:
        pass
    # The node is gone or stops us. Our workers would die with us (PDEATHSIG), but a moment later, and one
    # killed while binding its socket still makes the file: end them first, so that once the zygote is gone
    # no worker of it is left to make one.
    _end_workers()
    return 0


class _Stop:
    """Whether the node asked the zygote to stop (SIGTERM): a flag, so the handler never interrupts the shutdown."""

    requested = False


_stop = _Stop()


def _request_stop(*_: Any) -> None:
    _stop.requested = True


def _end_workers(timeout: float = 2.0) -> None:
    """Kill every child still running and reap them all (within ``timeout``)."""
    for child in psutil.Process().children():
        try:
            child.kill()
        except psutil.Error:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # none left
        if pid == 0:
            time.sleep(0.005)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
