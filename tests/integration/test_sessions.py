"""The node's sessions: a pidfd event tells of an exit only while the pidfd is readable."""

from __future__ import annotations

import os
import subprocess
import sys

import zmq

from zmesh.node.sessions import Sessions
from zmesh.transport import protocol


def test_a_live_clients_pidfd_does_not_read_as_an_exit() -> None:
    """A poll event for a pidfd number closed and reused in the same loop round must not end the new client's session."""
    sessions = Sessions(zmq.Poller(), None)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        identity = os.urandom(8)
        hello = {**protocol.identity(), "client_id": identity.hex(), "kind": "worker", "pid": child.pid, "address": "ipc://x"}
        client = sessions.open(identity, hello)
        assert client.pidfd is not None
        assert sessions.exited(client.pidfd) is None  # alive: a stale event for its number is ignored
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)
        assert sessions.exited(client.pidfd) == client.client_id
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        sessions.close_all()
