"""Security: only holders of the cluster key get in; what they send cannot crash or bypass zmesh."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils import monitor as zmq_monitor

import zmesh
from zmesh.testing import NodeProcess, wait_for
from zmesh.transport import protocol, serialization, sockets
from zmesh.transport.security import ClusterKey, Security, resolve_key

ROOT = Path(__file__).resolve().parents[2]


@zmesh.remote
class Echo:
    def echo(self, value: Any) -> Any:
        return value

    def double(self, value: int) -> int:
        return value * 2

    def make(self, size: int) -> bytes:
        return b"y" * size


class _Exploit:
    """Unpickling this creates ``path``: the proof that someone unpickled attacker bytes."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _exploit_messages(path: str) -> list[list[bytes]]:
    blob = pickle.dumps(_Exploit(path))
    v = bytes([protocol.PROTOCOL_VERSION])
    return [
        [blob],
        [v + protocol.REQUEST + blob],
        [v + protocol.CALL + blob, blob],
        [v + protocol.CALL + pickle.dumps(("a" * 16, 0, ((b"x" * 16,), "echo", None, 1))), blob],
        [protocol.HELLO_TAG, blob],
    ]


@contextmanager
def attacker(address: str, key: ClusterKey | None) -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    """A DEALER to ``address`` presenting ``key`` (None: plain, no CURVE), and a monitor of its events."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if key is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, resolve_key()[0].public)  # the server's public half is no secret
        sock.setsockopt(zmq.CURVE_PUBLICKEY, key.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, key.secret)
    monitor = sock.get_monitor_socket()
    sock.connect(address)
    try:
        yield sock, monitor
    finally:
        sock.close(linger=0)
        monitor.close(linger=0)
        ctx.destroy(linger=0)


def _wait_refused(monitor: zmq.Socket[Any], timeout: float = 15) -> int:
    """Block until the server has refused our handshake; returns the event seen."""
    refusals = {
        zmq.EVENT_HANDSHAKE_FAILED_AUTH,
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
        zmq.EVENT_DISCONNECTED,
    }
    while monitor.poll(int(timeout * 1000)):
        event = zmq_monitor.recv_monitor_message(monitor)["event"]
        if event in refusals:
            return int(event)
        assert event != zmq.EVENT_HANDSHAKE_SUCCEEDED, "a peer without the cluster key completed the handshake"
    raise AssertionError(f"the server did not refuse the handshake within {timeout} s")


@pytest.mark.parametrize("key", ["plain", "wrong key"])
def test_peer_without_the_key_is_refused_before_anything_is_unpickled(driver: NodeProcess, tmp_path: Path, key: str) -> None:
    echo = Echo.remote()
    assert zmesh.get(echo.double.remote(21), timeout=10) == 42
    rt = zmesh.runtime.current()
    assert rt is not None
    targets = {
        "node": "tcp://" + driver.address,
        "worker": sockets.endpoints(rt.actor_calls._actors[echo._zmesh_actor_id].address or "")[0],
        "driver": sockets.endpoints(rt.address)[0],
    }
    for name, address in targets.items():
        proof = tmp_path / f"pwned-{name}"
        with attacker(address, None if key == "plain" else ClusterKey.generate()) as (sock, monitor):
            for frames in _exploit_messages(str(proof)):
                sock.send_multipart(frames)
            _wait_refused(monitor)
        assert not proof.exists(), f"the {name} unpickled bytes from a peer without the key"
    # Everyone keeps serving the legitimate driver.
    assert zmesh.get(echo.double.remote(4), timeout=10) == 8
    assert zmesh.get(Echo.remote().echo.remote("still here"), timeout=10) == "still here"


def test_driver_with_another_key_is_never_admitted(node: NodeProcess, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    ClusterKey.generate().save(other)
    with pytest.raises(ConnectionError):
        zmesh.init(address=node.address, cluster_key=other, connect_timeout=2)
    assert not zmesh.is_initialized()
    zmesh.init(address=node.address)  # this user's own key: admitted
    assert zmesh.get(Echo.remote().double.remote(5), timeout=10) == 10


def test_two_nodes_sharing_a_key_serve_each_others_drivers(isolated_run_dir: Path, tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    ClusterKey.generate().save(key)
    first = NodeProcess(str(tmp_path / "run-a"), "--cluster-key", str(key))
    second = NodeProcess(str(tmp_path / "run-b"), "--cluster-key", str(key))
    try:
        # A driver of the second node uses an actor on the first, through a direct address.
        code = (
            "import zmesh\n"
            f"zmesh.init(address={first.address!r}, cluster_key={str(key)!r})\n"
            "@zmesh.remote\n"
            "class Echo:\n"
            "    def double(self, x):\n"
            "        return 2 * x\n"
            "print(zmesh.get(Echo.remote().double.remote(21)))\n"
        )
        env = {**os.environ, "ZMESH_RUN_DIR": second.run_dir}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "42"
        # Without the key, the same driver gets nowhere.
        env.pop("ZMESH_CLUSTER_KEY_FILE", None)
        bad = code.replace(f", cluster_key={str(key)!r}", ", connect_timeout=2")
        out = subprocess.run([sys.executable, "-c", bad], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode != 0
        assert "ConnectionError" in out.stderr or "NodeUnavailableError" in out.stderr
    finally:
        assert first.stop() == 0
        assert second.stop() == 0


def test_non_loopback_listen_needs_an_explicit_key(isolated_run_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "zmesh", "node", "--listen", "10.11.12.13", "--port", "0"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode != 0
    assert "zmesh keygen" in out.stderr and "--cluster-key" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "zmesh", "node", "--listen", "10.11.12.13", "--insecure", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "loopback" in out.stderr


def test_insecure_node_says_so_loudly_and_serves_loopback(isolated_run_dir: Path) -> None:
    node = NodeProcess(str(isolated_run_dir), "--insecure")
    try:
        zmesh.init(address="auto")
        assert zmesh.get(Echo.remote().double.remote(3), timeout=10) == 6
        zmesh.shutdown()
    finally:
        assert node.stop() == 0
    assert "INSECURE" in node.output


def test_keygen_writes_a_private_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    zmesh_cli = [sys.executable, "-m", "zmesh", "keygen", str(path)]
    out = subprocess.run(zmesh_cli, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    key = ClusterKey.load(path)
    assert key.secret.decode() not in out.stdout + out.stderr
    assert key.secret.decode() not in repr(key)
    again = subprocess.run(zmesh_cli, capture_output=True, text=True, timeout=30)
    assert again.returncode != 0 and "exists" in again.stderr
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        ClusterKey.load(path)


def test_no_secret_in_status_run_record_handle_or_process_arguments(driver: NodeProcess) -> None:
    key = resolve_key()[0]
    secret = key.secret.decode()
    echo = Echo.options(name="visible").remote()
    zmesh.get(echo.double.remote(1), timeout=10)
    status = subprocess.run([sys.executable, "-m", "zmesh", "status", "--json"], capture_output=True, text=True, timeout=30)
    assert status.returncode == 0
    assert secret not in status.stdout
    assert secret not in (Path(driver.run_dir) / "node.json").read_text()
    assert secret.encode() not in pickle.dumps(echo)
    for proc in driver.descendants():
        assert secret not in " ".join(proc.cmdline())
        assert secret not in " ".join(f"{k}={v}" for k, v in proc.environ().items())


def _fuzz_messages(rng: random.Random, count: int, actor_id: str) -> Iterator[list[bytes]]:
    """Random, truncated, oversized and reordered messages, built from valid ones."""
    v = bytes([protocol.PROTOCOL_VERSION])
    valid = [
        protocol.encode(protocol.CALL, (actor_id, 0, ((b"f" * 16,), "double", None, 1)), [b"P" + pickle.dumps(((1,), {}))]),
        protocol.encode(protocol.REQUEST, (7, "status", ())),
        protocol.encode(protocol.GET_OBJECT, (b"o" * 16,)),
        protocol.encode(protocol.RESULT, (((b"r" * 16,), True, [1], (b"x",)),)),
        protocol.encode(protocol.LOG, ("p", "stdout", "text")),
        protocol.encode_json(protocol.HELLO_TAG, {"protocol": 1}),
    ]
    types = [protocol.CALL, protocol.REQUEST, protocol.GET_OBJECT, protocol.RESULT, protocol.LOG, protocol.GOODBYE, b"\x00", b"Z"]
    for i in range(count):
        kind = i % 6
        base = [bytes(f) for f in rng.choice(valid)]
        if kind == 0:  # noise
            yield [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 5))]
        elif kind == 1:  # truncated
            frames = base[: rng.randrange(1, len(base) + 1)]
            frames[0] = frames[0][: rng.randrange(0, len(frames[0]) + 1)]
            yield frames
        elif kind == 2:  # reordered, with extra frames
            frames = [*base, rng.randbytes(8)]
            rng.shuffle(frames)
            yield frames
        elif kind == 3:  # a valid type with a random header
            yield [v + rng.choice(types) + rng.randbytes(rng.randrange(0, 40))]
        elif kind == 4:  # bit flips in a valid message
            frames = list(base)
            raw = bytearray(frames[0])
            for _ in range(rng.randrange(1, 4)):
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            frames[0] = bytes(raw)
            yield frames
        elif i % 600 == 5:  # oversized, now and then
            yield [v + protocol.REQUEST + rng.randbytes(17 * 2**20)]
        else:
            yield [rng.randbytes(rng.randrange(1, 3000))]


def test_fuzz_node_and_worker_while_a_driver_keeps_calling(driver: NodeProcess) -> None:
    echo = Echo.remote()
    assert zmesh.get(echo.double.remote(1), timeout=10) == 2
    rt = zmesh.runtime.current()
    assert rt is not None
    worker_address = sockets.endpoints(rt.actor_calls._actors[echo._zmesh_actor_id].address or "")[0]
    errors: list[str] = []
    stop = threading.Event()
    calls = 0

    def legitimate() -> None:
        nonlocal calls
        while not stop.is_set():
            value = calls
            try:
                got = zmesh.get(echo.double.remote(value), timeout=30)
            except Exception as exc:  # any failure of a legitimate call fails the test
                errors.append(repr(exc))
                return
            if got != 2 * value:
                errors.append(f"double({value}) returned {got}")
                return
            calls += 1

    caller = threading.Thread(target=legitimate)
    caller.start()
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        rng = random.Random(20261126)
        member = Security(resolve_key()[0])  # the fuzzer holds the key: the worst a peer can get past the handshake
        targets = []
        for address in ("tcp://" + driver.address, worker_address):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            member.client(sock)
            sock.connect(address)
            targets.append(sock)
        for n, frames in enumerate(_fuzz_messages(rng, 10_000, echo._zmesh_actor_id)):
            targets[n % 2].send_multipart(frames)
        # The node answers the fuzzer's last valid-looking request only after all before it: a barrier.
        targets[0].send_multipart(protocol.encode(protocol.REQUEST, (99, "status", ())))
        wait_for(lambda: targets[0].poll(0) and _got_reply(targets[0], 99), timeout=60, what="the node to get through the fuzz")
    finally:
        stop.set()
        caller.join(60)
        ctx.destroy(linger=0)
    assert not errors, errors
    assert calls > 0
    assert driver.proc.poll() is None
    status = zmesh_status()
    wait_for(lambda: zmesh_status()["dropped_messages"] >= 9000, timeout=30, what="the bad messages to be counted")
    assert status["actors"][0]["state"] == "ALIVE"
    assert zmesh.get(echo.double.remote(50), timeout=10) == 100


def _got_reply(sock: zmq.Socket[Any], req_id: int) -> bool:
    while sock.poll(0):
        frames = sock.recv_multipart()
        try:
            msg = protocol.decode(frames)
        except (protocol.ProtocolError, serialization.DeserializationError):
            continue
        if msg.type == protocol.REPLY and msg.header[0] == req_id:
            return True
    return False


def zmesh_status() -> dict[str, Any]:
    rt = zmesh.runtime.current()
    assert rt is not None
    status: dict[str, Any] = rt.request("status")
    return status


SECOND_USER = 65534  # nobody
# The second user needs an interpreter it may run: this one may live under root's home.
SYSTEM_PYTHON = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"no {SYSTEM_PYTHON} for the second user to run")
def test_another_local_user_cannot_call_our_actors(driver: NodeProcess) -> None:
    echo = Echo.options(name="private", lifetime="detached").remote()
    assert zmesh.get(echo.double.remote(2), timeout=10) == 4
    home = Path(tempfile.mkdtemp(prefix="zmesh-intruder-"))  # outside our private temp dirs, so it can enter it
    os.chown(home, SECOND_USER, SECOND_USER)
    own_key = resolve_key()[0].path
    code = (
        "import sys, zmesh\n"
        f"try:\n    open({own_key!r}).read()\n    print('READ THE KEY')\nexcept PermissionError:\n    print('key unreadable')\n"
        f"try:\n    zmesh.init(address={driver.address!r}, connect_timeout=3)\n"
        "    print('ADMITTED', zmesh.get(zmesh.get_actor('private').double.remote(5)))\n"
        "except ConnectionError as exc:\n    print('refused')\n"
    )
    site = next(p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p))
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "ZMESH_RUN_DIR": str(home / "run"),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{site}",
    }
    try:
        out = subprocess.run(
            [SYSTEM_PYTHON, "-c", code], capture_output=True, text=True, timeout=60, env=env, user=SECOND_USER, group=SECOND_USER, cwd=home
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert out.returncode == 0, out.stderr
    assert "key unreadable" in out.stdout
    assert "refused" in out.stdout
    assert "ADMITTED" not in out.stdout
    zmesh.kill(echo)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"protocol": 99, "python": protocol.python_version()}, "protocol"),
        ({"protocol": protocol.PROTOCOL_VERSION, "python": "3.99"}, "Python"),
    ],
)
def test_peer_of_another_version_is_refused_clearly_on_both_sides(driver: NodeProcess, fields: dict[str, Any], reason: str) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        Security(resolve_key()[0]).client(sock)
        sock.connect("tcp://" + driver.address)
        hello = {**fields, "client_id": "00" * 8, "kind": "driver", "pid": os.getpid(), "address": "tcp://127.0.0.1:1", "token": None}
        sock.send_multipart(protocol.encode_json(protocol.HELLO_TAG, hello))
        assert sock.poll(10_000), "the node did not answer the hello"
        refused = protocol.decode_json(sock.recv_multipart(), protocol.REFUSED_TAG)
        assert refused is not None and reason in refused["reason"]
    finally:
        ctx.destroy(linger=0)
    zmesh.shutdown()
    assert driver.stop() == 0
    assert "refusing a driver" in driver.output and reason in driver.output


def test_message_size_cap_is_enforced_at_the_call_site(isolated_run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A cap below the store's threshold (1 MiB): values between the two travel in messages, and are refused.
    monkeypatch.setenv("ZMESH_MAX_MESSAGE_BYTES", str(2**18))
    zmesh.init()
    echo = Echo.remote()
    with pytest.raises(ValueError, match="ZMESH_MAX_MESSAGE_BYTES"):
        echo.echo.remote(b"x" * (2**19))
    with pytest.raises(ValueError, match="ZMESH_MAX_MESSAGE_BYTES"):
        echo.echo.remote([b"y" * 200_000, b"z" * 200_000])  # one pickle stream of 400 KB
    with pytest.raises(zmesh.exceptions.TaskError, match=r"result of Echo\.make"):
        zmesh.get(echo.make.remote(2**19), timeout=10)
    assert zmesh.get(echo.echo.remote(b"x" * 1000), timeout=10) == b"x" * 1000
    # From the threshold on, a value is in shared memory and only its descriptor travels: the cap does not apply.
    assert len(zmesh.get(echo.echo.remote(b"x" * (2 * 2**20)), timeout=10)) == 2 * 2**20
