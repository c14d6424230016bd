"""A JSON-lines channel over a stream socket that never blocks either side.

The node and its zygote talk over a socketpair. Both used to write with
``sendall``: a burst of creations filled both kernel buffers and each side
blocked writing to the other. Here writes go to a buffer that is flushed only as
far as the socket takes it; the owner's loop flushes the rest when the socket
is writable again.
"""

from __future__ import annotations

import json
import socket
from typing import Any

_READ_CHUNK = 1 << 16
# A line longer than this is garbage, not a message: drop the channel rather than grow.
MAX_LINE_BYTES = 1 << 20


class ChannelClosed(Exception):
    """The other side closed the channel (or sent something that is not a line of JSON)."""


class LineChannel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._in = b""
        self._out = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def wants_write(self) -> bool:
        """Whether queued bytes wait for the socket to become writable."""
        return bool(self._out)

    def send(self, message: dict[str, Any]) -> None:
        """Queue one message and write as much as the socket takes now; never blocks."""
        self._out += json.dumps(message).encode() + b"\n"
        self.flush()

    def flush(self) -> None:
        while self._out:
            try:
                sent = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                raise ChannelClosed(str(exc)) from None
            del self._out[:sent]

    def receive(self) -> list[dict[str, Any]]:
        """The complete messages that can be read now; ChannelClosed once the peer is gone and all was read."""
        closed = False
        while True:
            try:
                data = self.sock.recv(_READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                closed = True
                break
            if not data:
                closed = True
                break
            self._in += data
            if len(data) < _READ_CHUNK:
                break
        messages = []
        while b"\n" in self._in:
            line, self._in = self._in.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError as exc:
                raise ChannelClosed(f"undecodable line: {exc}") from None
            if isinstance(message, dict):
                messages.append(message)
        if len(self._in) > MAX_LINE_BYTES:
            raise ChannelClosed("a line over the size limit")
        if closed and not messages:
            raise ChannelClosed("closed by the peer")
        return messages

    def close(self) -> None:
        self.sock.close()
