"""The shared-memory object store on one host: zero copy, freeing by reference counts, capacity, crashes.

Real processes throughout: the embedded node or a `zmesh node` daemon, real workers, real
segments in /dev/shm (the leak check fails a test that leaves one).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zmesh
from zmesh.exceptions import ObjectStoreFullError
from zmesh.testing import NodeProcess, wait_for
from zmesh.transport import shm

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def _segments() -> list[str]:
    return sorted(p.name for p in shm.directory().glob("zmesh.*") if not p.name.endswith(".lock"))


def _in_shared_memory(address: int) -> bool:
    """Whether ``address`` lies in a mapping of one of zmesh's segments in this process."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if start <= address < end and len(parts) > 5 and os.path.basename(parts[5]).startswith("zmesh."):
                return True
    return False


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


@zmesh.remote
class Reader:
    def __init__(self) -> None:
        self.kept: list[Any] = []

    def inspect(self, array: Any) -> tuple[bool, bool, float]:
        """(backed by a segment, writeable, a checksum), read without a copy."""
        return _in_shared_memory(array.__array_interface__["data"][0]), bool(array.flags.writeable), float(array[::4096].sum())

    def anon_growth_reading(self, ref: list[zmesh.ObjectRef]) -> tuple[int, float]:
        before = _rss_anon_kib()
        array = zmesh.get(ref[0], timeout=60)
        total = float(array.sum())  # touches every page
        return _rss_anon_kib() - before, total

    def keep(self, refs: list[zmesh.ObjectRef]) -> int:
        self.kept.extend(refs)
        return len(self.kept)

    def keep_value(self, array: Any) -> int:
        self.kept.append(array)
        return len(self.kept)

    def checksum_kept(self) -> float:
        return float(sum(float(a[::4096].sum()) for a in self.kept))

    def drop(self) -> None:
        self.kept.clear()

    def make(self, nbytes: int) -> Any:
        return np.full(nbytes, 7, dtype=np.uint8)

    def echo(self, value: Any) -> Any:
        return value


@zmesh.remote
def make_array(nbytes: int) -> Any:
    return np.full(nbytes, 3, dtype=np.uint8)


@zmesh.remote
def total(array: Any) -> int:
    return int(array.sum())


@pytest.fixture
def local() -> Any:
    zmesh.init(num_cpus=4)
    yield
    zmesh.shutdown()


