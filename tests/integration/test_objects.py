"""Objects: put/get/wait, ObjectRef semantics, refs as arguments and results, awaiting refs, classes shipped by value."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest
from conftest import run_driver

import zmesh
from zmesh.exceptions import GetTimeoutError, ObjectLostError, TaskError
from zmesh.testing import NodeProcess


@zmesh.remote
class Store:
    def __init__(self) -> None:
        self.items: list[Any] = []
        self.gate = threading.Event()

    def echo(self, value: Any) -> Any:
        return value

    def kind(self, value: Any) -> str:
        return type(value).__name__

    def append(self, value: Any) -> list[Any]:
        self.items.append(value)
        return list(self.items)

    def slow(self, value: Any, seconds: float) -> Any:
        time.sleep(seconds)
        return value

    def block(self) -> str:
        """Returns once ``release`` is called (from another thread of a threaded actor)."""
        self.gate.wait(30)
        return "released"

    def release(self) -> None:
        self.gate.set()

    def fetch_nested(self, box: Any) -> Any:
        """``box`` is a list or dict holding ObjectRefs: they arrive as refs, fetched here."""
        if isinstance(box, dict):
            return {k: (type(v).__name__, zmesh.get(v, timeout=30)) for k, v in box.items()}
        return [(type(v).__name__, zmesh.get(v, timeout=30)) for v in box]

    def call_other(self, other: Any, value: Any) -> Any:
        return zmesh.get(other.echo.remote(value), timeout=10)

    def put_nested(self, value: Any) -> list[Any]:
        return [zmesh.put(value), "plain"]

    def fail(self, text: str) -> None:
        raise ValueError(text)


# ---------------------------------------------------------------------------- put / get


VALUES: list[Any] = [
    None,
    0,
    -(2**70),
    3.5,
    "text ✓",
    b"",
    (1, "two", None),
    {"a": [1, 2, {"b": (3, 4)}], "c": {"d": None, "e": b"bytes"}},
    [list(range(100)), {"k": set(range(5))}],
    {i: str(i) for i in range(200)},
]


def test_put_get_round_trips(local: None) -> None:
    for value in VALUES:
        assert zmesh.get(zmesh.put(value), timeout=30) == value
    refs = [zmesh.put(v) for v in VALUES]
    assert zmesh.get(refs, timeout=30) == VALUES  # order kept
    assert zmesh.get(tuple(refs[:3]), timeout=30) == VALUES[:3]


def test_values_round_trip_through_an_actor(local: None) -> None:
    store = Store.remote()
    assert zmesh.get([store.echo.remote(v) for v in VALUES], timeout=10) == VALUES
    # A ref from put, passed at top level, arrives as its value.
    assert zmesh.get([store.echo.remote(zmesh.put(v)) for v in VALUES], timeout=10) == VALUES


def test_large_bytes_round_trip(local: None) -> None:
    big = os.urandom(5 * 1024 * 1024)
    assert zmesh.get(zmesh.put(big), timeout=30) == big
    store = Store.remote()
    assert zmesh.get(store.echo.remote(big), timeout=20) == big
    assert zmesh.get(store.echo.remote(zmesh.put(big)), timeout=20) == big
    assert zmesh.get(store.put_nested.remote(big), timeout=20)[0] is not None


def test_numpy_array_round_trip(local: None) -> None:
    np = pytest.importorskip("numpy")
    array = np.arange(300_000, dtype=np.float64).reshape(600, 500)
    assert np.array_equal(zmesh.get(zmesh.put(array), timeout=30), array)
    store = Store.remote()
    back = zmesh.get(store.echo.remote(array), timeout=20)
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_object_ref_is_hashable_and_equal_by_id(local: None) -> None:
    a, b = zmesh.put(1), zmesh.put(1)
    assert a != b
    assert a == a
    assert len({a, b, a}) == 2
    table = {a: "a", b: "b"}
    assert table[a] == "a"
    # A copy of the same ref (as an actor returns it) is equal and hashes the same.
    store = Store.remote()
    same = zmesh.get(store.echo.remote([a]), timeout=10)[0]
    assert same is not a
    assert same == a and hash(same) == hash(a)
    assert table[same] == "a"
    assert a.hex() == same.hex()


# ---------------------------------------------------------------------------- wait


def test_wait_splits_ready_and_not_ready_in_order(local: None) -> None:
    store = Store.options(max_concurrency=8).remote()
    fast = [zmesh.put(i) for i in range(3)]
    slow = [store.slow.remote(i, 30) for i in range(2)]
    refs = [slow[0], fast[0], fast[1], slow[1], fast[2]]
    ready, not_ready = zmesh.wait(refs, num_returns=2, timeout=10)
    assert ready == [fast[0], fast[1]]
    assert not_ready == [slow[0], slow[1], fast[2]]
    ready, not_ready = zmesh.wait(refs, num_returns=3, timeout=10)
    assert ready == fast and not_ready == slow
    # More asked for than will be ready in time: the timeout returns what is ready.
    start = time.monotonic()
    ready, not_ready = zmesh.wait(refs, num_returns=5, timeout=0.3)
    assert time.monotonic() - start < 5
    assert ready == fast and not_ready == slow
    zmesh.kill(store)


def test_wait_timeout_zero_returns_at_once(local: None) -> None:
    store = Store.options(max_concurrency=2).remote()
    zmesh.get(store.echo.remote(None), timeout=10)
    blocked = store.block.remote()
    start = time.monotonic()
    ready, not_ready = zmesh.wait([blocked], num_returns=1, timeout=0)
    assert time.monotonic() - start < 1
    assert (ready, not_ready) == ([], [blocked])
    # num_returns=0 is refused, as in Ray (it would return at once with nothing).
    with pytest.raises(ValueError, match="num_returns"):
        zmesh.wait([blocked], num_returns=0, timeout=None)
    zmesh.get(store.release.remote(), timeout=10)
    assert zmesh.wait([blocked], num_returns=1, timeout=10) == ([blocked], [])
    assert zmesh.get(blocked, timeout=30) == "released"


def test_wait_returns_when_num_returns_are_ready(local: None) -> None:
    store = Store.options(max_concurrency=4).remote()
    refs = [store.slow.remote(i, 0.05 * i) for i in range(4)]
    ready, not_ready = zmesh.wait(refs, num_returns=4, timeout=20)
    assert ready == refs and not_ready == []
    assert zmesh.get(refs, timeout=30) == [0, 1, 2, 3]


def test_get_timeout_raises_get_timeout_error(local: None) -> None:
    store = Store.options(max_concurrency=2).remote()
    ref = store.block.remote()
    start = time.monotonic()
    with pytest.raises(GetTimeoutError) as info:
        zmesh.get(ref, timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - start < 5
    with pytest.raises(TimeoutError):
        zmesh.get([zmesh.put(1), ref], timeout=0)
    zmesh.get(store.release.remote(), timeout=10)
    assert zmesh.get(ref, timeout=10) == "released"


# ---------------------------------------------------------------------------- refs as arguments


def test_top_level_ref_arrives_as_value_nested_ref_as_ref(local: None) -> None:
    store = Store.remote()
    other = Store.remote()
    put_ref = zmesh.put({"x": 1})
    assert zmesh.get(store.kind.remote(put_ref), timeout=10) == "dict"
    assert zmesh.get(store.echo.remote(value=put_ref), timeout=10) == {"x": 1}
    # A pending call's ref: the callee waits for it, then gets the value.
    pending = other.slow.remote("later", 0.3)
    assert zmesh.get(store.echo.remote(pending), timeout=10) == "later"
    # Nested refs stay refs; the actor fetches them itself (from the driver and from another actor).
    from_other = other.echo.remote([5])
    assert zmesh.get(store.fetch_nested.remote([put_ref, from_other]), timeout=10) == [("ObjectRef", {"x": 1}), ("ObjectRef", [5])]
    assert zmesh.get(store.fetch_nested.remote({"p": put_ref}), timeout=10) == {"p": ("ObjectRef", {"x": 1})}


def test_pending_ref_argument_holds_back_later_calls_in_order(local: None) -> None:
    slow_actor = Store.remote()
    recorder = Store.remote()
    first = recorder.append.remote(slow_actor.slow.remote("first", 0.5))
    second = recorder.append.remote("second")
    third = recorder.append.remote(zmesh.put("third"))
    assert zmesh.get([first, second, third], timeout=20) == [["first"], ["first", "second"], ["first", "second", "third"]]


def test_handles_passed_to_other_actors(local: None) -> None:
    a = Store.remote()
    b = Store.remote()
    assert zmesh.get(a.call_other.remote(b, "via a"), timeout=10) == "via a"
    # A handle inside a container works too, and the actor can be called from both sides.
    assert zmesh.get(b.echo.remote([a]), timeout=10)[0] == a
    assert zmesh.get(b.call_other.remote(a, 3), timeout=10) == 3


def test_ref_returned_from_actor_can_be_fetched_by_driver(local: None) -> None:
    store = Store.remote()
    inner, plain = zmesh.get(store.put_nested.remote({"made": "in actor"}), timeout=10)
    assert plain == "plain"
    assert isinstance(inner, zmesh.ObjectRef)
    assert zmesh.get(inner, timeout=10) == {"made": "in actor"}
    assert zmesh.get(inner, timeout=10) == {"made": "in actor"}
    # And it can be passed on to another actor, which gets the value.
    other = Store.remote()
    assert zmesh.get(other.echo.remote(inner), timeout=10) == {"made": "in actor"}


# ---------------------------------------------------------------------------- awaiting refs


def test_object_ref_is_awaitable_in_driver(local: None) -> None:
    store = Store.remote()

    async def main() -> list[Any]:
        one = await store.slow.remote("awaited", 0.1)
        many = await asyncio.gather(*(store.echo.remote(i) for i in range(5)))
        put = await zmesh.put("put")
        return [one, many, put]

    assert asyncio.run(asyncio.wait_for(main(), 20)) == ["awaited", [0, 1, 2, 3, 4], "put"]


def test_awaiting_an_error_ref_raises(local: None) -> None:
    store = Store.remote()

    async def main() -> None:
        await store.fail.remote("awaited failure")

    with pytest.raises(ValueError, match="awaited failure"):
        asyncio.run(asyncio.wait_for(main(), 20))


def test_async_actor_awaits_another_actors_call(local: None) -> None:
    @zmesh.remote
    class Relay:
        async def relay(self, other: Any, value: Any) -> Any:
            result = await other.slow.remote(value, 0.1)
            return ("relayed", result)

        async def relay_many(self, other: Any, n: int) -> list[Any]:
            return list(await asyncio.gather(*(other.echo.remote(i) for i in range(n))))

    relay = Relay.remote()
    store = Store.remote()
    assert zmesh.get(relay.relay.remote(store, 42), timeout=20) == ("relayed", 42)
    assert zmesh.get(relay.relay_many.remote(store, 10), timeout=20) == list(range(10))


# ---------------------------------------------------------------------------- classes shipped by value


def test_class_defined_inside_test_function(local: None) -> None:
    offset = 1000

    class Point:
        def __init__(self, x: int) -> None:
            self.x = x

    @zmesh.remote
    class Local:
        def make(self, x: int) -> Point:
            return Point(x + offset)

        def read(self, point: Point) -> int:
            return point.x

    actor = Local.remote()
    point = zmesh.get(actor.make.remote(1), timeout=10)
    assert point.x == 1001
    assert zmesh.get(actor.read.remote(Point(5)), timeout=10) == 5


MAIN_SCRIPT = """
import zmesh


