"""Every actor record this node keeps, indexed so that no event scans them all. Pure: no I/O, no clock.

A node keeps a record for each actor it hosts, each creation it took (its origin), each
creation it keeps for a host elsewhere (a keeper), and each actor its clients watch (a
stub). Events name an actor, a name, a client process or a worker: each has its index
here. The fields an index reads are set through this table's methods; the others
(state, incarnation, address) change freely on the record.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

from zmesh.node.core import records
from zmesh.node.core.records import ActorRecord
from zmesh.transport.ids import ActorId, ClientId

Name = tuple[str, str]


class ActorTable:
    def __init__(self, me: str, keep_dead: int) -> None:
        self.me = me
        self._actors: dict[ActorId, ActorRecord] = {}
        self._names: dict[Name, ActorId] = {}  # names of the live actors this node took or hosts
        self._waiting: dict[ActorId, None] = {}  # creations waiting for placement, oldest first
        self._by_owner: dict[ClientId, set[ActorId]] = {}
        self._by_creator: dict[ClientId, set[ActorId]] = {}
        self._by_watcher: dict[ClientId, set[ActorId]] = {}  # clients subscribed to an actor's state
        self._by_token: dict[str, ActorId] = {}
        self._by_pid: dict[int, ActorId] = {}
        self._hosted: set[ActorId] = set()  # records whose worker is (to be) on this node
        self._dead: deque[ActorId] = deque()
        self._keep_dead = keep_dead
        # Records whose gossip row may have changed, or that came, went, or were hosted or queued here
        # or no longer: ``gossip_rows`` builds those rows again, not all of them.
        self._changed: set[ActorId] = set()
        self._rows: dict[ActorId, list[Any]] = {}  # the rows as last built
        self.classes: dict[str, bytes] = {}  # class blobs by key: sent once per node, kept for restarts

    # ------------------------------------------------------------------ records

    def get(self, actor_id: str) -> ActorRecord | None:
        return self._actors.get(ActorId(actor_id))

    def __contains__(self, actor_id: object) -> bool:
        return actor_id in self._actors

    def __len__(self) -> int:
        return len(self._actors)

    def values(self) -> list[ActorRecord]:
        """A copy of every record: for rare events (a member died, this node was buried, status)."""
        return list(self._actors.values())

    def add(self, record: ActorRecord) -> None:
        """Keep ``record`` (replacing any record of the same actor, whose subscribers it takes over)."""
        old = self._actors.get(record.actor_id)
        if old is not None and old is not record:
            record.subscribers |= old.subscribers
            record.watchers |= old.watchers
            self._unindex(old)
        self._actors[record.actor_id] = record
        record.changed_into = self._changed
        self._changed.add(record.actor_id)
        if record.owner is not None:
            self._by_owner.setdefault(record.owner, set()).add(record.actor_id)
        self._by_creator.setdefault(record.creator, set()).add(record.actor_id)
        for client in record.subscribers:
            self._by_watcher.setdefault(client, set()).add(record.actor_id)
        self.set_host(record, record.host)

    def _unindex(self, record: ActorRecord) -> None:
        for index, key in ((self._by_owner, record.owner), (self._by_creator, record.creator)):
            if key is not None and (ids := index.get(key)) is not None:
                ids.discard(record.actor_id)
                if not ids:
                    del index[key]
        self._hosted.discard(record.actor_id)
        self._waiting.pop(record.actor_id, None)
        self._changed.add(record.actor_id)

    def subscribe(self, record: ActorRecord, client: ClientId) -> None:
        record.subscribers.add(client)
        self._by_watcher.setdefault(client, set()).add(record.actor_id)

    def client_gone(self, client: ClientId) -> tuple[list[ActorRecord], list[ActorRecord]]:
        """``client`` exited: it watches nothing now. Returns (the actors it owned, the actors it created)."""
        for actor_id in self._by_watcher.pop(client, ()):
            if (record := self._actors.get(actor_id)) is not None:
                record.subscribers.discard(client)
        owned = [self._actors[a] for a in self._by_owner.get(client, ()) if a in self._actors]
        created = [self._actors[a] for a in self._by_creator.get(client, ()) if a in self._actors]
        return owned, created

    def unsubscribe(self, record: ActorRecord, client: ClientId) -> None:
        record.subscribers.discard(client)
        if (ids := self._by_watcher.get(client)) is not None:
            ids.discard(record.actor_id)

    # ------------------------------------------------------------------ hosting and waiting

    def set_host(self, record: ActorRecord, host: str | None) -> None:
        record.host = host  # marks it changed
        if host == self.me and record.state != records.DEAD:
            self._hosted.add(record.actor_id)
            self.set_name(record)  # a name's holder hosted here is found here (a keeper's re-creation too)
        else:
            self._hosted.discard(record.actor_id)

    def hosted(self) -> list[ActorRecord]:
        """The live actors whose worker is on this node."""
        return [self._actors[a] for a in self._hosted if a in self._actors]

    def hosted_count(self) -> int:
        return len(self._hosted)

    def wait(self, record: ActorRecord) -> None:
        self._waiting[record.actor_id] = None
        self._changed.add(record.actor_id)

    def unwait(self, record: ActorRecord) -> None:
        self._waiting.pop(record.actor_id, None)
        self._changed.add(record.actor_id)

    def waiting(self) -> list[ActorRecord]:
        return [self._actors[a] for a in self._waiting if a in self._actors]

    def is_waiting(self, actor_id: str) -> bool:
        return actor_id in self._waiting

    # ------------------------------------------------------------------ names

    def named(self, name: Name) -> ActorRecord | None:
        actor_id = self._names.get(name)
        return self._actors.get(actor_id) if actor_id is not None else None

    def set_name(self, record: ActorRecord) -> None:
        if record.name is not None:
            self._names[(record.namespace, record.name)] = record.actor_id

    def drop_name(self, record: ActorRecord) -> bool:
        """Forget ``record``'s name here (it died, or lost the name); whether it held it."""
        if record.name is not None and self._names.get((record.namespace, record.name)) == record.actor_id:
            del self._names[(record.namespace, record.name)]
            return True
        return False

    def names(self) -> dict[Name, ActorId]:
        return dict(self._names)

    # ------------------------------------------------------------------ workers

    def expect_worker(self, record: ActorRecord) -> None:
        self._by_token[record.token] = record.actor_id

    def by_token(self, token: str) -> ActorRecord | None:
        actor_id = self._by_token.get(token)
        record = self._actors.get(actor_id) if actor_id is not None else None
        return record if record is not None and record.token == token else None

    def forget_token(self, record: ActorRecord) -> None:
        self._by_token.pop(record.token, None)

    def set_pid(self, record: ActorRecord, pid: int) -> None:
        record.pid = pid
        self._by_pid[pid] = record.actor_id

    def pid_exited(self, pid: int) -> ActorRecord | None:
        """The worker ``pid`` is gone: the record it ran for, if any."""
        actor_id = self._by_pid.pop(pid, None)
        return self._actors.get(actor_id) if actor_id is not None else None

    def has_pid(self, pid: int) -> bool:
        return pid in self._by_pid

    def pids(self) -> dict[int, ActorId]:
        return dict(self._by_pid)

    # ------------------------------------------------------------------ the dead

    def buried(self, record: ActorRecord) -> None:
        """``record`` is dead: it leaves the indexes, and the oldest dead records are forgotten."""
        self._hosted.discard(record.actor_id)
        self._waiting.pop(record.actor_id, None)
        self._changed.add(record.actor_id)
        self._by_token.pop(record.token, None)
        self.drop_name(record)
        self._dead.append(record.actor_id)
        while len(self._dead) > self._keep_dead:
            # A stale handle to a forgotten actor is told it is unknown, hence dead. A worker still
            # exiting keeps its pid here: its socket files go when the zygote reports the exit.
            old = self._actors.get(self._dead.popleft())
            if old is not None and old.state == records.DEAD:
                del self._actors[old.actor_id]
                self._unindex(old)
                for client in old.subscribers:
                    if (ids := self._by_watcher.get(client)) is not None:
                        ids.discard(old.actor_id)

    # ------------------------------------------------------------------ gossip

    def gossip_rows(self) -> dict[ActorId, list[Any]]:
        """The wire rows of the live actors hosted here or waiting here for placement, as this node's entry lists them.

        Only the records changed since the last call (a field of ``records.ROW_FIELDS`` set, hosted
        or queued or no longer) are built again: a burst of thousands of creations would otherwise
        rebuild thousands of rows every gossip round. A new dict each time, whose rows are never
        changed in place: the gossip core keeps what it is given.
        """
        for actor_id in self._changed:
            record = self._actors.get(actor_id)
            if record is not None and record.state != records.DEAD and (actor_id in self._hosted or actor_id in self._waiting):
                self._rows[actor_id] = record.row().wire()
            else:
                self._rows.pop(actor_id, None)
        self._changed.clear()  # in place: every record kept here holds this very set
        return dict(self._rows)

    def __iter__(self) -> Iterator[ActorRecord]:
        return iter(list(self._actors.values()))


class Chores:
    """Work the node's loop owes after events: publish a new entry, place waiting creations. Set by anyone, done by the loop."""

    __slots__ = ("publish", "schedule", "schedule_at")

    def __init__(self) -> None:
        self.publish = True
        self.schedule = False
        self.schedule_at = float("inf")  # a waiting creation must be decided again then, news or not

    def schedule_by(self, when: float) -> None:
        self.schedule_at = min(self.schedule_at, when)
