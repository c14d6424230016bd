"""The processes connected to a node: their hellos, and a pidfd each to learn at once when one exits.

A client (driver, worker, or a one-shot admin) opens with a JSON hello. A compatible
one of our cluster becomes a session; its pidfd joins the node's poller, so an exit
that never said goodbye (SIGKILL) is known on the next loop round. What a client's
exit does to actors is the node's business, not this module's.
"""

from __future__ import annotations

import os
import select
from typing import Any

import zmq

from zmesh.node.core.records import Client
from zmesh.transport import protocol
from zmesh.transport.ids import ClientId


class Sessions:
    def __init__(self, poller: zmq.Poller, fingerprint: str | None) -> None:
        self._poller = poller
        self._fingerprint = fingerprint  # of the cluster key; None on an insecure node
        self.by_id: dict[ClientId, Client] = {}
        self._by_fd: dict[int, ClientId] = {}

    def refusal(self, hello: dict[str, Any]) -> str | None:
        """Why a hello is refused (another protocol, Python or cluster), or None."""
        problem = protocol.incompatibility(hello)
        if problem is None and self._fingerprint is not None and hello.get("cluster") != self._fingerprint:
            problem = "it belongs to another cluster"
        return problem

    def open(self, identity: bytes, hello: dict[str, Any]) -> Client:
        """The session of an accepted hello (replacing one of the same id); ProtocolError if its fields are wrong."""
        pid, address = hello.get("pid"), hello.get("address")
        if hello.get("client_id") != identity.hex() or not isinstance(pid, int) or not isinstance(address, str):
            raise protocol.ProtocolError("a hello whose fields do not match its sender")
        old = self.by_id.pop(ClientId(identity), None)
        if old is not None:
            self._forget_pidfd(old)
        client = Client(ClientId(identity), str(hello.get("kind")), pid, address)
        try:
            client.pidfd = os.pidfd_open(client.pid)
        except OSError:
            client.pidfd = None  # not our host's pid namespace: rely on its goodbye
        if client.pidfd is not None:
            self._by_fd[client.pidfd] = client.client_id
            self._poller.register(client.pidfd, zmq.POLLIN)
        self.by_id[client.client_id] = client
        return client

    def exited(self, fd: Any) -> ClientId | None:
        """The client whose pidfd ``fd`` is, if it has exited; None for another descriptor.

        A poll's events can be stale: a client that said goodbye earlier in the same loop round
        had its pidfd closed, and a client that said hello after it may have got the same number.
        Only a pidfd that is readable now tells of an exit.
        """
        client_id = self._by_fd.get(fd) if isinstance(fd, int) else None
        if client_id is None or not select.select([fd], [], [], 0)[0]:
            return None
        return client_id

    def close(self, client_id: ClientId) -> Client | None:
        """End a session; returns it, or None if there was none."""
        client = self.by_id.pop(client_id, None)
        if client is not None:
            self._forget_pidfd(client)
        return client

    def close_all(self) -> None:
        for client in self.by_id.values():
            if client.pidfd is not None:
                os.close(client.pidfd)
                client.pidfd = None

    def _forget_pidfd(self, client: Client) -> None:
        if client.pidfd is not None:
            self._poller.unregister(client.pidfd)
            self._by_fd.pop(client.pidfd, None)
            os.close(client.pidfd)
            client.pidfd = None
