"""The runtime's inbound handler tables on their own: a type is served by one handler, or refused as malformed."""

from __future__ import annotations

import pytest

from zmesh.runtime.inbound import Inbound, Table, header_len
from zmesh.transport import protocol


def _msg(kind: bytes, *header: object) -> protocol.Message:
    return protocol.Message(kind, tuple(header), [])


def test_a_registered_type_reaches_its_handler_with_its_sender() -> None:
    table: Table[str] = Table(" from a peer")
    seen: list[tuple[str, protocol.Message]] = []
    table.register(protocol.LOG, lambda sender, msg: seen.append((sender, msg)), header_len(3))
    msg = _msg(protocol.LOG, "p", "stdout", "hi")
    table.dispatch("tcp://127.0.0.1:1", msg)
    assert seen == [("tcp://127.0.0.1:1", msg)]


@pytest.mark.parametrize("msg", [_msg(protocol.OBJECT, b"x", True), _msg(protocol.LOG, "p", "stdout")], ids=["unknown", "bad shape"])
def test_an_unknown_type_or_a_wrong_header_is_a_protocol_error_naming_the_type(msg: protocol.Message) -> None:
    table: Table[str] = Table(" from a peer")
    table.register(protocol.LOG, lambda sender, m: pytest.fail("must not run"), header_len(3))
    with pytest.raises(protocol.ProtocolError, match=f"unexpected {msg.type!r} message from a peer"):
        table.dispatch("tcp://127.0.0.1:1", msg)


def test_a_type_has_one_handler_per_channel() -> None:
    inbound = Inbound()
    inbound.peer.register(protocol.LOG, lambda sender, msg: None)
    inbound.router.register(protocol.LOG, lambda sender, msg: None)  # another channel: its own table
    with pytest.raises(ValueError, match="handler already"):
        inbound.peer.register(protocol.LOG, lambda sender, msg: None)


def test_bad_messages_are_counted_and_logged_once_a_minute_per_peer(caplog: pytest.LogCaptureFixture) -> None:
    inbound = Inbound()
    for now in (0.0, 30.0, 61.0):
        inbound.drop(b"peer", protocol.ProtocolError("bad"), now)
    assert inbound.dropped == 3
    assert sum("dropped a malformed message" in r.getMessage() for r in caplog.records) == 2
