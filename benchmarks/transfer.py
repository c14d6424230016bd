"""Large objects across nodes: the speed of one copy against raw ZeroMQ, and memory that must not grow per reader.

Usage::

    python benchmarks/transfer.py            # alone: about 30 s on 2 cores
    python benchmarks/transfer.py --quick    # a 250 MB object instead of 1 GB
    python benchmarks/mesh.py --only objects # the same, as a section of the mesh's figures

A 3-node ``LocalCluster`` on 127.0.0.1, as a new user would make it (default ``NodeConfig``:
CURVE on every TCP socket, 4 MiB chunks, 4 in flight). The driver on node A puts a numpy
array; an actor on node B reads it (touching every page), so node B pulls one copy from node
A's store over its data socket. Beside it, in the same run, the limit: two processes streaming
the same bytes with pyzmq over TCP loopback with CURVE, the same chunks and window, the
receiver asking for the next chunk as each arrives and keeping none (no copy). The two take
turns, twice (raw, zmesh, raw, zmesh); the ratio is best against best.

Memory: while 1, then 6 actors of node B read one 200 MB ref, a thread samples every 5 ms
the driver's RSS, node B's node process RSS (and how much of it is mapped shared memory) and
node B's files in /dev/shm; the kernel's own peak (VmHWM, reset first) backs the RSS samples.
Bytes sent and transfers started come from the nodes' status counters.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import zmq

import zmesh
from zmesh.node.config import NodeConfig
from zmesh.testing import LocalCluster, wait_for
from zmesh.transport import shm
from zmesh.util.scheduling_strategies import NodeAffinitySchedulingStrategy

PAGE = 4096
READERS = 6
MB = 1e6


@dataclasses.dataclass(frozen=True)
class Figure:
    """One result; the fields of mesh.py's ``Row``, so that it can take them as they are."""

    metric: str
    value: float
    fmt: str = "{:.3f}"
    op: str = ""
    limit: float = math.nan
    note: str = ""


class _Reader:
    def ping(self) -> int:
        return 1

    def read(self, array: Any) -> tuple[int, int]:
        """Its size and one byte of every page: a reader that touches all of it, without a copy."""
        return int(array.nbytes), int(array[::PAGE].sum())


Reader = zmesh.remote(_Reader)  # not a decorator: mypy would keep the bare class's type


def say(text: str) -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------
# The limit: raw pyzmq with CURVE between two processes
# --------------------------------------------------------------------------

RAW_SOURCE_BYTES = 64 * 2**20  # the server sends views of this buffer: bigger than any cache, small in memory


def _raw_server(chunk: int) -> None:
    """``--raw-server``: keys on stdin, the port on stdout; answers ``offset,length`` with that many bytes, zero copy."""
    public, secret = sys.stdin.readline().strip(), sys.stdin.readline().strip()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = public.encode(), secret.encode()
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    print(sock.bind_to_random_port("tcp://127.0.0.1"), flush=True)
    source = memoryview(np.random.default_rng(0).integers(0, 256, RAW_SOURCE_BYTES + chunk, dtype=np.uint8).data)
    while True:
        identity, request = sock.recv_multipart()
        if not request:
            break
        offset, length = map(int, request.split(b","))
        start = offset % RAW_SOURCE_BYTES
        sock.send_multipart([identity, request, source[start : start + length]], copy=False)
    sock.close()
    ctx.term()


