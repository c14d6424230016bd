"""Nodes running the real Membership and Gossip cores on one fake clock, over a network that delays, drops and duplicates.

Each ``SimNode`` wires its two cores as ``zmesh/node/mesh/link.py`` does: the join handshake (a hello, a welcome
that lists the members, a DEAD rumor for a member we buried, so it refutes), discovery knocks every
``discovery_interval_s`` at candidates and at the members we think dead (a healed partition), SWIM and gossip
on their own channels, a member's entry forgotten when it dies, request/reply with a timeout that fails at
once when the peer dies. What is not membership or gossip goes to the layer above (``Layer``), with the
membership changes, the burials and the entry changes.

``Net`` runs every node event by event: a node is ticked at its own next deadline (the daemon's loop sleeps
until then), and a message arrives after a drawn delay, so messages reorder. Faults: SIGKILL (a node stops
for good), freeze and thaw (it stops; what arrives waits in its socket; its clock has jumped when it
resumes), partitions into two sides, and message faults (drops, duplicates, longer delays) for a while.
All randomness comes from the seed, and nothing iterates a set, so a history replays exactly.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from zmesh.node.config import NodeConfig
from zmesh.node.core import membership as ms
from zmesh.node.core.gossip import Gossip, GossipTimings
from zmesh.node.core.membership import Buried, Changed, Membership, MembershipTimings, Send

SWIM, GOSSIP, JOIN, WELCOME, REPLY = "swim", "gossip", "join", "welcome", "reply"
_GOSSIP_KINDS = frozenset({"push", "sync", "sync_reply"})
_GONE = (ms.DEAD, ms.LEFT)
MIN_STEP_S = 0.001  # the clock always moves on, even when a deadline is overdue
CONFIG = NodeConfig()  # the daemon's default timings

Reply = Callable[[bool, Any], None]


class Layer(Protocol):
    """What runs above the mesh on one node (the actor layer)."""

    def entry(self) -> dict[str, Any]: ...
    def on_member(self, change: Changed) -> None: ...
    def on_entries(self) -> None: ...
    def on_app(self, sender: str, kind: str, body: Any, rid: int | None) -> None: ...
    def on_buried(self, incarnation: int) -> None: ...
    def tick(self) -> None: ...
    def next_deadline(self) -> float: ...


@dataclasses.dataclass
class Faults:
    drop: float = 0.0
    dup: float = 0.0
    delay: tuple[float, float] = (0.001, 0.01)

    def active(self) -> bool:
        return self.drop > 0 or self.dup > 0 or self.delay[1] > 0.01


class SimNode:
    """One node: its cores, and the link's half of the daemon."""

    def __init__(self, net: Net, node_id: str, index: int, make_layer: Callable[[SimNode], Layer]) -> None:
        c = net.config
        self.net = net
        self.id = node_id
        self.address = f"tcp://{node_id}"
        self.started_at = net.now
        self.dead = False
        self.frozen = False
        self.inbox: list[tuple[float, int, str, str, str, Any]] = []  # what arrived while frozen
        rng = random.Random(net.seed * 1009 + index)
        timings = MembershipTimings(
            probe_interval_s=c.probe_interval_s,
            probe_timeout_s=c.probe_timeout_s,
            indirect_probes=c.indirect_probes,
            suspicion_min_s=c.suspicion_min_s,
            suspicion_max_s=c.suspicion_max_s,
            lag_tolerance_s=c.lag_tolerance_s,
            tombstone_s=c.tombstone_s,
        )
        self.membership = Membership(node_id, self.address, timings, net.now, rng)
        self.layer = make_layer(self)
        gossip_timings = GossipTimings(fanout=c.gossip_fanout, round_s=c.gossip_round_s, sync_interval_s=c.sync_interval_s)
        self.gossip = Gossip(node_id, self.membership.incarnation, self.layer.entry(), gossip_timings, net.now, rng)
        self.requests: dict[int, tuple[str, float, Reply]] = {}
        self.knocked: dict[str, float] = {}
        self.next_discovery = net.now
        self.dirty = False
        self.next_publish = net.now

    # ------------------------------------------------------------------ what the layer uses

    @property
    def now(self) -> float:
        return self.net.now

    def live(self) -> list[str]:
        """Live members' ids, this node's first (suspects count: they may refute)."""
        return [self.id, *(m.node_id for m in self.membership.live())]

    def state_of(self, node_id: str) -> str | None:
        member = self.membership.get(node_id)
        return member.state if member is not None else None

    def publish(self) -> None:
        """Our entry changed: a new version goes out at most once per gossip round, as the daemon does."""
        self.dirty = True

    def send(self, to: str, kind: str, body: Any, rid: int | None = None) -> bool:
        address = self.address if to == self.id else self._address_of(to)
        if address is None:
            return False
        self.net.transmit(self.id, address, kind, (body, rid))
        return True

    def request(self, to: str, kind: str, body: Any, on_reply: Reply) -> None:
        """``on_reply(ok, value)`` once: the answer, or a failure on timeout or when ``to`` dies."""
        rid = next(self.net.rids)
        self.requests[rid] = (to, self.now + self.net.config.mesh_request_timeout_s, on_reply)
        if not self.send(to, kind, body, rid):
            self._fail(rid, f"node {to} cannot be reached")

    def reply(self, to: str, rid: int, ok: bool, value: Any) -> None:
        address = self._address_of(to)
        if address is not None:
            self.net.transmit(self.id, address, REPLY, (rid, ok, value))

    # ------------------------------------------------------------------ the link

    def _address_of(self, node_id: str) -> str | None:
        member = self.membership.get(node_id)
        return member.address if member is not None else None

    def _fail(self, rid: int, why: str) -> None:
        entry = self.requests.pop(rid, None)
        if entry is not None:
            entry[2](False, why)

    def _sync_incarnation(self) -> None:
        # The daemon's link does this after every membership stimulus: a refuted node's entry restarts at its new
        # incarnation, so the tombstones others keep of the buried one do not hide it.
        self.gossip.set_incarnation(self.membership.incarnation)

    def run(self, actions: Iterable[Any]) -> None:
        for action in actions:
            if isinstance(action, Send):
                channel = GOSSIP if action.message.get("k") in _GOSSIP_KINDS else SWIM
                address = action.address or self._address_of(action.to)
                if address is not None:
                    self.net.transmit(self.id, address, channel, action.message)
            elif isinstance(action, Changed):
                if action.state in _GONE:
                    self.gossip.forget(action.node_id, action.incarnation)
                    for rid, (target, _, _) in list(self.requests.items()):
                        if target == action.node_id:
                            self._fail(rid, f"node {action.node_id} is {action.state.lower()}")
                self.net.changed(self.id, action)
                self.layer.on_member(action)
            elif isinstance(action, Buried):
                self.net.buried(self.id, action.incarnation)
                self.layer.on_buried(action.incarnation)

    def handle(self, sender: str, channel: str, payload: Any) -> None:
        now = self.now
        if channel == JOIN:
            if self._admit(sender, payload):
                others = [[m.node_id, m.address] for m in self.membership.live() if m.node_id != sender]
                self.net.transmit(self.id, payload["address"], WELCOME, {**self._hello(), "members": others})
            return
        if channel == WELCOME:
            if self._admit(sender, payload):
                for node_id, address in payload["members"]:
                    if node_id != self.id and self.membership.get(node_id) is None:
                        self._knock(address)
            return
        member = self.membership.get(sender)
        if member is None or member.state in _GONE:
            if member is not None and channel == SWIM:
                # A member we buried may be telling us that it buried us: its rumors let us refute.
                self.run(self.membership.receive(sender, payload, now))
                self._sync_incarnation()
            return
        self.run(self.membership.heard_from(sender, now))
        if channel == SWIM:
            self.run(self.membership.receive(sender, payload, now))
            self._sync_incarnation()
        elif channel == GOSSIP:
            sends, changed = self.gossip.receive(sender, payload, now)
            self.run(sends)
            if changed:  # opaque: something changed
                self.layer.on_entries()
        elif channel == REPLY:
            rid, ok, value = payload
            entry = self.requests.pop(rid, None)
            if entry is not None and entry[0] == sender:
                entry[2](ok, value)
        else:
            body, rid = payload
            self.layer.on_app(sender, channel, body, rid)

    def _hello(self) -> dict[str, Any]:
        return {"node_id": self.id, "address": self.address, "incarnation": self.membership.incarnation}

    def _admit(self, sender: str, hello: dict[str, Any]) -> bool:
        if sender == self.id:
            return True
        address = hello["address"]
        self.run(self.membership.add(sender, address, hello["incarnation"], self.now))
        member = self.membership.get(sender)
        if member is not None and member.state in _GONE:
            # We buried it at an incarnation it has not passed: tell it, so it refutes and comes back as itself.
            rumor = self.membership.death_rumor(sender, member.incarnation)
            self.net.transmit(self.id, address, SWIM, {"k": "ping", "seq": 0, "r": [rumor]})
            return False
        self.run([self.gossip.sync_with(sender, address)])
        return True

    def _knock(self, address: str) -> None:
        now = self.now
        if address == self.address or now - self.knocked.get(address, -math.inf) < self.net.config.discovery_interval_s:
            return
        self.knocked[address] = now
        self.net.transmit(self.id, address, JOIN, self._hello())

    def tick(self) -> None:
        now = self.now
        self.run(self.membership.tick(now))
        self._sync_incarnation()
        self.run(self.gossip.tick(now, [(m.node_id, m.address) for m in self.membership.live()]))
        for rid, (_, deadline, _) in list(self.requests.items()):
            if now > deadline:
                self._fail(rid, "no answer in time")
        if now >= self.next_discovery:
            self.next_discovery = now + self.net.config.discovery_interval_s
            members = {m.address for m in self.membership.live()}
            for m in self.membership.members():
                if m.state == ms.DEAD and m.address not in members:
                    self._knock(m.address)  # it may be alive behind a healed partition
            for address in self.net.discovery():
                if address not in members:
                    self._knock(address)
        self.layer.tick()
        if self.dirty and now >= self.next_publish:
            self.dirty = False
            self.next_publish = now + self.net.config.gossip_round_s
            self.gossip.set_own(self.layer.entry(), now)

    def deadline(self) -> float:
        deadline = min(self.membership.next_deadline(), self.gossip.next_deadline(), self.next_discovery, self.layer.next_deadline())
        if self.dirty:
            deadline = min(deadline, self.next_publish)
        for _, at, _ in self.requests.values():
            deadline = min(deadline, at + MIN_STEP_S)
        return deadline