def test_a_large_put_is_read_without_a_copy_here_and_in_an_actor(local: None) -> None:
    array = np.arange(4 * MiB // 8, dtype=np.float64)
    ref = zmesh.put(array)
    assert len(_segments()) == 1
    mine = zmesh.get(ref, timeout=30)
    assert _in_shared_memory(mine.__array_interface__["data"][0]) and not mine.flags.writeable
    reader = Reader.remote()
    backed, writeable, checksum = zmesh.get(reader.inspect.remote(ref), timeout=30)
    assert backed and not writeable
    assert checksum == float(array[::4096].sum())
    # By value: written once into a segment at .remote(), mapped by the worker.
    assert zmesh.get(reader.inspect.remote(array), timeout=30)[0]
    # A large result: written by the worker for us, mapped here.
    result = zmesh.get(reader.make.remote(3 * MiB), timeout=30)
    assert _in_shared_memory(result.__array_interface__["data"][0]) and result.sum() == 21 * MiB
    del mine, result
    zmesh.kill(reader)


def test_a_reader_does_not_copy_what_it_reads(local: None) -> None:
    """Private memory of a reader stays flat while it reads every page of a 200 MB array."""
    ref = zmesh.put(np.ones(200 * MiB, dtype=np.uint8))
    reader = Reader.remote()
    growth_kib, checksum = zmesh.get(reader.anon_growth_reading.remote([ref]), timeout=60)
    assert checksum == 200 * MiB
    assert growth_kib < 20 * 1024, f"the reader's private memory grew by {growth_kib} KiB reading 200 MiB"
    zmesh.kill(reader)


def test_segments_go_when_the_last_reference_anywhere_goes(local: None) -> None:
    ref = zmesh.put(np.ones(2 * MiB, dtype=np.uint8))
    reader = Reader.remote()
    assert zmesh.get(reader.keep.remote([ref]), timeout=30) == 1  # the actor borrows it
    del ref
    assert len(_segments()) == 1  # the borrower keeps it
    zmesh.get(reader.drop.remote(), timeout=30)
    wait_for(lambda: not _segments(), timeout=10, what="the segment to go with the borrower's last reference")
    # A task's large result: held for us, freed with our ref.
    result = make_array.remote(3 * MiB)
    assert zmesh.get(total.remote(result), timeout=30) == 9 * MiB
    assert len(_segments()) == 1
    del result
    wait_for(lambda: not _segments(), timeout=10, what="the task result's segment to go with its ref")
    # A by-value argument: kept until the call's result, then freed; the worker's copy of the array outlives it.
    array = np.full(3 * MiB, 5, dtype=np.uint8)
    assert zmesh.get(reader.keep_value.remote(array), timeout=30) == 1
    wait_for(lambda: not _segments(), timeout=10, what="the argument's segment to go after the call")
    assert zmesh.get(reader.checksum_kept.remote(), timeout=30) == float(array[::4096].sum())
    zmesh.kill(reader)


def test_the_same_value_put_freed_and_put_again(local: None) -> None:
    for round_ in range(3):
        ref = zmesh.put(np.full(2 * MiB, round_, dtype=np.uint8))
        assert int(zmesh.get(ref, timeout=30)[0]) == round_
        del ref
        wait_for(lambda: not _segments(), timeout=10, what="the segment to go")


def test_a_put_larger_than_the_store_names_both_sizes() -> None:
    zmesh.init(num_cpus=2, object_store_memory=8 * MiB)
    with pytest.raises(ObjectStoreFullError) as info:
        zmesh.put(np.zeros(10 * MiB, dtype=np.uint8))
    assert "10.0 MiB" in str(info.value) and "8.0 MiB" in str(info.value)
    first = zmesh.put(np.zeros(5 * MiB, dtype=np.uint8))
    with pytest.raises(ObjectStoreFullError, match="is full"):
        zmesh.put(np.zeros(5 * MiB, dtype=np.uint8))
    # Too large as an argument: refused at the call, nothing sent.
    with pytest.raises(ObjectStoreFullError):
        total.remote(np.zeros(5 * MiB, dtype=np.uint8))
    del first
    wait_for(lambda: not _segments(), timeout=10, what="the first value's segment to go")
    second = zmesh.put(np.zeros(5 * MiB, dtype=np.uint8))
    # A result too large for the store fails its get with the store's error, at once: no hang, no crash.
    with pytest.raises(ObjectStoreFullError):
        zmesh.get(make_array.remote(9 * MiB), timeout=30)
    del second
    assert zmesh.get(total.remote(np.ones(1000, dtype=np.uint8)), timeout=30) == 1000
    zmesh.shutdown()


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    size=st.one_of(
        st.integers(MiB - 4096, MiB + 4096),  # the store's threshold, head and buffers counted together
        st.integers(60 * 1024, 70 * 1024),  # the out-of-band frame threshold
        st.integers(1, 3 * MiB),
    ),
    kind=st.sampled_from(["numpy", "bytes", "bytearray", "strided", "str"]),
)
def test_values_round_trip_on_both_sides_of_the_store_threshold(size: int, kind: str) -> None:
    if not zmesh.is_initialized():
        zmesh.init(num_cpus=2)
    value: Any = {
        "numpy": lambda: np.arange(size, dtype=np.uint8),
        "bytes": lambda: os.urandom(size),
        "bytearray": lambda: bytearray(os.urandom(size)),
        "strided": lambda: np.arange(2 * size, dtype=np.uint8)[::2],  # not contiguous: pickled in-band, one copy
        "str": lambda: "z" * size,
    }[kind]()
    ref = zmesh.put(value)
    reader = _reader()
    for got in (
        zmesh.get(ref, timeout=30),
        zmesh.get(reader.echo.remote(ref), timeout=30),
        zmesh.get(reader.echo.remote(value), timeout=30),
    ):
        if isinstance(value, np.ndarray):
            assert np.array_equal(got, value)
        elif isinstance(value, str):
            assert got == value
        else:
            assert bytes(got) == bytes(value)
    del ref, got
    wait_for(lambda: not _segments(), timeout=10, what="every segment to go")


_readers: dict[int, Any] = {}


