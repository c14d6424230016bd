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
import json
import os
import select
import signal
import socket
import sys
from typing import Any

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent exits, so no worker outlives its node."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _send(sock: socket.socket, event: dict[str, Any]) -> None:
    try:
        sock.sendall(json.dumps(event).encode() + b"\n")
    except OSError:
        os._exit(0)  # the node is gone


def _spawn(request: dict[str, Any], control: socket.socket, wake_r: int, wake_w: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    # The child: drop the zygote's plumbing, become a worker.
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        control.close()
        os.close(wake_r)
        os.close(wake_w)
        die_with_parent()
        os.environ.update(request.get("env") or {})
        from zmesh.node import worker
        from zmesh.transport.security import Security

        security = Security.from_spawn_env(request["security"])
        code = worker.main(request["address"], request["token"], security, request["host"])
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)
    return 0  # unreachable


def main(fd: int) -> int:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the node's to handle
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    # Import what every worker needs now, once, so each fork starts warm.
    from zmesh.node import worker  # noqa: F401

    control = socket.socket(fileno=fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    _send(control, {"ev": "ready"})
    buffer = b""
    while True:
        try:
            readable, _, _ = select.select([control.fileno(), wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in readable:
            os.read(wake_r, 4096)
        if control.fileno() in readable:
            try:
                data = control.recv(65536)
            except OSError:
                data = b""
            if not data:
                return 0  # the node is gone; our workers die with us
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                if request.get("op") == "spawn":
                    pid = _spawn(request, control, wake_r, wake_w)
                    _send(control, {"ev": "spawned", "token": request["token"], "pid": pid})
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            _send(control, {"ev": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
