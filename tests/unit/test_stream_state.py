"""Streaming calls' pure parts: ITEM and STREAM_ACK framing, item ids, options, and the producer's pacing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zmesh.options import DEFAULT_STREAM_WINDOW, STREAMING, MethodOptions
from zmesh.runtime import calls
from zmesh.testing import wait_for
from zmesh.transport import protocol, serialization
from zmesh.transport.ids import ObjectId, item_id
from zmesh.worker import streams

pytestmark = pytest.mark.timeout(60)


def _wire(frames: list[Any]) -> protocol.Message:
    return protocol.decode([bytes(f) for f in frames])


@given(
    st.binary(min_size=1, max_size=24), st.integers(0, 2**40), st.lists(st.binary(max_size=20_000), min_size=1, max_size=5), st.booleans()
)
def test_an_item_comes_back_whole(generator: bytes, index: int, frames: list[bytes], lent: bool) -> None:
    msg = _wire(calls.item_message(generator, index, frames, lent))
    assert msg.type == protocol.ITEM
    assert calls.split_item(msg) == (generator, index, frames, lent)


@pytest.mark.parametrize(
    "header",
    [(), (b"g",), (b"g", -1, (b"x",)), ("g", 0, (b"x",)), (b"g", 0, 3), (b"g", 0, ()), (b"g", 0, (1,)), (b"g", True, (b"x",))],
)
def test_a_malformed_item_is_refused(header: tuple[Any, ...]) -> None:
    with pytest.raises(protocol.ProtocolError):
        calls.split_item(protocol.Message(protocol.ITEM, header, []))


def test_acks_come_back_whole_and_malformed_ones_are_refused() -> None:
    assert calls.split_ack(_wire(calls.ack_message(b"gen", 7))) == (b"gen", 7)
    assert calls.split_ack(_wire(calls.ack_message(b"gen", -1))) == (b"gen", -1)
    for header in [(b"gen",), ("gen", 1), (b"gen", 1.0), (b"gen", 1, 2)]:
        with pytest.raises(protocol.ProtocolError):
            calls.split_ack(protocol.Message(protocol.STREAM_ACK, header, []))


def test_a_streaming_call_entry_carries_its_window_and_plain_ones_stay_four_long() -> None:
    target = ("actor", 0)
    plain, _ = calls.call_entry((b"a",), "m", None, [b"x"])
    streaming, _ = calls.call_entry((b"b",), "g", "io", [b"y"], 16)
    assert len(plain) == 4 and len(streaming) == 5
    _, items = calls.split_calls(b"caller", _wire(calls.message(calls.CALL, [plain, streaming], [], target)))
    assert [item[5] for item in items] == [None, 16]
    for bad in (0, -1, "16", 1.5):
        entry = ((b"b",), "g", None, (b"y",), bad)
        with pytest.raises(protocol.ProtocolError):
            calls.split_calls(b"caller", _wire(calls.message(calls.CALL, [entry], [], target)))
    two_ids = ((b"b", b"c"), "g", None, (b"y",), 4)
    with pytest.raises(protocol.ProtocolError):
        calls.split_calls(b"caller", _wire(calls.message(calls.CALL, [two_ids], [], target)))


def test_item_ids_are_distinct_and_never_an_ordinary_id() -> None:
    gen = ObjectId(bytes(16))
    ids = {item_id(gen, i) for i in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 24 for i in ids)


def test_method_options_accept_streaming_and_a_window() -> None:
    opts = MethodOptions.build(num_returns="streaming", _generator_backpressure_num_objects=8)
    assert opts.num_returns == STREAMING and opts.stream_window == 8
    assert MethodOptions.build(num_returns="streaming").stream_window == DEFAULT_STREAM_WINDOW
    assert MethodOptions.build(_generator_backpressure_num_objects=-1).stream_window > 2**40
    for bad in ({"num_returns": "dynamic"}, {"_generator_backpressure_num_objects": 0}, {"_generator_backpressure_num_objects": True}):
        with pytest.raises(ValueError):
            MethodOptions.build(**bad)


def test_credit_allows_a_window_past_the_consumed_count_and_stops_on_a_negative_one() -> None:
    credit = streams.Credit(4)
    assert credit.allows(3) and not credit.allows(4)
    assert not credit.wait(4, 0.01)
    credit.grant(2)
    assert credit.allows(5) and not credit.allows(6)
    credit.grant(1)  # an older ack changes nothing
    assert credit.allows(5)
    credit.grant(-1)
    assert credit.cancelled and credit.wait(100, 0)


class _FakeRuntime:
    """What ``produce`` asks of a runtime: lending, settling borrows, and the node's word on a gone caller."""

    def __init__(self, gone: bool = False) -> None:
        self.lent: list[tuple[bytes, bytes, list[Any]]] = []
        self.gone = gone
        self.asked = 0

    def lend(self, caller: bytes, oid: bytes, refs: list[Any]) -> None:
        self.lent.append((caller, oid, refs))

    def settle_borrows(self) -> None:
        pass

    def request(self, op: str, args: tuple[Any, ...], timeout: float | None = None) -> Any:
        self.asked += 1
        return list(args[0]) if self.gone else []


