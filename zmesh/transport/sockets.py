"""Socket construction with the options every zmesh socket needs."""

from __future__ import annotations

import ipaddress
import os
import pickle
import resource
import socket
import stat
import weakref
from pathlib import Path
from typing import Any, TypeAlias

import zmq

from zmesh.transport import rundir
from zmesh.transport.security import Security

Socket: TypeAlias = "zmq.Socket[Any]"
Context: TypeAlias = "zmq.Context[Any]"


# Every context zmesh made in this process, so a test can prove each one was terminated.
live_contexts: weakref.WeakSet[Context] = weakref.WeakSet()


def new_context(max_sockets: int | None = None) -> Context:
    """A ZeroMQ context sized for a process that talks to thousands of peers.

    Each peer costs two or three descriptors and one socket: the usual soft limit of
    1,024 open files and ZeroMQ's default of 1,023 sockets a context stop a driver
    at a few hundred actors, so both are raised (Ray raises the file limit too).
    Sockets go up to ``max_sockets``, or as far as ZeroMQ allows: ZeroMQ allocates a
    slot for each when the first socket opens, a millisecond at its limit of 65,535,
    which a worker started per actor does not spend.
    """
    raise_open_file_limit()
    ctx: Context = zmq.Context()
    limit = ctx.get(zmq.SOCKET_LIMIT)
    ctx.set(zmq.MAX_SOCKETS, limit if max_sockets is None else min(max_sockets, limit))
    live_contexts.add(ctx)
    return ctx


def raise_open_file_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def open_file_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# A new peer costs a ZeroMQ mailbox, a connection and, while reconnecting, one more.
_FDS_PER_PEER = 3


def room_for_peer(peers: int) -> bool:
    """Whether a new peer connection can get its descriptors.

    Past the limit ZeroMQ still makes the socket but retries the connection silently
    for ever, so messages to it would wait without an error: ask before, not after.
    Counting open descriptors costs a directory listing, so it is done only when the
    limit is near.
    """
    limit = open_file_limit()
    if limit >= 4 * (peers * _FDS_PER_PEER + 256):
        return True
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        return False  # even the listing could not get a descriptor
    return used + 2 * _FDS_PER_PEER < limit


def _common(sock: Socket, security: Security) -> Socket:
    # linger 0: closing never blocks on a dead peer; hwm 0: never drop a call silently.
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    # A peer sending a larger frame is disconnected by ZeroMQ before we see any of it.
    sock.setsockopt(zmq.MAXMSGSIZE, security.max_message_bytes)
    return sock


def router(ctx: Context, security: Security, host: str = "127.0.0.1", port: int = 0) -> tuple[Socket, str]:
    """A ROUTER bound on ``host``; port 0 picks a free one. Returns the socket and its address."""
    sock = _common(ctx.socket(zmq.ROUTER), security)
    security.server(sock)
    # An unknown routing id raises instead of dropping, so a reply to a gone peer is visible.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    try:
        if port == 0:
            port = sock.bind_to_random_port(f"tcp://{host}")
        else:
            sock.bind(f"tcp://{host}:{port}")
    except zmq.ZMQError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc}") from None
    return sock, f"tcp://{host}:{port}"


def servers(ctx: Context, security: Security, host: str, directory: Path | None = None) -> tuple[list[Socket], str]:
    """A process's inbound ROUTERs: TCP with CURVE, plus an IPC one for peers on this host.

    IPC carries no encryption: it lives in the user's 0700 run directory, which other
    users cannot enter, so large arguments between local processes pay no cipher.
    ``directory``: the run directory's socket folder, if the caller has it already.
    Returns the sockets and the process's address, ``tcp://host:port|ipc://path``.
    """
    tcp, tcp_address = router(ctx, security, host)
    path = (directory or rundir.socket_dir()) / f"{os.getpid()}-{os.urandom(6).hex()}.sock"
    local = _common(ctx.socket(zmq.ROUTER), security)
    local.setsockopt(zmq.ROUTER_MANDATORY, 1)
    local.setsockopt(zmq.ROUTER_HANDOVER, 1)
    local.bind(f"ipc://{path}")
    return [tcp, local], f"{tcp_address}|ipc://{path}"


