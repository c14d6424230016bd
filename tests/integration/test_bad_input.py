"""Bad input gives a clear error at the call site, and nothing is lost: actors and nodes keep serving."""

from __future__ import annotations

import inspect
import json
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import zmq
from conftest import pid_alive
from hypothesis import given
from hypothesis import strategies as st

import zmesh
import zmesh.actor
from zmesh.exceptions import TaskError
from zmesh.testing import NodeProcess
from zmesh.transport import protocol, serialization, sockets
from zmesh.transport.security import Security, resolve_key


@zmesh.remote
class Counter:
    def __init__(self, start: int = 0) -> None:
        self.value = start

    def add(self, amount: int) -> int:
        self.value += amount
        return self.value

    def get(self) -> int:
        return self.value

    def pair(self, first: Any, second: Any = None) -> tuple[Any, Any]:
        return first, second


class CustomError(Exception):
    """A user exception class defined in the test module."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class PairError(Exception):
    """A user exception whose constructor needs two arguments."""

    def __init__(self, left: int, right: int) -> None:
        super().__init__(left, right)
        self.right = right


@zmesh.remote
class Faulty:
    def __init__(self) -> None:
        self.calls = 0

    def bump(self) -> int:
        self.calls += 1
        return self.calls

    def fail_with_value_error(self, text: str) -> None:
        self.calls += 1
        raise ValueError(text)


@zmesh.remote
class FaultyCustom:
    """Refers to ``CustomError``, a class of this test module, which workers must be able to load."""

    def __init__(self) -> None:
        self.calls = 0

    def bump(self) -> int:
        self.calls += 1
        return self.calls

    def fail_with_custom_error(self, code: int) -> None:
        self.calls += 1
        raise CustomError("custom failure", code)

    def fail_with_pair_error(self) -> None:
        raise PairError(1, 2)


# ---------------------------------------------------------------------------- call arguments


def test_unpicklable_argument_raises_type_error_naming_it(local: None) -> None:
    counter = Counter.remote()
    assert zmesh.get(counter.add.remote(1), timeout=30) == 1
    with pytest.raises(TypeError, match=r"argument 0\b") as info:
        counter.pair.remote(threading.Lock())
    assert "lock" in str(info.value).lower()
    with pytest.raises(TypeError, match=r"argument 1\b"):
        counter.pair.remote(1, threading.Lock())
    with pytest.raises(TypeError, match=r"keyword argument 'second'"):
        counter.pair.remote(1, second=threading.Lock())
    with pytest.raises(TypeError, match=r"argument 0\b"):
        Counter.remote(threading.Lock())
    # Nothing half-sent: the actor saw none of the failed calls and keeps working.
    assert zmesh.get(counter.add.remote(1), timeout=30) == 2
    assert zmesh.get(counter.pair.remote("a", second="b"), timeout=30) == ("a", "b")


def test_wrong_method_arguments_raise_type_error_at_remote(local: None) -> None:
    counter = Counter.remote(5)
    with pytest.raises(TypeError, match=r"Counter\.add\.remote\(\)"):
        counter.add.remote()
    with pytest.raises(TypeError, match=r"Counter\.add\.remote\(\)"):
        counter.add.remote(1, 2)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'nope'"):
        counter.add.remote(1, nope=1)
    assert zmesh.get(counter.get.remote(), timeout=30) == 5


_KINDS = [
    inspect.Parameter.POSITIONAL_ONLY,
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    inspect.Parameter.VAR_POSITIONAL,
    inspect.Parameter.KEYWORD_ONLY,
    inspect.Parameter.VAR_KEYWORD,
]


@st.composite
def signatures(draw: st.DrawFn) -> inspect.Signature:
    """Valid signatures: parameters in kind order, at most one of each var kind, defaults only at the end of positionals."""
    kinds = sorted(draw(st.lists(st.sampled_from(_KINDS), max_size=6)))
    params: list[inspect.Parameter] = []
    defaulted = False
    for i, kind in enumerate(kinds):
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) and any(p.kind == kind for p in params):
            continue
        positional = kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        default = inspect.Parameter.empty
        variadic = kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        if not variadic and ((defaulted and positional) or draw(st.booleans())):
            default = None
            defaulted = defaulted or positional
        params.append(inspect.Parameter(f"p{i}", kind, default=default))
    return inspect.Signature(params)


@given(signatures(), st.integers(0, 8), st.lists(st.sampled_from(["p0", "p1", "p3", "other"]), max_size=2, unique=True))
def test_remote_checks_arguments_exactly_as_signature_bind(sig: inspect.Signature, n_args: int, keywords: list[str]) -> None:
    """The call path's cheap count check accepts exactly what ``Signature.bind`` accepts."""
    handle = zmesh.actor.ActorHandle("a" * 32, "C", b"", {"methods": {}, "max_task_retries": 0})
    method = zmesh.actor.ActorMethod(handle, "m", 1, None, sig)
    args, kwargs = tuple(range(n_args)), dict.fromkeys(keywords, 0)
    try:
        sig.bind(*args, **kwargs)
        binds = True
    except TypeError:
        binds = False
    arity = method._arity
    fast_accepts = not kwargs and arity is not None and arity[0] <= n_args <= arity[1]
    assert not fast_accepts or binds  # the fast path never lets through what bind refuses


