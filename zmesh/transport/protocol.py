"""The wire protocol: message types and the frame layout every zmesh process speaks.

A message is a list of frames: ``[type, header, *payload]``. ``type`` is one
byte naming the message, ``header`` is a pickled tuple whose shape is fixed per
type, and ``payload`` frames carry serialized values (see ``serialization``).
On a ROUTER socket the peer's routing id comes first. ``docs/protocol.md``
describes every message.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from zmesh.transport import serialization

PROTOCOL_VERSION = 1

# client (driver or worker runtime) -> node
HELLO = b"H"  # (version, client_id, kind, pid, address, token)
GOODBYE = b"B"  # (client_id,)
REQUEST = b"Q"  # (req_id, op, args) + payload frames
# node -> client
REPLY = b"R"  # (req_id, ok, value) ; value is an error payload when not ok
ACTOR_STATE = b"A"  # (actor_id, state, incarnation, address, error)
# caller -> worker and back
CALL = b"C"  # (object_id, method, num_returns, group, nargs) + arg frames
RESULT = b"r"  # (object_id, ok) + value frames
# borrower -> owner and back
GET_OBJECT = b"G"  # (object_id,)
OBJECT = b"O"  # (object_id, status) + value frames
# worker -> owner of the actor
LOG = b"L"  # (prefix, stream, text)

KNOWN_TYPES = frozenset(
    {
        HELLO,
        GOODBYE,
        REQUEST,
        REPLY,
        ACTOR_STATE,
        CALL,
        RESULT,
        GET_OBJECT,
        OBJECT,
        LOG,
    }
)


# Frames of one call or result this small travel inside the batch header: fewer frames, fewer sends.
_INLINE_LIMIT = 8 * 1024


def pack(frames: list[Any]) -> tuple[Any, list[Any]]:
    """``(slot, frames to append)``: small bytes frames go in the slot itself, else the slot is their count."""
    if len(frames) <= 4 and all(type(f) is bytes for f in frames) and sum(map(len, frames)) <= _INLINE_LIMIT:
        return tuple(frames), []
    return len(frames), frames


def unpack(slot: Any, payload: list[Any], pos: int) -> tuple[list[Any], int]:
    """The frames a ``pack`` slot stands for, and the payload position after them."""
    if type(slot) is tuple:
        if not all(type(f) is bytes for f in slot):
            raise ProtocolError("inline frames are not bytes")
        return list(slot), pos
    if type(slot) is not int or slot < 0 or pos + slot > len(payload):
        raise ProtocolError("frame count does not match the message")
    return payload[pos : pos + slot], pos + slot


class ProtocolError(Exception):
    """A message that does not follow the protocol; the receiver drops it."""


class Message(NamedTuple):
    type: bytes
    header: tuple[Any, ...]
    payload: list[bytes]


def encode(msg_type: bytes, header: tuple[Any, ...], payload: list[Any] | tuple[Any, ...] = ()) -> list[Any]:
    """Frames for one message: the type byte and header share the first frame."""
    return [msg_type + serialization.dumps_header(header), *payload]


def decode(frames: list[bytes]) -> Message:
    """Check and decode one message; raises ProtocolError on anything malformed."""
    if not frames or len(frames[0]) < 2:
        raise ProtocolError("message is empty or has no header")
    first = frames[0]
    msg_type = first[:1]
    if msg_type not in KNOWN_TYPES:
        raise ProtocolError(f"unknown message type {msg_type!r}")
    header = serialization.loads_header(first[1:])
    return Message(msg_type, header, frames[1:])
