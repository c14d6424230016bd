"""The node's end of the worker zygote: start it, ask it for workers, read what it reports.

The zygote (``zygote.py``) is a clean process that forks every worker. The node
talks to it over a non-blocking JSON-lines channel (``lines.py``) polled by the
node's loop: a burst of spawn requests must never block the node, nor the zygote.
What an event means for the node's actors is the node's business, not this link's.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from typing import Any

import psutil
import zmq

from zmesh.node.pool.lines import ChannelClosed, LineChannel

logger = logging.getLogger(__name__)


class ZygoteDied(Exception):
    """The zygote exited; its workers died with it (they have PDEATHSIG set)."""


class ZygoteLink:
    def __init__(self, poller: zmq.Poller) -> None:
        self._poller = poller
        self._proc: subprocess.Popen[bytes] | None = None
        self._channel: LineChannel | None = None

    def start(self) -> None:
        """Start a zygote; call from the node loop's thread, since the zygote dies with the thread that started it."""
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "zmesh.node.pool.zygote", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._channel = LineChannel(ours)
        self._poller.register(ours.fileno(), zmq.POLLIN)

    def owns(self, fd: Any) -> bool:
        """Whether a poll event on ``fd`` is the zygote's."""
        return self._channel is not None and fd == self._channel.fileno()

    def spawn(self, request: dict[str, Any]) -> None:
        """Queue a spawn request; written as far as the socket takes it now, the rest by ``before_poll``."""
        assert self._channel is not None, "the zygote link is not started"
        self._channel.send(request)

    def before_poll(self) -> None:
        """Ask for writability only while requests wait to be written (never block on the zygote)."""
        channel = self._channel
        if channel is not None:
            if channel.wants_write:
                channel.flush()
            self._poller.register(channel.fileno(), zmq.POLLIN | (zmq.POLLOUT if channel.wants_write else 0))

    def events(self) -> list[dict[str, Any]]:
        """What the zygote reported since last time; ZygoteDied when it is gone."""
        channel = self._channel
        assert channel is not None
        try:
            channel.flush()
            return channel.receive()
        except ChannelClosed:
            raise ZygoteDied() from None

    def restart(self) -> None:
        """Reap the dead zygote and start a new one."""
        logger.error("zmesh node: the worker zygote exited; starting a new one")
        self._close_channel()
        if self._proc is not None:
            self._proc.wait()
        self.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the zygote (at node shutdown); it ends its workers first, and this returns once they are all gone."""
        if self._channel is not None:
            self._poller.unregister(self._channel.fileno())
            self._channel.close()
            self._channel = None
        if self._proc is None:
            return
        try:
            children = psutil.Process(self._proc.pid).children()
        except psutil.Error:
            children = []
        self._proc.terminate()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        # Killed, it could not end them: they die with it (PDEATHSIG), a moment later.
        psutil.wait_procs(children, timeout=1.0)

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._poller.unregister(self._channel.fileno())
            self._channel.close()
            self._channel = None