def _call(sent: list[protocol.Message], window: int, wait: streams.Wait | None = None) -> streams.StreamCall:
    return streams.StreamCall(
        b"gen", b"caller", window, lambda frames: sent.append(_wire(frames)), lambda v: (serialization.dumps_value(v), []), wait
    )


def _values(sent: list[protocol.Message]) -> list[Any]:
    return [serialization.loads_value(calls.split_item(m)[2]) for m in sent]


def test_the_producer_runs_a_window_ahead_then_waits_for_acks() -> None:
    credits, sent = streams.Credits(), []
    produced = []

    def numbers() -> Iterator[int]:
        for i in range(10):
            produced.append(i)
            yield i

    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(streams.produce(numbers(), _call(sent, 3), credits, _FakeRuntime())))  # type: ignore[arg-type]
    worker.start()
    ack = protocol.Message(protocol.STREAM_ACK, (b"gen", 0), [])
    for consumed in (0, 2, 5, 7, 10):
        credits.on_ack(b"caller", ack._replace(header=(b"gen", consumed)))
        expected = min(consumed + 3, 10)
        wait_for(lambda n=expected: len(sent) == n, timeout=10)  # type: ignore[misc]
        assert len(produced) == expected  # never a value computed past the window
    worker.join(10)
    assert result == [10]
    assert _values(sent) == list(range(10))
    assert [calls.split_item(m)[1] for m in sent] == list(range(10))
    assert len(credits) == 0  # closed at the end


def test_a_stopped_stream_closes_its_generator_and_reports_what_it_sent() -> None:
    credits, sent = streams.Credits(), []
    closed = []

    def endless() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(True)

    def wait(credit: streams.Credit, index: int, timeout: float) -> bool:
        credit.grant(-1)  # the caller dropped its generator while the producer waited
        return True

    assert streams.produce(endless(), _call(sent, 2, wait), credits, _FakeRuntime()) == 2  # type: ignore[arg-type]
    assert closed == [True] and len(sent) == 2


def test_a_producer_whose_caller_is_gone_stops() -> None:
    credits, sent = streams.Credits(), []
    rt = _FakeRuntime(gone=True)
    count = streams.produce(iter(range(100)), _call(sent, 1, lambda credit, index, timeout: False), credits, rt)  # type: ignore[arg-type]
    assert count == 1 and rt.asked == 1


def test_the_generators_error_is_raised_after_the_items_before_it() -> None:
    credits, sent = streams.Credits(), []

    def failing() -> Iterator[int]:
        yield 1
        raise ValueError("mid-stream")

    with pytest.raises(ValueError, match="mid-stream"):
        streams.produce(failing(), _call(sent, 8), credits, _FakeRuntime())  # type: ignore[arg-type]
    assert _values(sent) == [1]
    assert len(credits) == 0