def test_wrong_constructor_arguments_raise_type_error_at_remote(local: None) -> None:
    with pytest.raises(TypeError, match=r"Counter\.remote\(\)"):
        Counter.remote(1, 2)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'stop'"):
        Counter.remote(1, stop=3)
    assert zmesh.get(Counter.remote(start=3).get.remote(), timeout=30) == 3


def test_unknown_method_raises_attribute_error_naming_it(local: None) -> None:
    counter = Counter.remote()
    with pytest.raises(AttributeError, match="no_such_method"):
        counter.no_such_method.remote()
    assert zmesh.get(counter.add.remote(2), timeout=30) == 2


def test_calling_actor_class_or_method_directly_is_a_type_error(local: None) -> None:
    with pytest.raises(TypeError, match=r"Counter\.remote\(\)"):
        Counter()
    counter = Counter.remote()
    with pytest.raises(TypeError, match=r"add\.remote\(\)"):
        counter.add(1)


# ---------------------------------------------------------------------------- options

BAD_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"num_cpus": -1}, "num_cpus"),
    ({"num_gpus": -0.5}, "num_gpus"),
    ({"num_cpus": "two"}, "num_cpus"),
    ({"num_cpus": float("nan")}, "num_cpus"),
    ({"lifetime": "forever"}, "lifetime"),
    ({"name": ""}, "name"),
    ({"name": 42}, "name"),
    ({"name": "x" * 1000}, "name"),
    ({"nmae": "typo"}, "nmae"),
    ({"max_concurrency": 0}, "max_concurrency"),
    ({"max_concurrency": -3}, "max_concurrency"),
    ({"get_if_exists": True}, "get_if_exists"),
    ({"concurrency_groups": {"io": 0}}, "concurrency_groups"),
    ({"concurrency_groups": ["io"]}, "concurrency_groups"),
    ({"concurrency_groups": {"": 2}}, "concurrency group"),
    ({"max_restarts": -2}, "max_restarts"),
    ({"resources": {"CPU": 1}}, "resources"),
]


