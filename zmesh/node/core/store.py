"""The node's object store as a ledger, without I/O: which segments exist, their sizes, who holds them, what is pulled.

A segment is kept while it has holders (client ids in hex: the process it was
written for, each reader a copy was pulled for). Capacity is counted here: a
segment is reserved before its bytes are written, so a put that cannot fit is
refused with the sizes, before anything is allocated.

Pulled copies: the first reader of another node's segment starts a transfer;
readers that ask while it runs wait for the same one; once done, later readers
map the copy while it is held. A transfer nobody waits for any more is dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

READY = "ready"
PULLING = "pulling"


@dataclasses.dataclass
class Segment:
    name: str
    size: int
    holders: dict[str, int]
    state: str = READY
    source: tuple[str, str] | None = None  # (node id, segment name) of a pulled copy
    waiters: list[Any] = dataclasses.field(default_factory=list)  # replies owed once a pull ends
    # Written by another process for its holder (a worker's result for its caller) and not yet adopted by it.
    writer: str | None = None
    writer_gone_at: float | None = None  # the writer exited before the holder adopted it


@dataclasses.dataclass
class PullStart:
    """Start moving ``source`` (node id, name) into local segment ``name`` of ``size`` bytes."""

    name: str
    source: tuple[str, str]
    size: int


def _human(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit} ({size:,} bytes)"
    return f"{size:,} bytes"


class StoreBook:
    def __init__(self, store_id: str, capacity: int) -> None:
        self.store_id = store_id
        self.capacity = capacity
        self.used = 0
        self._segments: dict[str, Segment] = {}
        self._pulled: dict[tuple[str, str], str] = {}  # source -> local copy
        self.transfers_started = 0

    def __len__(self) -> int:
        return len(self._segments)

    def get(self, name: str) -> Segment | None:
        return self._segments.get(name)

    def names(self) -> list[str]:
        return list(self._segments)

    def _room(self, size: int) -> str | None:
        """Why ``size`` more bytes cannot fit, or None."""
        if size > self.capacity:
            return (
                f"a value of {_human(size)} is larger than the whole object store of node {self.store_id}, "
                f"{_human(self.capacity)} (--object-store-memory)"
            )
        if self.used + size > self.capacity:
            return (
                f"the object store of node {self.store_id} is full: a value of {_human(size)} needs room, and "
                f"{_human(self.used)} of its {_human(self.capacity)} are held (free some ObjectRefs, or raise --object-store-memory)"
            )
        return None

    def alloc(self, name: str, size: int, holder: str, writer: str | None = None) -> str | None:
        """Reserve a segment a process is about to write; returns why not (ObjectStoreFullError's message).

        ``writer``: the process writing it for ``holder`` (a worker, a result for its caller). Until the holder
        adopts it, the segment also goes if the writer exits and the holder has not adopted it within a grace:
        a result its worker never got to send would otherwise be held for its caller until the caller exits.
        """
        if name in self._segments:
            return f"segment {name} exists already"
        refusal = self._room(size)
        if refusal is None:
            self._segments[name] = Segment(name, size, {holder: 1}, writer=writer if writer != holder else None)
            self.used += size
        return refusal

    def adopted(self, name: str, holder: str) -> None:
        """The holder has the segment's descriptor: it no longer depends on its writer."""
        seg = self._segments.get(name)
        if seg is not None and holder in seg.holders:
            seg.writer = seg.writer_gone_at = None

    def writer_gone(self, writer: str, now: float) -> None:
        for seg in self._segments.values():
            if seg.writer == writer and seg.writer_gone_at is None:
                seg.writer_gone_at = now

    def orphans(self, now: float, grace_s: float) -> list[Segment]:
        """Segments whose writer exited ``grace_s`` ago without their holder adopting them: gone now."""
        out = [s for s in self._segments.values() if s.writer_gone_at is not None and now - s.writer_gone_at >= grace_s]
        return [self._remove(s) for s in out]

    def rename(self, old: str, new: str, holder: str) -> bool:
        """A writer reused its own segment for a new value under a new name (it alone held it)."""
        seg = self._segments.get(old)
        if seg is None or seg.source is not None or set(seg.holders) != {holder} or new in self._segments:
            return False
        del self._segments[old]
        seg.name = new
        self._segments[new] = seg
        return True

    def free(self, name: str, holder: str, every: bool = False) -> list[Segment]:
        """``holder`` lets go of one hold (or all, ``every``); returns the segments now gone (to unlink, to answer)."""
        seg = self._segments.get(name)
        if seg is None or holder not in seg.holders:
            return []
        left = 0 if every else seg.holders[holder] - 1
        if left > 0:
            seg.holders[holder] = left
            return []
        del seg.holders[holder]
        if seg.holders:
            return []
        return [self._remove(seg)]

    def _remove(self, seg: Segment) -> Segment:
        del self._segments[seg.name]
        self.used -= seg.size
        if seg.source is not None and self._pulled.get(seg.source) == seg.name:
            del self._pulled[seg.source]
        return seg

    def holders(self) -> set[str]:
        return {h for seg in self._segments.values() for h in seg.holders}

    def holders_gone(self, gone: set[str]) -> list[Segment]:
        """Processes that exited: their holds go; returns the segments left with none."""
        out: list[Segment] = []
        for seg in list(self._segments.values()):
            for holder in gone & seg.holders.keys():
                out.extend(self.free(seg.name, holder, every=True))
        return out

    # ------------------------------------------------------------------ pulls from other nodes

    def pull(self, source: tuple[str, str], size: int, holder: str, waiter: Any) -> tuple[str, Segment | None, PullStart | None]:
        """A reader wants another node's segment: ``(refusal, ready copy, transfer to start)``.

        Ready: the copy exists, ``holder`` holds it, answer at once. Otherwise ``waiter``
        waits on the copy being made (the transfer is started only by the first reader).
        """
        local = self._pulled.get(source)
        seg = self._segments.get(local) if local is not None else None
        if seg is not None:
            seg.holders[holder] = seg.holders.get(holder, 0) + 1
            if seg.state == READY:
                return "", seg, None
            seg.waiters.append(waiter)
            return "", None, None
        refusal = self._room(size)
        if refusal is not None:
            return refusal, None, None
        # Never a name used before: a stale free or mapping of an earlier copy of the same source cannot reach this one.
        name = f"zmesh.{self.store_id}.p{self.transfers_started:x}-{source[1].rpartition('.')[2]}"[:120]
        if name in self._segments:
            return f"segment {name} exists already", None, None
        seg = Segment(name, size, {holder: 1}, PULLING, source, [waiter])
        self._segments[name] = seg
        self.used += size
        self._pulled[source] = name
        self.transfers_started += 1
        return "", None, PullStart(name, source, size)

    def pulled(self, name: str) -> list[Any]:
        """The transfer into ``name`` finished: the copy is ready; returns the waiters to answer."""
        seg = self._segments.get(name)
        if seg is None or seg.state != PULLING:
            return []
        seg.state = READY
        waiters, seg.waiters = seg.waiters, []
        return waiters

    def pull_failed(self, name: str) -> Segment | None:
        """The transfer into ``name`` failed: the partial copy goes; its waiters are on the returned segment."""
        seg = self._segments.get(name)
        if seg is None or seg.state != PULLING:
            return None
        return self._remove(seg)

    def pulling_from(self, node_id: str) -> list[str]:
        return [s.name for s in self._segments.values() if s.state == PULLING and s.source is not None and s.source[0] == node_id]

    def describe(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "used": self.used,
            "segments": len(self._segments),
            "pulling": sum(1 for s in self._segments.values() if s.state == PULLING),
            "transfers_started": self.transfers_started,
        }
