"""The call pipeline's framing on its own: batching out and splitting in meet at every frame boundary."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.runtime import calls
from zmesh.transport import protocol

INLINE = 8 * 1024  # protocol._INLINE_LIMIT: frames up to this travel inside the entry

frame_sizes = st.sampled_from([0, 1, INLINE // 4, INLINE // 4 + 1, INLINE - 1, INLINE, INLINE + 1, 64 * 1024])
frames = st.lists(frame_sizes.map(lambda n: b"f" * n), max_size=6)
oids = st.lists(st.binary(min_size=1, max_size=24), min_size=1, max_size=3).map(tuple)
call = st.tuples(st.sampled_from(["a", "b"]), oids, st.sampled_from(["echo", "go"]), st.none() | st.just("io"), frames)


TARGET = ("a1b2c3d4e5f60718", 0)


def _wire(kind: bytes, dest: Any, entries: list[tuple[Any, ...]], payload: list[Any], target: Any = None) -> list[Any]:
    """What a receiver gets: the frames as bytes, the header decoded as a peer would."""
    return [b if type(b) is bytes else bytes(b) for b in calls.message(kind, entries, payload, target)]


@settings(max_examples=200, deadline=None)
@given(st.lists(call, max_size=40))
def test_calls_batched_and_split_come_back_whole_and_in_order(items: list[Any]) -> None:
    sent: list[tuple[str, list[Any]]] = []
    batcher = calls.Batcher(lambda kind, dest, target, entries, payload: sent.append((dest, _wire(kind, dest, entries, payload, target))))
    for dest, ids, method, group, args in items:
        entry, payload = calls.call_entry(ids, method, group, args)
        batcher.add(calls.CALL, dest, entry, payload, TARGET)
    batcher.flush()
    got = []
    for dest, wire in sent:
        target, split = calls.split_calls(b"caller", protocol.decode(wire))
        assert target == TARGET
        for _, ids, method, group, args, _ in split:
            got.append((dest, ids, method, group, [bytes(f) for f in args]))
    assert got == [(d, i, m, g, a) for d, i, m, g, a in items]
    # Consecutive calls to one peer share a message: a new message starts only where the peer changes.
    assert len(sent) == sum(1 for k, item in enumerate(items) if k == 0 or item[0] != items[k - 1][0])


def test_a_batch_holds_at_most_max_batch_entries() -> None:
    sent: list[int] = []
    batcher = calls.Batcher(lambda kind, dest, target, entries, payload: sent.append(len(entries)))
    for i in range(2 * calls.MAX_BATCH + 1):
        batcher.add(calls.CALL, "a", *calls.call_entry((i.to_bytes(4, "big"),), "f", None, [b"x"]), TARGET)
    batcher.flush()
    assert sent == [calls.MAX_BATCH, calls.MAX_BATCH, 1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(oids, st.booleans(), st.data()), max_size=20))
def test_results_batched_and_split_come_back_whole(items: list[Any]) -> None:
    expected = []
    entries, payload = [], []
    for ids, ok, data in items:
        parts = [data.draw(frames) for _ in ids]
        entry, extra = calls.result_entry(ids, ok, parts)
        entries.append(entry)
        payload.extend(extra)
        expected.append((ids, ok, parts))
    if not entries:
        return
    got = calls.split_results(protocol.decode(_wire(calls.RESULT, None, entries, payload)))
    assert [(i, ok, [[bytes(f) for f in p] for p in parts]) for i, ok, parts, _ in got] == expected


@pytest.mark.parametrize(
    "entry, payload",
    [
        ("oid", []),  # not an entry
        (((b"o",), "m", None, 3), [b"x"]),  # claims more frames than there are
        (((b"o",), "m", None, 1), [b"x", b"y"]),  # a frame no entry accounts for
        (((), "m", None, 0), []),  # no result ids
        (((b"o",), 7, None, 0), []),  # method is not a string
        (((b"o",), "m", None, ("x",)), []),  # inline frames that are not bytes
    ],
)
def test_malformed_call_batches_are_refused(entry: Any, payload: list[Any]) -> None:
    with pytest.raises(protocol.ProtocolError):
        calls.split_calls(b"caller", protocol.decode(protocol.encode(protocol.CALL, (*TARGET, entry), payload)))


@pytest.mark.parametrize(
    "entry, payload",
    [
        (((b"o",), True, [2], 1), [b"x"]),  # counts say two frames, one is there
        (((b"o", b"p"), True, [1], 1), [b"x"]),  # fewer counts than ids
        (((b"o",), True, [1], 1), [b"x", b"y"]),  # a frame no entry accounts for
        (((b"o",), True, [-1], 0), []),
    ],
)
def test_malformed_result_batches_are_refused(entry: Any, payload: list[Any]) -> None:
    with pytest.raises(protocol.ProtocolError):
        calls.split_results(protocol.decode(protocol.encode(protocol.RESULT, (entry,), payload)))