class Payload:
    def __init__(self, n):
        self.n = n


@zmesh.remote
class Doubler:
    def double(self, payload):
        return Payload(payload.n * 2)


if __name__ == "__main__":
    zmesh.init(num_cpus=2)
    d = Doubler.remote()
    print("result", zmesh.get(d.double.remote(Payload(21)), timeout=20).n)
    zmesh.shutdown()
"""


def test_class_defined_in_main_script() -> None:
    result = run_driver(MAIN_SCRIPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "result 42"


# ---------------------------------------------------------------------------- errors in refs


def test_get_of_error_ref_raises_every_time(local: None) -> None:
    store = Store.remote()
    ref = store.fail.remote("once")
    for _ in range(3):
        with pytest.raises(ValueError, match="once") as info:
            zmesh.get(ref, timeout=10)
        assert isinstance(info.value, TaskError)
    with pytest.raises(ValueError, match="once"):
        zmesh.get([zmesh.put(1), ref], timeout=10)
    ready, not_ready = zmesh.wait([ref], timeout=10)
    assert ready == [ref] and not_ready == []
    assert zmesh.get(store.echo.remote("still fine"), timeout=10) == "still fine"


def test_error_in_argument_ref_propagates_to_dependent_call(local: None) -> None:
    store = Store.remote()
    other = Store.remote()
    bad = store.fail.remote("upstream")
    dependent = other.append.remote(bad)
    with pytest.raises(ValueError, match="upstream"):
        zmesh.get(dependent, timeout=10)
    # The dependent method never ran, and the actor goes on serving.
    assert zmesh.get(other.append.remote("ok"), timeout=10) == ["ok"]


def test_fetch_from_an_owner_that_exited_raises_object_lost(driver: NodeProcess) -> None:
    @zmesh.remote
    class Keeper:
        def hold(self, refs: list[zmesh.ObjectRef]) -> None:
            self.refs = refs

        def fetch(self) -> Any:
            return zmesh.get(self.refs[0], timeout=30)

    keeper = Keeper.options(name="keeper", lifetime="detached").remote()
    code = "import zmesh\nzmesh.init(address='auto')\nkeeper = zmesh.get_actor('keeper')\nzmesh.get(keeper.hold.remote([zmesh.put(123)]))\n"
    assert run_driver(code).returncode == 0
    # The owner of the value exited: the fetch fails at once instead of waiting forever.
    with pytest.raises(ObjectLostError, match="owner"):
        zmesh.get(keeper.fetch.remote(), timeout=20)
    zmesh.kill(keeper)
