"""The wire protocol: message types and the frame layout every zmesh process speaks.

A message is a list of frames. The first frame is the protocol version (one
byte), the message type (one byte) and the header: a pickled tuple of builtin
values whose shape is fixed per type, decoded without ever importing a class.
Further frames carry serialized values (see ``serialization``). On a ROUTER
socket the peer's routing id comes first. The hello that opens a connection to
a node is JSON instead, so that peers of any version can read it and say why
they refuse each other. ``docs/protocol.md`` describes every message.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NamedTuple

from zmesh.transport import serialization

PROTOCOL_VERSION = 1
_VERSION = bytes([PROTOCOL_VERSION])
# Headers larger than this are refused before decoding (a batch of 512 inline calls fits easily).
MAX_HEADER_BYTES = 16 * 2**20

# The hello and its answers: JSON, the same in every protocol version.
HELLO_TAG = b"ZMESH-HELLO"
WELCOME_TAG = b"ZMESH-WELCOME"
REFUSED_TAG = b"ZMESH-REFUSED"

# client (driver or worker runtime) -> node
GOODBYE = b"B"  # (client_id,)
REQUEST = b"Q"  # (req_id, op, args) + payload frames
# node -> client
REPLY = b"R"  # (req_id, ok, value); value is (error kind, message) when not ok
ACTOR_STATE = b"A"  # (actor_id, state, incarnation, address, error)
PEER_GONE = b"g"  # (address,): a process this client may talk to has exited
MEMBERSHIP = b"M"  # (node_id, address, state): a member joined, is suspected, died or left (to subscribers)
# caller -> worker and back; each header is a batch of entries for one actor incarnation
CALL = b"C"  # (actor_id, incarnation, (oids, method, group, packed arg frames[, window]), ...) + arg frames
RESULT = b"r"  # ((oids, ok, frame counts, packed value frames), ...) + value frames
REFUSED = b"f"  # (actor_id, incarnation, oids, ...): calls for another actor or incarnation, not run
# caller -> leased task worker: (worker_id, 0, (oids, function key, options, packed frames), ...); answered by RESULT
TASK = b"T"
RETURNED = b"n"  # (worker_id, 0, oids, ...): tasks a worker sends back unrun, as its running task waits in get
CANCEL = b"c"  # (object_id, force): caller -> the runtime of the task worker running that task
LEASE_LOST = b"e"  # (lease_id, reason): node -> the client holding that lease (its worker or host is gone)
# a streaming call's items (worker -> caller, on the call's connection) and the caller's credit (caller -> worker)
ITEM = b"i"  # (generator oid, index, packed value frames[, lent]) + value frames
STREAM_ACK = b"k"  # (generator oid, items consumed): the producer may run a window past it; consumed < 0: stop
# borrower -> owner and back
GET_OBJECT = b"G"  # (object_id,)
OBJECT = b"O"  # (object_id, ok) + value frames
# worker -> owner of the actor
LOG = b"L"  # (prefix, stream, text)
# reference counting (see runtime/ownership.py)
BORROW = b"b"  # (object_id, borrower address): borrower -> owner
BORROWED = b"d"  # (object_id, ok): owner -> borrower
UNBORROW = b"u"  # (object_id, borrower address): borrower -> owner
RELEASE_LENT = b"l"  # (object_id,): caller -> the worker that lent it the refs inside that result
# node -> node (see node/mesh.py): one-way, always from the sender's DEALER to the receiver's ROUTER
MESH = b"m"  # (channel, sender node id, body dict) + payload frames
# node -> node, on the object store's data sockets (see node/store/transfer.py)
CHUNK_GET = b"x"  # (transfer id, segment name, offset, length): reading node -> the segment's node
CHUNK = b"X"  # (transfer id, offset, error or None) + the chunk's bytes

KNOWN_TYPES = frozenset(
    {
        GOODBYE,
        REQUEST,
        REPLY,
        ACTOR_STATE,
        PEER_GONE,
        MEMBERSHIP,
        CALL,
        RESULT,
        REFUSED,
        TASK,
        RETURNED,
        CANCEL,
        LEASE_LOST,
        ITEM,
        STREAM_ACK,
        GET_OBJECT,
        OBJECT,
        LOG,
        BORROW,
        BORROWED,
        UNBORROW,
        RELEASE_LENT,
        MESH,
        CHUNK_GET,
        CHUNK,
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
    """Frames for one message: version, type and header share the first frame."""
    return [_VERSION + msg_type + serialization.dumps_header(header), *payload]


def header_frame(msg_type: bytes, header: tuple[Any, ...]) -> bytes:
    return _VERSION + msg_type + serialization.dumps_header(header)


def decode(frames: list[Any]) -> Message:
    """Check and decode one message; raises ProtocolError on anything malformed.

    Version, type and size are checked before a byte of the header is decoded.
    """
    if not frames:
        raise ProtocolError("message is empty")
    first = frames[0]
    if type(first) is not bytes:
        # A header of 64 KiB or more arrives as a zero-copy buffer (see sockets.recv).
        if not isinstance(first, memoryview | bytearray):
            raise ProtocolError(f"header frame is a {type(first).__name__}, not bytes")
        first = bytes(first)
    if len(first) < 3:
        raise ProtocolError("message has no header")
    if first[:1] != _VERSION:
        raise ProtocolError(f"protocol version {first[0]} (this process speaks {PROTOCOL_VERSION})")
    msg_type = first[1:2]
    if msg_type not in KNOWN_TYPES:
        raise ProtocolError(f"unknown message type {msg_type!r}")
    if len(first) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(first)} bytes is over the {MAX_HEADER_BYTES} byte limit")
    header = serialization.loads_header(first[2:])
    return Message(msg_type, header, frames[1:])


# --- the hello


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def identity() -> dict[str, Any]:
    """What every hello and welcome says about its sender's software."""
    return {"protocol": PROTOCOL_VERSION, "python": python_version()}


def incompatibility(peer: dict[str, Any]) -> str | None:
    """Why a peer cannot talk to this process, or None if it can."""
    if peer.get("protocol") != PROTOCOL_VERSION:
        return f"it speaks zmesh protocol {peer.get('protocol')!r}, this process speaks {PROTOCOL_VERSION}"
    if peer.get("python") != python_version():
        return f"it runs Python {peer.get('python')!r}, this process runs Python {python_version()} (pickles differ between minor versions)"
    return None


def encode_json(tag: bytes, fields: dict[str, Any]) -> list[bytes]:
    return [tag, json.dumps(fields).encode()]


def decode_json(frames: list[Any], tag: bytes) -> dict[str, Any] | None:
    """The fields of a JSON message with ``tag``, None if ``frames`` is not one; ProtocolError if malformed."""
    if len(frames) != 2 or frames[0] != tag:
        return None
    try:
        fields = json.loads(frames[1])
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"undecodable {tag.decode()}: {exc}") from None
    if not isinstance(fields, dict):
        raise ProtocolError(f"{tag.decode()} is not a JSON object")
    return fields