def _reader() -> Any:
    # One actor for all of hypothesis's examples in a runtime: creating one per example would dominate the test.
    from zmesh import runtime

    key = id(runtime.current())
    if key not in _readers:
        _readers.clear()
        _readers[key] = Reader.remote()
    return _readers[key]


def test_a_stream_of_large_items(local: None) -> None:
    @zmesh.remote
    def chunks(n: int) -> Any:
        for i in range(n):
            yield np.full(MiB + i, i, dtype=np.uint8)

    seen = [int(zmesh.get(ref, timeout=30)[-1]) for ref in chunks.remote(6)]
    assert seen == list(range(6))
    wait_for(lambda: not _segments(), timeout=10, what="the items' segments to go")


_OWNER = """
import sys, numpy as np, zmesh
zmesh.init(address=sys.argv[1])
reader = zmesh.get_actor("reader")
ref = zmesh.put(np.full(8 << 20, 9, dtype=np.uint8))
assert zmesh.get(reader.keep_value.remote(ref), timeout=30) == 1
print("ready", flush=True)
sys.stdin.read()  # until the test kills us
"""


def test_owner_sigkilled_while_a_reader_maps_its_value(tmp_path: Path) -> None:
    """The owner's segment goes with it; the reader that maps it keeps reading (Linux keeps the pages)."""
    node = NodeProcess(str(tmp_path / "run"), "--num-cpus", "2")
    try:
        zmesh.init(address=node.address)
        reader = Reader.options(name="reader", lifetime="detached").remote()
        zmesh.get(reader.drop.remote(), timeout=30)
        owner = subprocess.Popen(
            [sys.executable, "-c", _OWNER, node.address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **node.env},
        )
        try:
            assert owner.stdout is not None and owner.stdout.readline().strip() == "ready"
            assert len(_segments()) == 1
            owner.send_signal(signal.SIGKILL)
            owner.wait(timeout=10)
        finally:
            if owner.poll() is None:
                owner.kill()
                owner.wait()
            for pipe in (owner.stdin, owner.stdout):
                if pipe is not None:
                    pipe.close()
        wait_for(lambda: not _segments(), timeout=15, what="the dead owner's segment to be unlinked")
        assert zmesh.get(reader.checksum_kept.remote(), timeout=30) == float(9 * ((8 << 20) // 4096))
        zmesh.kill(reader)
        zmesh.shutdown()
    finally:
        node.stop()


_PUTTER = """
import sys, numpy as np, zmesh
zmesh.init(address=sys.argv[1])
refs = [zmesh.put(np.ones(2 << 20, dtype=np.uint8)) for _ in range(3)]
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_sigkilled_node_s_segments_are_swept_by_the_next_node(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    node = NodeProcess(run, "--num-cpus", "1")
    putter = subprocess.Popen(
        [sys.executable, "-c", _PUTTER, node.address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **node.env},
    )
    try:
        assert putter.stdout is not None and putter.stdout.readline().strip() == "ready"
        assert len(_segments()) == 3
        os.kill(node.pid, signal.SIGKILL)
        psutil.Process(node.pid).wait(timeout=10)
        putter.kill()
        putter.wait(timeout=10)
        assert len(_segments()) == 3  # nobody cleaned up: the node died with them
    finally:
        if putter.poll() is None:
            putter.kill()
            putter.wait()
        for pipe in (putter.stdin, putter.stdout):
            if pipe is not None:
                pipe.close()
        node.stop()
    again = NodeProcess(run, "--num-cpus", "1")
    try:
        assert not _segments()
    finally:
        again.stop()


def test_a_worker_result_outlives_the_worker(local: None) -> None:
    reader = Reader.remote()
    ref = reader.make.remote(2 * MiB)
    zmesh.wait([ref], timeout=30)
    zmesh.kill(reader)
    assert int(zmesh.get(ref, timeout=30).sum()) == 14 * MiB


def test_a_garbled_descriptor_is_a_clear_error_and_the_node_lives_on(local: None) -> None:
    from zmesh.runtime import segments
    from zmesh.transport import serialization

    bad = [b"S" + serialization.dumps_header(("n", "tcp://127.0.0.1:1", "../../etc/passwd", (1,), "x"))]
    with pytest.raises(serialization.DeserializationError, match="descriptor"):
        serialization.loads_value(bad)
    with pytest.raises(ValueError):
        segments.parse(b"S" + serialization.dumps_header((1, 2, 3)))
    from zmesh import runtime

    rt = runtime.current()
    assert rt is not None
    for args in (("../x", 10, "h"), (f"zmesh.{rt.node_info['node_id']}.ok", -5, "h"), ("zmesh.ffffffffffff.x", 10, "h")):
        with pytest.raises(ValueError):
            rt.request("store_alloc", args)
    with pytest.raises(ValueError):
        rt.request("store_pull", ("zz", "tcp://127.0.0.1:1", "../../etc/passwd", 10, "h"))
    assert zmesh.get(zmesh.put(np.ones(2 * MiB, dtype=np.uint8)), timeout=30).sum() == 2 * MiB


_SECOND_DRIVER = """
import sys, zmesh
zmesh.init(address=sys.argv[1])
keeper = zmesh.get_actor("keeper")
[ref] = zmesh.get(keeper.refs.remote(), timeout=30)
print(int(zmesh.get(ref, timeout=30)[::4096].sum()), flush=True)
"""


@zmesh.remote
class Keeper:
    def __init__(self) -> None:
        self.kept: list[zmesh.ObjectRef] = []

    def keep(self, refs: list[zmesh.ObjectRef]) -> None:
        self.kept = list(refs)

    def refs(self) -> list[zmesh.ObjectRef]:
        return self.kept

    def drop(self) -> None:
        self.kept = []


def test_a_segment_lives_while_any_driver_or_actor_holds_its_ref(tmp_path: Path) -> None:
    """Driver 1 puts; an actor borrows; driver 2 borrows from the actor and reads; the segment goes with the last of them."""
    node = NodeProcess(str(tmp_path / "run"), "--num-cpus", "2")
    try:
        zmesh.init(address=node.address)
        keeper = Keeper.options(name="keeper").remote()
        ref = zmesh.put(np.full(4 * MiB, 2, dtype=np.uint8))
        zmesh.get(keeper.keep.remote([ref]), timeout=30)
        del ref
        for _ in range(2):  # the same read from a fresh driver, twice
            out = subprocess.run(
                [sys.executable, "-c", _SECOND_DRIVER, node.address],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, **node.env},
            )
            assert out.returncode == 0, out.stderr
            assert int(out.stdout.strip()) == 2 * (4 * MiB // 4096)
            assert len(_segments()) == 1  # the actor still borrows it
        zmesh.get(keeper.drop.remote(), timeout=30)
        wait_for(lambda: not _segments(), timeout=15, what="the segment to go with its last borrower")
        zmesh.kill(keeper)
        zmesh.shutdown()
    finally:
        node.stop()


class _DiesWhenPickled:
    def __reduce__(self) -> Any:
        os._exit(1)


@zmesh.remote(num_returns=2, max_retries=0)
def large_then_dies() -> Any:
    """The first result goes into the store for the caller; pickling the second kills the worker before it sends either."""
    return np.ones(2 * MiB, dtype=np.uint8), _DiesWhenPickled()


def test_a_result_written_by_a_worker_that_died_before_sending_it_is_freed(local: None) -> None:
    """The torture test found it held for its caller until the caller exited: its caller never heard of it."""
    first, _ = large_then_dies.remote()
    with pytest.raises(zmesh.exceptions.WorkerCrashedError):
        zmesh.get(first, timeout=30)
    wait_for(lambda: not _segments(), timeout=20, what="the dead worker's unsent result to be freed")


def test_a_top_level_ref_to_our_own_value_travels_as_its_descriptor(local: None) -> None:
    """The worker maps the put's segment straight from the call (no fetch from us); keeping the array keeps reading it."""
    array = np.full(3 * MiB, 4, dtype=np.uint8)
    ref = zmesh.put(array)
    reader = Reader.remote()
    backed, writeable, checksum = zmesh.get(reader.inspect.remote(ref), timeout=30)
    assert backed and not writeable and checksum == float(array[::4096].sum())
    assert zmesh.get(reader.keep_value.remote(ref), timeout=30) == 1
    del ref
    wait_for(lambda: not _segments(), timeout=10, what="the put's segment to go with its last ref")
    assert zmesh.get(reader.checksum_kept.remote(), timeout=30) == float(array[::4096].sum())
    zmesh.kill(reader)


@zmesh.remote
class Summer:
    def __init__(self) -> None:
        self.kept: list[Any] = []

    def total(self, array: Any) -> int:
        return int(array.sum())

    def keep(self, array: Any) -> int:
        self.kept.append(array)  # still maps the argument's segment after the call: the caller must not reuse it
        return int(array.sum())

    def kept_totals(self) -> list[int]:
        return [int(a.sum()) for a in self.kept]


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    calls=st.lists(
        st.tuples(st.integers(MiB, 3 * MiB), st.integers(0, 9)),  # sizes across the pool's 2x fit; 1 in 10 kept
        min_size=1,
        max_size=80,  # past the pool's 64 segments
    )
)
def test_reused_argument_segments_never_change_what_a_worker_still_reads(calls: list[tuple[int, int]]) -> None:
    """Pipelined by-value arguments, some kept by the actor: the caller reuses the others' segments, never a kept one."""
    if not zmesh.is_initialized():
        zmesh.init(num_cpus=2)
    summer = Summer.remote()
    refs, kept = [], []
    for i, (size, keep) in enumerate(calls):
        fill = i % 251
        array = np.full(size, fill, dtype=np.uint8)
        if keep == 0:
            refs.append(summer.keep.remote(array))
            kept.append(size * fill)
        else:
            refs.append(summer.total.remote(array))
    assert zmesh.get(refs, timeout=60) == [size * (i % 251) for i, (size, _) in enumerate(calls)]
    # Later arguments were written into reused segments meanwhile: what the actor kept is what it was sent.
    assert zmesh.get(summer.total.remote(np.ones(2 * MiB, dtype=np.uint8)), timeout=30) == 2 * MiB
    assert zmesh.get(summer.kept_totals.remote(), timeout=30) == kept
    zmesh.kill(summer)


def test_garbage_on_a_node_s_data_socket_is_dropped_and_the_node_serves_on(tmp_path: Path) -> None:
    """Anything a peer sends to the data socket: malformed requests are dropped, bad ranges and names answered."""
    from zmesh import runtime
    from zmesh.transport import protocol, sockets

    node = NodeProcess(str(tmp_path / "run"), "--num-cpus", "1")
    try:
        zmesh.init(address=node.address)
        rt = runtime.current()
        assert rt is not None
        store = rt.node_info["store"]
        ref = zmesh.put(np.ones(2 * MiB, dtype=np.uint8))
        [name] = _segments()
        end = (shm.directory() / name).stat().st_size  # the array is the segment's last frame
        dealer, _ = sockets.dealer(rt.context, rt.security, store["data"], b"Dgarbage")
        try:
            garbage = [
                [b"\x00"],
                [b"not a header at all", b"x"],
                protocol.encode(protocol.CHUNK_GET, (1, 2)),  # too few fields
                protocol.encode(protocol.CHUNK_GET, (1, 7, 0, 10)),  # a name that is not a string
                protocol.encode(protocol.CHUNK_GET, (1, "../../etc/passwd", 0, 10)),
                protocol.encode(protocol.CHUNK_GET, (1, "zmesh.ffffffffffff.x-1", 0, 10)),  # another store's
                protocol.encode(protocol.MESH, ("swim", "x", {})),  # a type the data socket does not serve
            ]
            for frames in garbage:
                dealer.send_multipart(frames)
            answered = {
                "missing": protocol.encode(protocol.CHUNK_GET, (2, f"zmesh.{store['node_id']}.nothing-1", 0, 10)),
                "range": protocol.encode(protocol.CHUNK_GET, (3, name, 10 * MiB, 10)),
                "ok": protocol.encode(protocol.CHUNK_GET, (4, name, end - 4096, 4096)),
            }
            for frames in answered.values():
                dealer.send_multipart(frames)
            replies = {}
            for _ in answered:
                assert dealer.poll(10_000), "the data socket stopped answering"
                msg = protocol.decode(dealer.recv_multipart())
                replies[msg.header[0]] = msg
            assert "not held" in replies[2].header[2] and "bad range" in replies[3].header[2]
            assert replies[4].header[2] is None and bytes(replies[4].payload[0]) == b"\x01" * 4096
        finally:
            dealer.close(linger=0)
        status = rt.request("status")["object_store"]
        assert status["malformed_chunk_requests"] == len(garbage)
        assert int(zmesh.get(ref, timeout=30).sum()) == 2 * MiB  # the node still serves
        del ref
        zmesh.shutdown()
    finally:
        assert node.stop() == 0