def endpoints(address: str) -> tuple[str, str | None]:
    """The TCP endpoint of an address and its IPC one, if it has one."""
    tcp, _, ipc = address.partition("|")
    return tcp, ipc or None


def connect(ctx: Context, security: Security, address: str, identity: bytes) -> Socket:
    """A DEALER to a peer: over IPC when the peer is a process of ours on this host, else TCP with CURVE."""
    tcp, ipc = endpoints(address)
    # ZMESH_LOCAL_IPC=0 sends same-host traffic over TCP too: for measuring what CURVE costs.
    if ipc is not None and os.environ.get("ZMESH_LOCAL_IPC") != "0" and _is_ours(ipc.removeprefix("ipc://")):
        return dealer(ctx, Security(None, security.max_message_bytes), ipc, identity)[0]
    return dealer(ctx, security, tcp, identity)[0]


def remove_ipc(address: str | None) -> None:
    """Delete the IPC socket file of a process of ours that is gone (ZeroMQ cannot, once it was killed)."""
    ipc = endpoints(address)[1] if address else None
    if ipc is not None and _is_ours(ipc.removeprefix("ipc://")):
        os.unlink(ipc.removeprefix("ipc://"))


def _is_ours(path: str) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False
    return stat.S_ISSOCK(info.st_mode) and info.st_uid == os.getuid() and os.path.dirname(path) == str(rundir.socket_dir())


def dealer(ctx: Context, security: Security, address: str, identity: bytes, *, monitor: int = 0) -> tuple[Socket, Socket | None]:
    """A DEALER connected to ``address``, and a monitor of ``monitor`` events made before it connects.

    A monitor made after ``connect`` can miss the first events (the connection is set up on
    ZeroMQ's thread), and with them the fact that the peer was ever there.
    """
    sock = _common(ctx.socket(zmq.DEALER), security)
    security.client(sock)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.RECONNECT_IVL, 50)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    watcher = sock.get_monitor_socket(monitor) if monitor else None
    sock.connect(address)
    return sock, watcher


_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_COPY_LIMIT = 64 * 1024


# pyzmq's Python layer adds checks and enum conversions per call; on the call path we go to
# the compiled socket methods directly.
_raw: Any = zmq.Socket.__mro__[1]
_raw_send = _raw.send
_raw_recv = _raw.recv
_raw_get = _raw.get


def send(sock: Socket, frames: list[Any], flags: int = 0) -> None:
    """``send_multipart`` without its per-frame overhead; large frames go without a copy."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        copy = not (isinstance(frame, memoryview | bytearray | pickle.PickleBuffer) or len(frame) >= _COPY_LIMIT)
        _raw_send(sock, frame, flags | _SNDMORE if i < last else flags, copy=copy)


def recv(sock: Socket, flags: int = 0) -> list[Any]:
    """One message's frames: small ones as bytes, large ones as zero-copy memoryviews."""
    frames: list[Any] = [_raw_recv(sock, flags)]  # the first frame is always small: a routing id or a header
    while _raw_get(sock, _RCVMORE):
        frame = _raw_recv(sock, 0, copy=False)
        frames.append(frame.bytes if len(frame) < _COPY_LIMIT else frame.buffer)
    return frames


def readable(sock: Socket) -> bool:
    """Whether a message waits on ``sock``; also resets the signal of its file descriptor."""
    return bool(_raw_get(sock, _EVENTS) & _POLLIN)


def fileno(sock: Socket) -> int:
    """The descriptor that becomes readable when ``sock`` may have news (check ``readable`` then)."""
    return int(sock.getsockopt(zmq.FD))


def local_address_towards(address: str) -> str:
    """This host's address on the route to ``address`` (loopback for a local node)."""
    host = address.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    try:
        if ipaddress.ip_address(host).is_loopback:
            return "127.0.0.1"
    except ValueError:
        if host == "localhost":
            return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # no packet is sent: this only asks the routing table
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"
