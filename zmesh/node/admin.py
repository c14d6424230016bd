"""One request to a node without a runtime: for harnesses and tools that only look (status, members)."""

from __future__ import annotations

import os
from typing import Any

import zmq

from zmesh.transport import protocol, sockets
from zmesh.transport.security import Security


class AdminError(Exception):
    """The node did not answer, refused us, or answered with an error."""


def request(address: str, op: str, args: tuple[Any, ...] = (), *, security: Security, timeout: float = 5.0) -> Any:
    """Say hello to the node at ``address``, send one request, return its value (a fresh socket each time)."""
    ctx = sockets.new_context()
    client_id = os.urandom(8)
    sock, _ = sockets.dealer(ctx, security, address, client_id)
    try:
        hello = {
            **protocol.identity(),
            "client_id": client_id.hex(),
            "kind": "admin",
            "pid": os.getpid(),
            "address": f"admin:{client_id.hex()}",
            "cluster": security.key.fingerprint if security.key is not None else None,
        }
        sock.send_multipart(protocol.encode_json(protocol.HELLO_TAG, hello))
        welcome = _receive(sock, timeout, address)
        if protocol.decode_json(welcome, protocol.WELCOME_TAG) is None:
            refused = protocol.decode_json(welcome, protocol.REFUSED_TAG) or {}
            raise AdminError(f"the node at {address} refused us: {refused.get('reason', 'no reason given')}")
        sock.send_multipart(protocol.encode(protocol.REQUEST, (1, op, list(args))))
        while True:
            msg = protocol.decode(_receive(sock, timeout, address))
            if msg.type == protocol.REPLY and msg.header[0] == 1:
                break  # other messages (news) may come first
        _, ok, value = msg.header
        if not ok:
            raise AdminError(f"{value[0]}: {value[1]}")
        sock.send_multipart(protocol.encode(protocol.GOODBYE, (client_id,)))
        return value
    finally:
        sock.close(linger=100)
        ctx.term()


def _receive(sock: zmq.Socket[Any], timeout: float, address: str) -> list[Any]:
    if not sock.poll(int(timeout * 1000)):
        raise AdminError(f"no answer from the node at {address} within {timeout} s")
    return sock.recv_multipart()
