"""Identifiers that travel on the wire."""

from __future__ import annotations

import os
from typing import NewType

NodeId = NewType("NodeId", str)
ClientId = NewType("ClientId", bytes)
ActorId = NewType("ActorId", str)
ObjectId = NewType("ObjectId", bytes)

# The incarnation of an actor dead for good: it outranks any real one, so no later report revives it.
FINAL_INCARNATION = 1 << 30


def new_client_id() -> ClientId:
    return ClientId(os.urandom(8))


def new_actor_id() -> ActorId:
    return ActorId(os.urandom(8).hex())


def new_node_id() -> NodeId:
    return NodeId(os.urandom(6).hex())


def item_id(generator: ObjectId, index: int) -> ObjectId:
    """The id of a streaming call's ``index``-th item: both ends derive it from the call's (generator's) id.

    Longer than any id ``new_object_id`` makes, so it never collides with one.
    """
    return ObjectId(generator + index.to_bytes(8, "big"))