@pytest.mark.parametrize(("options", "named"), BAD_OPTIONS, ids=[repr(o)[:40] for o, _ in BAD_OPTIONS])
def test_bad_option_raises_value_error_naming_it(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Counter.options(**options)
    with pytest.raises(ValueError, match=named):
        zmesh.remote(**options)
    # No process was started or connected for a bad option.
    assert not zmesh.is_initialized()


def test_bad_method_option_raises_value_error(local: None) -> None:
    with pytest.raises(ValueError, match="num_returns"):
        zmesh.method(num_returns=0)
    with pytest.raises(ValueError, match="concurrency_group"):
        zmesh.method(concurrency_group="")
    counter = Counter.remote()
    with pytest.raises(ValueError, match=r"unknown method option.*retries"):
        counter.add.options(retries=1)
    with pytest.raises(ValueError, match="num_returns"):
        counter.add.options(num_returns=-1)
    assert zmesh.get(counter.add.options().remote(3), timeout=30) == 3


def test_good_options_still_work(local: None) -> None:
    counter = Counter.options(name="ok", max_concurrency=2, concurrency_groups={"io": 2}, num_cpus=0.5).remote(1)
    assert zmesh.get(counter.add.remote(1), timeout=30) == 2


def test_remote_on_a_function_makes_a_remote_function_and_bad_targets_are_type_errors() -> None:
    def plain(x: int) -> int:
        return x

    assert isinstance(zmesh.remote(plain), zmesh.RemoteFunction)
    assert isinstance(zmesh.remote(num_cpus=1)(plain), zmesh.RemoteFunction)
    with pytest.raises(TypeError, match="cannot be called directly"):
        zmesh.remote(plain)(1)
    with pytest.raises(TypeError, match="expects a class or a function"):
        zmesh.remote(42)
    # An option of the other kind is named at the decorator.
    with pytest.raises(ValueError, match="max_retries"):
        zmesh.remote(max_retries=2)(Counter._cls if hasattr(Counter, "_cls") else type("C", (), {}))
    with pytest.raises(ValueError, match="lifetime"):
        zmesh.remote(lifetime="detached")(plain)


# ---------------------------------------------------------------------------- API functions


def test_api_functions_reject_bad_arguments(local: None) -> None:
    ref = zmesh.put(1)
    with pytest.raises(TypeError, match="ObjectRef"):
        zmesh.get(1, timeout=30)
    with pytest.raises(TypeError, match=r"item 1 is int"):
        zmesh.get([ref, 2], timeout=30)
    with pytest.raises(ValueError, match="timeout"):
        zmesh.get(ref, timeout=-1)
    with pytest.raises(ValueError, match="num_returns"):
        zmesh.wait([ref], num_returns=2, timeout=30)
    with pytest.raises(ValueError, match="num_returns"):
        zmesh.wait([ref], num_returns=-1, timeout=30)
    with pytest.raises(TypeError, match="list"):
        zmesh.wait(ref, timeout=30)
    with pytest.raises(TypeError, match="ObjectRef"):
        zmesh.put(ref)
    with pytest.raises(TypeError, match="actor handle"):
        zmesh.kill("not a handle")
    with pytest.raises(ValueError, match="actor name"):
        zmesh.get_actor("")
    # The good calls still work after all that.
    assert zmesh.get(ref, timeout=5) == 1
    assert zmesh.wait([ref], num_returns=1, timeout=5) == ([ref], [])


# ---------------------------------------------------------------------------- errors raised by actor methods


def test_exception_in_method_reaches_caller_as_task_error_of_user_class(local: None) -> None:
    actor = Faulty.remote()
    assert zmesh.get(actor.bump.remote(), timeout=30) == 1
    ref = actor.fail_with_value_error.remote("bad value 17")
    with pytest.raises(ValueError, match="bad value 17") as info:
        zmesh.get(ref, timeout=10)
    err = info.value
    assert isinstance(err, TaskError)
    assert isinstance(err, zmesh.exceptions.ZmeshError)
    assert "fail_with_value_error" in err.remote_traceback
    assert "fail_with_value_error" in str(err)
    # The actor kept its state and keeps serving.
    assert zmesh.get(actor.bump.remote(), timeout=30) == 3


def test_custom_exception_class_from_test_module(local: None) -> None:
    actor = FaultyCustom.remote()
    assert zmesh.get(actor.bump.remote(), timeout=30) == 1
    try:
        zmesh.get(actor.fail_with_custom_error.remote(7), timeout=10)
    except CustomError as exc:
        assert isinstance(exc, TaskError)
        assert "fail_with_custom_error" in exc.remote_traceback
        assert "custom failure" in str(exc)
    else:
        raise AssertionError("no error raised")
    assert zmesh.get(actor.bump.remote(), timeout=30) == 3


def test_custom_exception_keeps_its_attributes_and_class(local: None) -> None:
    actor = FaultyCustom.remote()
    with pytest.raises(CustomError) as info:
        zmesh.get(actor.fail_with_custom_error.remote(7), timeout=10)
    assert info.value.code == 7
    with pytest.raises(PairError) as pair:
        zmesh.get(actor.fail_with_pair_error.remote(), timeout=10)
    assert isinstance(pair.value, TaskError)
    assert pair.value.right == 2


def test_exception_class_defined_inside_test(local: None) -> None:
    class LocalError(KeyError):
        pass

    @zmesh.remote
    class Raiser:
        def boom(self) -> None:
            raise LocalError("inner")

        def ok(self) -> str:
            return "ok"

    raiser = Raiser.remote()
    with pytest.raises(KeyError) as info:
        zmesh.get(raiser.boom.remote(), timeout=10)
    assert isinstance(info.value, TaskError)
    assert "boom" in info.value.remote_traceback
    assert zmesh.get(raiser.ok.remote(), timeout=30) == "ok"


# ---------------------------------------------------------------------------- garbage on the sockets


@contextmanager
def raw_dealer(address: str) -> Iterator[zmq.Socket]:
    """A bare DEALER connected to a zmesh ROUTER, speaking no protocol of its own."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # A member of the cluster (it holds the key) that sends garbage: the worst a peer can get past the handshake.
    Security(resolve_key()[0]).client(sock)
    sock.connect(address if address.startswith("tcp://") else "tcp://" + address)
    try:
        yield sock
    finally:
        ctx.destroy(linger=0)


def replies_until(sock: zmq.Socket, last: Callable[[protocol.Message], bool], timeout: float = 10) -> list[protocol.Message]:
    """Every message received up to and including the first for which ``last`` is true."""
    got: list[protocol.Message] = []
    while True:
        assert sock.poll(int(timeout * 1000), zmq.POLLIN), f"no answer within {timeout} s; got {[m.type for m in got]}"
        frames = sock.recv_multipart()
        refused = protocol.decode_json(frames, protocol.REFUSED_TAG)
        if refused is not None:  # the node's answer to a malformed hello
            assert "refuses" in refused["reason"]
            continue
        msg = protocol.decode(frames)
        got.append(msg)
        if last(msg):
            return got


HUGE = 4 * 1024 * 1024
UNPICKLABLE = b"\x80\x05not a pickle at all"

V = bytes([protocol.PROTOCOL_VERSION])

# Plain noise, wrong versions and types, headers that do not decode or have the wrong shape,
# headers that name a class (a pickle that would run code), malformed hellos, huge frames.
GARBAGE: list[list[bytes]] = [
    [os.urandom(64)],  # a single random frame
    [b""],  # an empty frame
    [b"", b""],
    [b"", b"", b""],
    [os.urandom(3), os.urandom(50), os.urandom(7)],
    [b"\xff", pickle.dumps(())],  # an unknown type byte
    [V + b"\xff" + pickle.dumps(())],
    [b"\x63" + protocol.REQUEST + pickle.dumps((1, "status", ()))],  # another protocol version
    [b"ZZZZ", pickle.dumps((1, 2))],
    [V + protocol.REQUEST + UNPICKLABLE],  # a valid type with an undecodable header
    [V + protocol.REQUEST + pickle.dumps("not a tuple")],
    [V + protocol.REQUEST + pickle.dumps((1, "status", ()), protocol=5).replace(b"status", b"st\x00tus")],
    [V + protocol.REQUEST + pickle.dumps((1, "status", (os.system,)))],  # a header naming a function
    [protocol.HELLO_TAG, b"not json"],
    [protocol.HELLO_TAG, b'["a list"]'],
    [protocol.HELLO_TAG, b'{"protocol": 1}'],  # a hello missing its fields
    [V + protocol.GET_OBJECT + pickle.dumps(())],
    [V + protocol.LOG + pickle.dumps(("x", "stdout"))],
    [V + protocol.RESULT + pickle.dumps((1,)), b"junk"],
    [V + protocol.CALL + pickle.dumps((1,))],  # CALL headers of the wrong shape
    [V + protocol.CALL + pickle.dumps(((None, "add", None, 0),))],
    [V + protocol.CALL + pickle.dumps((("x", "add", None, 5),))],
    [os.urandom(HUGE)],  # huge frames
    [V + protocol.REQUEST + os.urandom(HUGE)],
    [V + protocol.GOODBYE + pickle.dumps((b"12345678",)), os.urandom(HUGE)],
]


def zmesh_status_json() -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "zmesh", "status", "--json"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    status: dict[str, Any] = json.loads(out.stdout)
    return status


def test_garbage_to_node_is_dropped_and_node_keeps_serving(driver: NodeProcess) -> None:
    counter = Counter.remote(100)
    assert zmesh.get(counter.add.remote(1), timeout=10) == 101
    with raw_dealer(driver.address) as sock:
        for frames in GARBAGE:
            sock.send_multipart(frames)
        # A REQUEST before HELLO is refused, not served. Its answer also shows that everything sent before it on
        # this connection (delivered in order) has been handled.
        sock.send_multipart(protocol.encode(protocol.REQUEST, (77, "status", ())))
        replies = replies_until(sock, lambda msg: msg.type == protocol.REPLY and msg.header[0] == 77)
        _req_id, ok, value = replies[-1].header
        assert ok is False
        assert "hello" in str(value).lower()
    assert driver.proc.poll() is None and pid_alive(driver.pid)
    assert zmesh.get(counter.add.remote(1), timeout=10) == 102
    assert zmesh.get(Counter.remote(7).get.remote(), timeout=10) == 7
    assert zmesh_status_json()["dropped_messages"] >= 5


def probe_call(sock: zmq.Socket, actor: Any, method: str, *args: Any) -> Any:
    """Send one well-formed CALL to ``actor`` (incarnation 0) as the runtime encodes it, and return the value of its RESULT."""
    oid = os.urandom(16)
    slot, arg_frames = protocol.pack(serialization.dumps_args(args, {}))
    sock.send_multipart(protocol.encode(protocol.CALL, (actor._zmesh_actor_id, 0, ((oid,), method, None, slot)), arg_frames))
    msg = replies_until(sock, lambda m: m.type == protocol.RESULT and any(oid in h[0] for h in m.header))[-1]
    pos = 0
    for oids, ok, counts, result_slot in msg.header:
        frames, pos = protocol.unpack(result_slot, msg.payload, pos)
        if oid in oids:
            value = serialization.loads_value(frames[: counts[0]])
            if not ok:
                raise value
            return value
    raise AssertionError("unreachable")


def actor_address(handle: Any) -> str:
    rt = zmesh.runtime.current()
    assert rt is not None
    address = rt.actor_calls._actors[handle._zmesh_actor_id].address
    assert address is not None
    return sockets.endpoints(address)[0]  # the TCP endpoint: what a peer on another host would reach


@zmesh.remote
class AsyncCounter:
    def __init__(self, start: int = 0) -> None:
        self.value = start

    async def add(self, amount: int) -> int:
        self.value += amount
        return self.value


ACTOR_KINDS: dict[str, dict[str, Any]] = {
    "async": {},
    "sequential": {},
    "threaded": {"max_concurrency": 2},
    "groups": {"concurrency_groups": {"io": 1}},
}


@pytest.mark.parametrize("kind", sorted(ACTOR_KINDS))
def test_garbage_to_actor_worker_is_dropped_and_actor_keeps_serving(driver: NodeProcess, kind: str) -> None:
    cls = AsyncCounter if kind == "async" else Counter
    counter = cls.options(**ACTOR_KINDS[kind]).remote(0)
    assert zmesh.get(counter.add.remote(1), timeout=10) == 1
    worker_pid = actor_pid(counter)
    with raw_dealer(actor_address(counter)) as sock:
        for frames in GARBAGE:
            sock.send_multipart(frames)
        # A well-formed call after the garbage is answered: the worker handled everything before it and lives.
        assert probe_call(sock, counter, "add", 10) == 11
    assert pid_alive(worker_pid)
    assert zmesh.get([counter.add.remote(1) for _ in range(5)], timeout=10) == [12, 13, 14, 15, 16]
    assert actor_pid(counter) == worker_pid
    assert driver.proc.poll() is None


def test_call_with_garbage_arguments_gets_an_error_result(driver: NodeProcess) -> None:
    counter = Counter.remote(0)
    assert zmesh.get(counter.add.remote(1), timeout=10) == 1
    with raw_dealer(actor_address(counter)) as sock:
        oid = os.urandom(16)
        sock.send_multipart(protocol.encode(protocol.CALL, (counter._zmesh_actor_id, 0, ((oid,), "add", None, 1)), [UNPICKLABLE]))
        header = replies_until(sock, lambda m: m.type == protocol.RESULT)[-1].header
        assert header[0][0] == (oid,) and header[0][1] is False
        with pytest.raises(AttributeError, match="no_such_method"):
            probe_call(sock, counter, "no_such_method")
    assert zmesh.get(counter.add.remote(1), timeout=10) == 2


def actor_pid(handle: Any) -> int:
    status: dict[str, Any] = zmesh.api._status()
    pids = [a["pid"] for a in status["actors"] if a["actor_id"] == handle._zmesh_actor_id]
    assert pids and pids[0], status
    return int(pids[0])