class Net:
    """Every node on one fake clock, and the network between them."""

    def __init__(self, seed: int, make_layer: Callable[[SimNode], Layer], config: NodeConfig = CONFIG) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.config = config
        self.make_layer = make_layer
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.by_address: dict[str, SimNode] = {}
        self.queue: list[tuple[float, int, str, str, str, Any]] = []
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = itertools.count()
        self.rids = itertools.count(1)
        self.faults = Faults()
        self.sides: dict[str, int] = {}  # a partition: node id -> side; empty when whole
        self.sent = 0
        self.events = 0
        # Ground truth the invariants read: who declared whom dead when, at which incarnation, and the burials.
        self.declared: dict[tuple[str, str], float] = {}  # (observer, node) -> when it last saw node DEAD or LEFT
        # node -> highest incarnation the mesh declared it dead at: by more members than the rest (its own side).
        # A node cut off alone declares everyone dead too; that is not the mesh's word (membership weighs them).
        self.dead_at_incarnation: dict[str, int] = {}
        self.declarers: dict[tuple[str, int], set[str]] = {}
        self.burials: list[tuple[float, str, int]] = []
        self._indexes = itertools.count()

    # ------------------------------------------------------------------ the population

    def add_node(self) -> SimNode:
        index = next(self._indexes)
        node = SimNode(self, f"n{index}", index, self.make_layer)
        self.nodes[node.id] = node
        self.by_address[node.address] = node
        if self.sides:
            self.sides[node.id] = 0
        return node

    def alive(self) -> list[SimNode]:
        """Processes not killed (frozen ones included)."""
        return [n for n in self.nodes.values() if not n.dead]

    def awake(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if not n.dead and not n.frozen]

    def discovery(self) -> list[str]:
        """What a run-directory source lists: every node started on this host and not killed."""
        return [n.address for n in self.nodes.values() if not n.dead]

    def kill(self, node_id: str) -> None:
        node = self.nodes[node_id]
        node.dead, node.inbox = True, []

    def freeze(self, node_id: str) -> None:
        self.nodes[node_id].frozen = True

    def thaw(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.dead or not node.frozen:
            return
        node.frozen = False
        for item in node.inbox:  # queued in its socket: read at once, in order
            heapq.heappush(self.queue, (self.now, next(self.seq), *item[2:]))
        node.inbox = []

    def partition(self, side: Iterable[str]) -> None:
        chosen = set(side)
        self.sides = {n: (1 if n in chosen else 0) for n in self.nodes}

    def heal(self) -> None:
        self.sides = {}

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (when, next(self.seq), action))

    def cut(self, a: str, b: str) -> bool:
        return bool(self.sides) and self.sides.get(a, 0) != self.sides.get(b, 0)

    # ------------------------------------------------------------------ what nodes report

    def changed(self, observer: str, change: Changed) -> None:
        if change.state in _GONE:
            self.declared[(observer, change.node_id)] = self.now
            declarers = self.declarers.setdefault((change.node_id, change.incarnation), set())
            declarers.add(observer)
            if len(declarers) > len(self.nodes) - len(declarers):
                self.dead_at_incarnation[change.node_id] = max(change.incarnation, self.dead_at_incarnation.get(change.node_id, -1))

    def buried(self, node_id: str, incarnation: int) -> None:
        self.burials.append((self.now, node_id, incarnation))

    # ------------------------------------------------------------------ the wire

    def transmit(self, sender: str, address: str, channel: str, payload: Any) -> None:
        self.sent += 1
        target = self.by_address.get(address)
        if target is None or self.cut(sender, target.id):
            return
        faults = self.faults
        if faults.drop and self.rng.random() < faults.drop:
            return
        copies = 2 if faults.dup and self.rng.random() < faults.dup else 1
        for _ in range(copies):
            at = self.now + self.rng.uniform(*faults.delay)
            heapq.heappush(self.queue, (at, next(self.seq), sender, address, channel, payload))

    # ------------------------------------------------------------------ time

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            nxt = min(
                self.queue[0][0] if self.queue else math.inf,
                self.timers[0][0] if self.timers else math.inf,
                min((n.deadline() for n in self.awake()), default=math.inf),
            )
            nxt = max(nxt, self.now + MIN_STEP_S)
            if nxt > end:
                self.now = end
                return
            self.now = nxt
            self._step()

    def _step(self) -> None:
        now = self.now
        while self.timers and self.timers[0][0] <= now:
            heapq.heappop(self.timers)[2]()
        woken: dict[str, SimNode] = {}
        while self.queue and self.queue[0][0] <= now:
            item = heapq.heappop(self.queue)
            sender, address, channel, payload = item[2:]
            node = self.by_address.get(address)
            if node is None or node.dead or self.cut(sender, node.id):
                continue
            if node.frozen:
                node.inbox.append(item)
                continue
            self.events += 1
            node.handle(sender, channel, payload)
            woken[node.id] = node
        for node in self.awake():
            if node.id in woken or node.deadline() <= now:
                self.events += 1
                node.tick()
