"""The node's link to the other nodes: sockets, the join handshake, and the protocol cores' I/O.

The decisions live in sans-I/O cores (``membership``, ``gossip``); this module
moves their messages, turns what arrives into their stimuli, and tells the node
what changed. Every node-to-node message is one-way, from the sender's DEALER
to the receiver's ROUTER (one DEALER per peer), as ``MESH`` with header
``(channel, sender node id, body)``: the zguide's harmony pattern, so no reply
ever depends on a connection the other side opened.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from zmesh.node.config import NodeConfig
from zmesh.node.core import membership
from zmesh.node.core.gossip import EntryChange, Gossip, GossipTimings
from zmesh.node.core.membership import Changed, Membership, MembershipTimings, Send
from zmesh.node.discovery import sources as discovery
from zmesh.transport import protocol, sockets
from zmesh.transport.security import Security

logger = logging.getLogger(__name__)

SWIM = "swim"
GOSSIP = "gossip"
JOIN = "join"
WELCOME = "welcome"
REFUSED = "refused"
REPLY = "reply"

Reply = Callable[[bool, Any, list[Any]], None]


class MeshHooks(Protocol):
    def on_member(self, change: Changed) -> None: ...

    def on_entries(self, changes: list[EntryChange]) -> None: ...

    def on_app(self, sender: str, kind: str, body: dict[str, Any], payload: list[Any], rid: int | None) -> None: ...

    def on_buried(self, incarnation: int) -> None: ...


class Mesh:
    def __init__(
        self,
        node_id: str,
        address: str,
        config: NodeConfig,
        security: Security,
        ctx: zmq.Context[Any],
        data: dict[str, Any],
        hooks: MeshHooks,
        now: float,
        sources: list[discovery.Source],
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.config = config
        self.cluster = config.cluster or "default"
        self._security = security
        self._ctx = ctx
        self._hooks = hooks
        self._sources = sources
        rng = random.Random()
        self.membership = Membership(
            node_id,
            address,
            MembershipTimings(
                probe_interval_s=config.probe_interval_s,
                probe_timeout_s=config.probe_timeout_s,
                indirect_probes=config.indirect_probes,
                suspicion_min_s=config.suspicion_min_s,
                suspicion_max_s=config.suspicion_max_s,
                lag_tolerance_s=config.lag_tolerance_s,
                tombstone_s=config.tombstone_s,
            ),
            now,
            rng,
        )
        self.gossip = Gossip(
            node_id,
            self.membership.incarnation,
            data,
            GossipTimings(fanout=config.gossip_fanout, round_s=config.gossip_round_s, sync_interval_s=config.sync_interval_s),
            now,
            rng,
        )
        self._socks: dict[str, zmq.Socket[Any]] = {}
        self._requests: dict[int, tuple[str, float, Reply]] = {}
        self._rids = itertools.count(1)
        self._next_discovery = now
        self._knocked: dict[str, float] = {}
        self.dropped = 0
        self.leaving = False

    # ------------------------------------------------------------------ sending

    def _sock(self, address: str) -> zmq.Socket[Any]:
        sock = self._socks.get(address)
        if sock is None:
            sock, _ = sockets.dealer(self._ctx, self._security, address, b"N" + self.node_id.encode())
            sock.setsockopt(zmq.LINGER, 200)
            sock.setsockopt(zmq.SNDHWM, 10_000)
            self._socks[address] = sock
        return sock

    def _send_to(self, address: str, channel: str, body: dict[str, Any], payload: list[Any] | tuple[Any, ...] = ()) -> bool:
        try:
            self._sock(address).send_multipart(
                protocol.encode(protocol.MESH, (channel, self.node_id, body), payload), zmq.NOBLOCK, copy=False
            )
            return True
        except zmq.ZMQError:
            return False  # the peer's queue is full (it is stalled or gone): membership decides which

    def address_of(self, node_id: str) -> str | None:
        if node_id == self.node_id:
            return self.address
        member = self.membership.get(node_id)
        return member.address if member is not None else None

    def send(self, node_id: str, kind: str, body: dict[str, Any], payload: list[Any] | tuple[Any, ...] = ()) -> bool:
        """An application message (a placement, a claim, an actor's state) to a live member."""
        address = self.address_of(node_id)
        return address is not None and self._send_to(address, kind, body, payload)

    def request(self, node_id: str, kind: str, body: dict[str, Any], payload: list[Any], on_reply: Reply, now: float) -> None:
        """Send and call ``on_reply(ok, value, payload)`` once: the answer, or a failure on timeout or the peer's death."""
        rid = next(self._rids)
        self._requests[rid] = (node_id, now + self.config.mesh_request_timeout_s, on_reply)
        if not self.send(node_id, kind, {**body, "_rid": rid}, payload):
            self._fail_request(rid, f"node {node_id} cannot be reached")

    def reply(self, node_id: str, rid: int, ok: bool, value: Any, payload: list[Any] | tuple[Any, ...] = ()) -> None:
        self.send(node_id, REPLY, {"_rid": rid, "ok": ok, "value": value}, payload)

    def _fail_request(self, rid: int, why: str) -> None:
        entry = self._requests.pop(rid, None)
        if entry is not None:
            entry[2](False, why, [])

    def _run(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Send):
                channel = GOSSIP if action.message.get("k") in _GOSSIP_KINDS else SWIM
                address = action.address or self.address_of(action.to)
                if address is not None:
                    self._send_to(address, channel, action.message)
            elif isinstance(action, Changed):
                self._changed(action)
            elif isinstance(action, membership.Buried):
                logger.warning("zmesh mesh: the other nodes declared this node dead (incarnation %d); rejoining", action.incarnation)
                self._hooks.on_buried(action.incarnation)

    def _changed(self, change: Changed) -> None:
        if change.state in (membership.DEAD, membership.LEFT):
            self.gossip.forget(change.node_id, change.incarnation)
            sock = self._socks.pop(change.address, None)
            if sock is not None:
                sock.close(linger=0)
            for rid, (target, _, _) in list(self._requests.items()):
                if target == change.node_id:
                    self._fail_request(rid, f"node {change.node_id} is {change.state.lower()}")
        logger.info("zmesh mesh: node %s at %s is %s", change.node_id, change.address.removeprefix("tcp://"), change.state)
        self._hooks.on_member(change)

    # ------------------------------------------------------------------ receiving

    def handle(self, header: tuple[Any, ...], payload: list[Any], now: float) -> None:
        """One MESH message from the node's ROUTER; raises ProtocolError/ValueError on a malformed one (dropped)."""
        if len(header) != 3 or not isinstance(header[0], str) or not isinstance(header[1], str) or not isinstance(header[2], dict):
            raise protocol.ProtocolError("a mesh message is not (channel, sender, body)")
        channel, sender, body = header
        if channel == JOIN:
            self._on_join(sender, body, now)
            return
        if channel == WELCOME:
            self._on_welcome(sender, body, now)
            return
        if channel == REFUSED:
            logger.warning("zmesh mesh: node %s refused us: %s", sender, str(body.get("reason"))[:200])
            return
        member = self.membership.get(sender)
        if member is None or member.state in (membership.DEAD, membership.LEFT):
            if member is not None and channel == SWIM:
                # A member we buried may be telling us that it buried us (both sides of a healed partition):
                # its rumors let us refute and rejoin. Nothing else from it counts until it rejoins.
                self._run(self.membership.receive(sender, body, now))
                self.gossip.set_incarnation(self.membership.incarnation)
            return
        self._run(self.membership.heard_from(sender, now))
        if channel == SWIM:
            self._run(self.membership.receive(sender, body, now))
            self.gossip.set_incarnation(self.membership.incarnation)
        elif channel == GOSSIP:
            sends, changes = self.gossip.receive(sender, body, now)
            self._run(list(sends))
            if changes:
                self._hooks.on_entries(changes)
        elif channel == REPLY:
            rid = body.get("_rid")
            entry = self._requests.pop(rid, None) if isinstance(rid, int) else None
            if entry is not None and entry[0] == sender:
                entry[2](bool(body.get("ok")), body.get("value"), payload)
        else:
            rid = body.pop("_rid", None)
            self._hooks.on_app(sender, channel, body, payload, rid if isinstance(rid, int) else None)

    def _hello(self) -> dict[str, Any]:
        key = self._security.key
        return {
            **protocol.identity(),
            "node_id": self.node_id,
            "address": self.address,
            "incarnation": self.membership.incarnation,
            "cluster": self.cluster,
            "fingerprint": key.fingerprint if key is not None else None,
        }

    def _refusal(self, body: dict[str, Any]) -> str | None:
        problem = protocol.incompatibility(body)
        if problem is None and body.get("cluster") != self.cluster:
            problem = f"it belongs to cluster {str(body.get('cluster'))[:64]!r}, this node to {self.cluster!r}"
        key = self._security.key
        if problem is None and body.get("fingerprint") != (key.fingerprint if key is not None else None):
            problem = "it uses another cluster key"
        return problem

    def _admit(self, sender: str, body: dict[str, Any], now: float) -> bool:
        address, incarnation = body.get("address"), body.get("incarnation")
        if (
            not isinstance(address, str)
            or not address.startswith("tcp://")
            or not isinstance(incarnation, int)
            or body.get("node_id") != sender
        ):
            raise protocol.ProtocolError("a join whose fields do not match its sender")
        problem = self._refusal(body)
        if problem is not None:
            logger.warning("zmesh mesh: refusing node %s at %s: %s", sender[:32], address[:64], problem)
            self._send_to(address, REFUSED, {"reason": f"node {self.node_id} refuses it: {problem}"})
            return False
        if sender == self.node_id:
            return True
        self._run(self.membership.add(sender, address, incarnation, now))
        member = self.membership.get(sender)
        if member is not None and member.state in (membership.DEAD, membership.LEFT):
            # We buried it at an incarnation it has not passed (a partition, a long stall): tell it, so it
            # refutes with a higher one and comes back as itself.
            self._send_to(address, SWIM, {"k": "ping", "seq": 0, "r": [self.membership.death_rumor(sender, member.incarnation)]})
            return False
        self._run([self.gossip.sync_with(sender, address)])
        return True

    def _on_join(self, sender: str, body: dict[str, Any], now: float) -> None:
        if self.leaving or not self._admit(sender, body, now):
            return
        others = [[m.node_id, m.address] for m in self.membership.live() if m.node_id != sender]
        self._send_to(body["address"], WELCOME, {**self._hello(), "members": others})

    def _on_welcome(self, sender: str, body: dict[str, Any], now: float) -> None:
        if not self._admit(sender, body, now):
            return
        members = body.get("members")
        if isinstance(members, list):
            for item in members[:10_000]:
                valid = isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)
                if valid and item[0] != self.node_id and self.membership.get(item[0]) is None:
                    self._knock(item[1], now)

    def _knock(self, address: str, now: float) -> None:
        if address == self.address or now - self._knocked.get(address, -1e9) < self.config.discovery_interval_s:
            return
        if len(self._knocked) > 10_000:
            self._knocked.clear()
        self._knocked[address] = now
        self._send_to(address, JOIN, self._hello())

    # ------------------------------------------------------------------ time

    def _peers(self) -> list[tuple[str, str]]:
        return [(m.node_id, m.address) for m in self.membership.live()]

    def tick(self, now: float) -> None:
        self._run(self.membership.tick(now))
        self.gossip.set_incarnation(self.membership.incarnation)
        self._run(list(self.gossip.tick(now, self._peers())))
        for rid, (node_id, deadline, _) in list(self._requests.items()):
            if now > deadline:
                self._fail_request(rid, f"node {node_id} did not answer within {self.config.mesh_request_timeout_s} s")
        if now >= self._next_discovery and not self.leaving:
            self._next_discovery = now + self.config.discovery_interval_s
            members = {m.address for m in self.membership.live()}
            for m in self.membership.members():
                if m.state == membership.DEAD and m.address not in members:
                    self._knock(m.address, now)  # it may be alive behind a healed partition
            for source in self._sources:
                try:
                    found = source.poll()
                except Exception:
                    logger.exception("zmesh mesh: a discovery source failed; continuing")
                    continue
                for address in found:
                    if address not in members:
                        self._knock(address, now)

    def next_deadline(self) -> float:
        return min(self.membership.next_deadline(), self.gossip.next_deadline(), self._next_discovery)

    def set_entry(self, data: dict[str, Any], now: float) -> None:
        self.gossip.set_own(data, now)

    def live(self) -> list[str]:
        """Live members' ids, this node's included (suspects count: they may refute)."""
        return [self.node_id, *(m.node_id for m in self.membership.live())]

    def leave(self, now: float) -> None:
        """Say goodbye: peers drop this node at once instead of suspecting it for seconds."""
        self.leaving = True
        self._run(list(self.membership.leave(now)))

    def close(self) -> None:
        for source in self._sources:
            try:
                source.close()
            except Exception:
                logger.exception("zmesh mesh: closing a discovery source failed")
        for sock in self._socks.values():
            sock.close()  # linger: a goodbye just queued still goes out
        self._socks.clear()


_GOSSIP_KINDS = frozenset({"push", "sync", "sync_reply"})