def raw_curve_gbps(total: int, chunk: int, window: int, limit_s: float = 120.0) -> float:
    """GB/s of ``total`` bytes asked for ``chunk`` at a time, ``window`` in flight, from a server process, CURVE on."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--raw-server", str(chunk)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(f"{server_public.decode()}\n{server_secret.decode()}\n")
        proc.stdin.flush()
        port = int(proc.stdout.readline())
        sock.curve_serverkey = server_public
        sock.curve_publickey, sock.curve_secretkey = client_public, client_secret
        for option in (zmq.SNDHWM, zmq.RCVHWM, zmq.LINGER):
            sock.setsockopt(option, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(limit_s * 1000))
        sock.connect(f"tcp://127.0.0.1:{port}")
        asked = received = 0

        def ask() -> None:
            nonlocal asked
            length = min(chunk, total - asked)
            sock.send(b"%d,%d" % (asked, length))
            asked += length

        start = time.perf_counter()
        for _ in range(window):
            if asked < total:
                ask()
        while received < total:
            _, data = sock.recv_multipart(copy=False)
            received += len(data)
            if asked < total:
                ask()
        elapsed = time.perf_counter() - start
        sock.send(b"")
        proc.wait(timeout=30)
    finally:
        sock.close(linger=0)
        ctx.term()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return total / elapsed / 1e9


# --------------------------------------------------------------------------
# Memory of the driver and of the reading node
# --------------------------------------------------------------------------


def _status_kib(pid: int, *fields: str) -> list[int]:
    """Fields of /proc/PID/status in KiB (VmRSS, VmHWM, RssShmem, ...); 0 for a process that is gone."""
    found = dict.fromkeys(fields, 0)
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in found:
                found[key] = int(rest.split()[0])
    return [found[f] for f in fields]


def _reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux: clear_refs 5)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")


def store_shm_bytes(node_id: str) -> int:
    """Bytes of /dev/shm that node ``node_id``'s store uses now (its segment files' allocated blocks)."""
    prefix = shm.segment_name(node_id, "")
    used = 0
    with contextlib.suppress(OSError), os.scandir(shm.directory()) as entries:
        for entry in entries:
            if entry.name.startswith(prefix):
                with contextlib.suppress(OSError):
                    used += entry.stat().st_blocks * 512
    return used


class Peaks:
    """In a thread while readers read: the highest RSS of the driver and node B, and of node B with its store's files."""

    def __init__(self, driver_pid: int, node_pid: int, node_id: str, every_s: float = 0.005) -> None:
        self.driver_pid, self.node_pid, self.node_id = driver_pid, node_pid, node_id
        self.every_s = every_s
        self.driver_rss = self.node_rss = self.node_total = self.node_unique = self.node_shm = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="transfer-bench-peaks", daemon=True)

    def __enter__(self) -> Peaks:
        for pid in (self.driver_pid, self.node_pid):
            _reset_peak(pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        # The kernel's peaks catch what fell between two samples.
        self.driver_rss = max(self.driver_rss, _status_kib(self.driver_pid, "VmHWM")[0] * 1024)
        self.node_rss = max(self.node_rss, _status_kib(self.node_pid, "VmHWM")[0] * 1024)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def sample(self) -> None:
        (driver,) = _status_kib(self.driver_pid, "VmRSS")
        node, mapped = _status_kib(self.node_pid, "VmRSS", "RssShmem")
        files = store_shm_bytes(self.node_id)
        self.driver_rss = max(self.driver_rss, driver * 1024)
        self.node_rss = max(self.node_rss, node * 1024)
        self.node_shm = max(self.node_shm, files)
        self.node_total = max(self.node_total, node * 1024 + files)
        # The segment's pages that node B maps while it fills them are in its RSS and in the file: once here.
        self.node_unique = max(self.node_unique, (node - mapped) * 1024 + files)


def _rss(pid: int) -> int:
    return _status_kib(pid, "VmRSS")[0] * 1024


# --------------------------------------------------------------------------
# The section
# --------------------------------------------------------------------------


def _store(cluster: LocalCluster, i: int) -> dict[str, Any]:
    return dict(cluster.status(i, timeout=30)["object_store"])


def _wait_freed(cluster: LocalCluster, *nodes: int) -> None:
    """Until the stores of ``nodes`` hold no segment: a copy freed once its readers let go."""
    for i in nodes:
        wait_for(lambda i=i: _store(cluster, i)["segments"] == 0, timeout=30, what=f"node {i}'s store to be empty")


def _expected_read(size: int) -> tuple[int, int]:
    return size, len(range(0, size, PAGE))  # an array of ones


def _read_once(cluster: LocalCluster, reader: Any, ref: Any, size: int) -> tuple[float, int]:
    """One actor of node B reads ``ref`` (node B pulls a copy): (seconds, bytes node A sent); the copy freed after."""
    sent = _store(cluster, 0)["bytes_sent"]
    start = time.perf_counter()
    got = zmesh.get(reader.read.remote(ref), timeout=600)
    read_s = time.perf_counter() - start
    assert tuple(got) == _expected_read(size), f"the reader saw {got}"
    sent = _store(cluster, 0)["bytes_sent"] - sent
    _wait_freed(cluster, 1)
    return read_s, sent


def _throughput(cluster: LocalCluster, reader: Any, size: int, chunk: int, window: int) -> tuple[float, list[float], list[float]]:
    """Put ``size`` bytes on node A; then twice the raw limit and a read on node B, in turn: (put s, raw GB/s, zmesh GB/s)."""
    array = np.ones(size, dtype=np.uint8)
    start = time.perf_counter()
    ref = zmesh.put(array)
    put_s = time.perf_counter() - start
    raw, ours = [], []
    for n in range(2):
        raw.append(raw_curve_gbps(size, chunk, window))
        read_s, sent = _read_once(cluster, reader, ref, size)
        ours.append(size / read_s / 1e9)
        say(f"   run {n + 1}: raw pyzmq {raw[-1]:.3f} GB/s; zmesh {ours[-1]:.3f} GB/s ({read_s:.3f} s; node A sent {sent / MB:,.1f} MB)")
    del ref, array
    _wait_freed(cluster, 0)
    return put_s, raw, ours


@dataclasses.dataclass
class MemoryRun:
    readers: int
    driver_growth: int  # driver's peak RSS over its RSS before the array existed
    node_total: int  # node B's peak of RSS + its store's /dev/shm, over its RSS before the reads
    node_unique: int  # the same with the mapped shared pages counted once
    node_rss: int  # node B's peak RSS over its RSS before
    node_shm: int  # node B's store's peak /dev/shm use
    sent: int  # bytes node A sent
    transfers: int  # transfers node B started


def _memory_run(cluster: LocalCluster, readers: list[Any], ref: Any, size: int, driver_before: int) -> MemoryRun:
    node_b = cluster.nodes[1]
    node_id = cluster.node_id(1)
    _wait_freed(cluster, 1)
    sent, started = _store(cluster, 0)["bytes_sent"], _store(cluster, 1)["transfers_started"]
    node_before = _rss(node_b.pid)
    with Peaks(os.getpid(), node_b.pid, node_id) as peaks:
        # All at once: every reader asks before the copy is done, so they share one transfer.
        got = zmesh.get([r.read.remote(ref) for r in readers], timeout=300)
    assert all(tuple(g) == _expected_read(size) for g in got), f"the readers saw {got}"
    return MemoryRun(
        readers=len(readers),
        driver_growth=peaks.driver_rss - driver_before,
        node_total=peaks.node_total - node_before,
        node_unique=peaks.node_unique - node_before,
        node_rss=peaks.node_rss - node_before,
        node_shm=peaks.node_shm,
        sent=_store(cluster, 0)["bytes_sent"] - sent,
        transfers=_store(cluster, 1)["transfers_started"] - started,
    )


def objects(quick: bool = False) -> list[Figure]:
    """The section: throughput against raw pyzmq, then memory with 1 and 6 readers."""
    size = 250 * 10**6 if quick else 10**9
    mem_size = 200 * 10**6
    config = NodeConfig()
    chunk, window = config.transfer_chunk, config.transfer_window
    window_bytes = chunk * window
    with LocalCluster(nodes=3, fast=False) as cluster:
        cluster.connect(0)
        here, there = cluster.node_id(0), cluster.node_id(1)
        readers = [Reader.options(scheduling_strategy=NodeAffinitySchedulingStrategy(there, soft=False)).remote() for _ in range(READERS)]
        zmesh.get([r.ping.remote() for r in readers], timeout=60)
        say(f"   {size / 1e9:g} GB put on node A ({here}), read by an actor on node B ({there}); raw: {chunk >> 20} MiB x {window}")
        put_s, raw, ours = _throughput(cluster, readers[0], size, chunk, window)

        driver_before = _rss(os.getpid())
        array = np.ones(mem_size, dtype=np.uint8)
        ref = zmesh.put(array)
        runs = [_memory_run(cluster, readers[:n], ref, mem_size, driver_before) for n in (1, READERS)]
        for run in runs:
            say(
                f"   {run.readers} reader(s) of a {mem_size / MB:.0f} MB ref: driver +{run.driver_growth / MB:.1f} MB; node B "
                f"RSS +{run.node_rss / MB:.1f} MB, store files {run.node_shm / MB:.1f} MB, together +{run.node_total / MB:.1f} MB "
                f"(+{run.node_unique / MB:.1f} MB with its mapped pages counted once); node A sent {run.sent / MB:,.1f} MB "
                f"in {run.transfers} transfer(s)"
            )
        del ref, array
        _wait_freed(cluster, 0, 1)
    gbps, limit = max(ours), max(raw)
    one, six = runs
    driver_limit = (mem_size + 2 * window_bytes) / MB
    return [
        Figure(f"{size / 1e9:g} GB numpy put on node A, read by an actor on node B, best of 2 [GB/s]", gbps),
        Figure(f"  raw pyzmq CURVE TCP loopback, {chunk >> 20} MiB x {window} in flight, best of 2 [GB/s]", limit),
        Figure("  zmesh / raw [x]", gbps / limit, "{:.2f}", ">=", 0.8),
        Figure(f"  put of the {size / 1e9:g} GB array on node A [GB/s]", size / put_s / 1e9),
        Figure(
            f"{mem_size / MB:.0f} MB ref, 1 reader on node B: driver peak RSS growth [MB]",
            one.driver_growth / MB,
            "{:.1f}",
            "<=",
            driver_limit,
            note=f"<= {driver_limit:.0f} (obj + 2 win)",
        ),
        Figure(
            f"  {READERS} readers: driver peak RSS growth [MB]",
            six.driver_growth / MB,
            "{:.1f}",
            "<=",
            driver_limit,
            note=f"<= {driver_limit:.0f} (obj + 2 win)",
        ),
        Figure(
            f"  {READERS} readers: node B peak RSS growth + its /dev/shm [MB]",
            six.node_total / MB,
            "{:.1f}",
            "<=",
            2 * mem_size / MB,
            note=f"<= {2 * mem_size / MB:.0f} (2 x obj)",
        ),
        Figure("    the same, its mapped shared pages counted once [MB]", six.node_unique / MB, "{:.1f}"),
        Figure(f"  {READERS} readers: bytes sent by node A [objects]", six.sent / mem_size, "{:.3f}", "<=", 1.001, note="<= 1 copy"),
        Figure(f"  {READERS} readers: transfers node B started", six.transfers, "{:.0f}", "<=", 1),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 250 MB object instead of 1 GB")
    parser.add_argument("--raw-server", type=int, metavar="CHUNK", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_server:
        _raw_server(args.raw_server)
        return 0
    figures = objects(args.quick)
    width = max(len(f.metric) for f in figures)
    say("")
    for f in figures:
        target = f.note or (f"{f.op} {f.limit:g}" if f.op else "")
        met = "" if not f.op else "ok" if (f.value <= f.limit if f.op == "<=" else f.value >= f.limit) else "MISS"
        say(f"{f.metric:<{width}}  {f.fmt.format(f.value):>10}  {target:<22}  {met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
