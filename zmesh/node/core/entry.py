"""One node's gossip entry, versioned field by field and item by item, and the deltas between its versions. Sans I/O.

An entry is ``fields`` (its top-level keys, opaque values) plus keyed
``sections`` (``"actors"``: {actor id: row}). Its owner bumps the version once
per change; every field and item records the version at which it last changed
(here: an upper bound of it, which is all a delta needs), and a deleted item
leaves a marker with its version. The delta since version ``f`` is then the
latest value of everything stamped after ``f`` plus the markers after ``f``:
it costs what changed, not the size of the entry. On the wire::

    [node_id, incarnation, from, to, {field: value}, {section: {key: value}}, {section: [deleted key, ...]}]

``from == 0`` is the full entry (replace everything). A receiver at version
``v`` of the same incarnation with ``from <= v < to`` applies a delta and is
then at ``to``, exactly the owner's data at ``to``: what changed in
``(v, to]`` is in it, with its latest value.

Deletion markers are what lets a delta say "gone". They are kept for the last
``KEEP_VERSIONS`` versions and at most ``MAX_MARKERS`` of them; ``horizon`` is
the oldest version a delta can still start from (raised as markers expire),
and a peer behind it gets the full entry. The owner publishes at most once
per gossip round (0.1 s) and anti-entropy runs every second, so a peer that
lost deltas is a few to a few tens of versions behind when the sync finds it:
100 versions (10 s or more) covers that many times over, and a peer further
behind (a healed partition) gets a full entry, as it would need anyway.
10,000 markers (about 1 MB) cover a node that drops thousands of actors in one
round. The top-level keys have no markers: a change of which keys are
sections, or a field that goes away, makes that version a full entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

from zmesh.node.core.swim import _check, _is_id, _is_int

KEEP_VERSIONS = 100  # deletion markers older than this many versions are dropped (see above)
MAX_MARKERS = 10_000  # and at most this many are kept per entry
MAX_ITEMS = 100_000  # items of one entry, all sections together; also the most in one delta
MAX_FIELDS = 256  # top-level fields of one entry
MAX_KEY = 1024  # characters in an item's key (actor ids have 16)

_FIELD = ""  # the "section" of top-level fields in the stamp log; a section's name is never empty
_MISSING = object()


@dataclasses.dataclass(frozen=True, slots=True)
class EntryChange:
    """What one received message changed in one node's entry.

    ``full``: the entry is new or was replaced whole (look at all of it);
    else ``fields`` and ``items`` (per section, the keys changed or deleted)
    name what a delta touched, which may include values it left as they were.
    """

    node_id: str
    full: bool
    fields: frozenset[str] = frozenset()
    items: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(slots=True)
class Delta:
    """What changed in an entry in ``(since, version]``, or all of it when ``since == 0``."""

    node_id: str
    incarnation: int
    since: int
    version: int
    fields: dict[str, Any]
    items: dict[str, dict[str, Any]]
    deleted: dict[str, list[str]]

    def wire(self) -> list[Any]:
        return [self.node_id, self.incarnation, self.since, self.version, self.fields, self.items, self.deleted]

    def count(self) -> int:
        """Fields, items and deletions it carries."""
        return len(self.fields) + sum(map(len, self.items.values())) + sum(map(len, self.deleted.values()))

    def change(self) -> EntryChange:
        if self.since == 0:
            return EntryChange(self.node_id, True)
        keys = {s: set(items) for s, items in self.items.items()}
        for s, deleted in self.deleted.items():
            keys.setdefault(s, set()).update(deleted)
        return EntryChange(self.node_id, False, frozenset(self.fields), {s: frozenset(k) for s, k in keys.items()})


class Entry:
    """A node's entry as this node knows it; ``data`` is the whole merged dict (read it, do not keep or change it)."""

    __slots__ = ("_data", "_deleted", "_stamps", "fields", "horizon", "incarnation", "node_id", "sections", "version")

    def __init__(self, node_id: str, incarnation: int, version: int, fields: dict[str, Any], sections: dict[str, dict[str, Any]]) -> None:
        self.node_id = node_id
        self.incarnation = incarnation
        self.version = version
        self.fields = fields
        self.sections = sections
        self.horizon = version  # nothing before this version is known change by change: older peers get it whole
        # (section or _FIELD, key) -> version it last changed at, oldest first; only stamps above the horizon matter.
        self._stamps: dict[tuple[str, str], int] = {}
        self._deleted: dict[tuple[str, str], int] = {}  # deletion markers, oldest first
        self._data: dict[str, Any] | None = None

    @classmethod
    def own(cls, node_id: str, incarnation: int, data: dict[str, Any], sections: Collection[str]) -> Entry:
        fields, parts = split(data, sections)
        return cls(node_id, incarnation, 1, fields, parts)

    @classmethod
    def from_full(cls, delta: Delta) -> Entry:
        # Copies: this entry changes in place as deltas arrive, and the message may be shared (a simulated network).
        items = {s: dict(part) for s, part in delta.items.items()}
        return cls(delta.node_id, delta.incarnation, delta.version, dict(delta.fields), items)

    def key(self) -> tuple[int, int]:
        return (self.incarnation, self.version)

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = {**self.fields, **self.sections}
        return self._data

    def size(self) -> int:
        return sum(map(len, self.sections.values()))

    def __repr__(self) -> str:
        return f"Entry({self.node_id!r}, {self.incarnation}, {self.version}, {self.data!r})"

    # ------------------------------------------------------------------ the owner's side

    def restart(self, incarnation: int) -> None:
        """A new incarnation: versions start again at 1, and only a full entry can reach anyone."""
        self.incarnation, self.version = incarnation, 1
        self._forget_history()

    def set_data(self, data: dict[str, Any], sections: Collection[str]) -> bool:
        """Our own new data, diffed against the last; True (and the version bumped once) if anything changed."""
        fields, parts = split(data, sections)
        version = self.version + 1
        if parts.keys() != self.sections.keys() or not fields.keys() >= self.fields.keys():
            # A section came or went, or a field went: deltas have no words for it, so this version goes whole.
            self.version, self.fields, self.sections, self._data = version, fields, parts, None
            self._forget_history()
            return True
        changed = False
        for name, value in fields.items():
            if self.fields.get(name, _MISSING) != value:
                self._stamp(_FIELD, name, version)
                changed = True
        for section, new in parts.items():
            old = self.sections[section]
            for key, value in new.items():
                if old.get(key, _MISSING) != value:
                    self._stamp(section, key, version)
                    changed = True
            for key in old.keys() - new.keys():
                self._delete(section, key, version)
                changed = True
        if changed:
            self.version, self.fields, self.sections, self._data = version, fields, parts, None
            self._prune()
        return changed

    def delta(self, since: int) -> Delta:
        """The latest values of what changed in ``(since, version]``: the full entry if ``since`` is 0 or before the horizon."""
        if since <= 0 or since < self.horizon:
            # Copies: this node changes its sections in place as deltas arrive, and a message must not change after it is made.
            items = {s: dict(part) for s, part in self.sections.items()}
            return Delta(self.node_id, self.incarnation, 0, self.version, dict(self.fields), items, {})
        fields: dict[str, Any] = {}
        changed: dict[str, dict[str, Any]] = {}
        deleted: dict[str, list[str]] = {}
        for (section, key), version in reversed(self._stamps.items()):
            if version <= since:
                break
            if section == _FIELD:
                fields[key] = self.fields[key]
            else:
                changed.setdefault(section, {})[key] = self.sections[section][key]
        for (section, key), version in reversed(self._deleted.items()):
            if version <= since:
                break
            deleted.setdefault(section, []).append(key)
        return Delta(self.node_id, self.incarnation, since, self.version, fields, changed, deleted)

    # ------------------------------------------------------------------ a receiver's side

    def fits(self, delta: Delta) -> bool:
        """Whether applying ``delta`` keeps this entry within ``MAX_ITEMS``."""
        size = self.size()
        for section, items in delta.items.items():
            part = self.sections.get(section, {})
            size += sum(1 for key in items if key not in part)
        for section, keys in delta.deleted.items():
            part = self.sections.get(section, {})
            size -= sum(1 for key in set(keys) if key in part)
        return size <= MAX_ITEMS

    def apply(self, delta: Delta) -> None:
        """A delta of the same incarnation with ``since <= version < delta.version``: now at ``delta.version``."""
        version = delta.version
        for name, value in delta.fields.items():
            self.fields[name] = value
            self._stamp(_FIELD, name, version)
        for section, items in delta.items.items():
            part = self.sections.setdefault(section, {})
            for key, value in items.items():
                part[key] = value
                self._stamp(section, key, version)
        for section, keys in delta.deleted.items():
            part = self.sections.get(section, {})
            for key in keys:
                part.pop(key, None)
                self._delete(section, key, version)  # also when we never had it: a peer further behind may have
        self.version, self._data = version, None
        self._prune()

    # ------------------------------------------------------------------ internals

    def _stamp(self, section: str, key: str, version: int) -> None:
        # Re-inserted so that the log stays in version order: a delta reads it from the newest back.
        self._stamps.pop((section, key), None)
        self._stamps[section, key] = version
        self._deleted.pop((section, key), None)

    def _delete(self, section: str, key: str, version: int) -> None:
        self._stamps.pop((section, key), None)
        self._deleted.pop((section, key), None)
        self._deleted[section, key] = version

    def _prune(self) -> None:
        oldest = self.version - KEEP_VERSIONS
        while self._deleted:
            key, version = next(iter(self._deleted.items()))
            if version > oldest and len(self._deleted) <= MAX_MARKERS:
                break
            del self._deleted[key]
            self.horizon = max(self.horizon, version)

    def _forget_history(self) -> None:
        self.horizon = self.version
        self._stamps.clear()
        self._deleted.clear()


def split(data: dict[str, Any], sections: Collection[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Our own data as (fields, sections); ValueError if peers would refuse it (they check the same)."""
    _check(isinstance(data, dict) and len(data) <= MAX_FIELDS + len(sections), "an entry is not a dict of at most 256 fields")
    fields: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {}
    for name, value in data.items():
        _check(isinstance(name, str), "an entry's field name is not a str")
        if name in sections:
            _check(isinstance(value, dict) and all(map(_is_key, value)), f"section {name!r} is not a dict keyed by strs")
            parts[name] = value
        else:
            fields[name] = value
    _check(sum(map(len, parts.values())) <= MAX_ITEMS, "an entry has more than 100000 items")
    return fields, parts


def parse(raw: Any, sections: Collection[str]) -> Delta:
    """One wire delta, checked whole; ValueError if anything in it is wrong."""
    _check(isinstance(raw, list | tuple) and len(raw) == 7, "a delta is not [node, incarnation, from, to, fields, items, deleted]")
    node_id, incarnation, since, version, fields, items, deleted = raw
    _check(_is_id(node_id), "a delta's node id is not a short str")
    _check(all(map(_is_int, (incarnation, since, version))), "a delta's incarnation, from or to is not an int in range")
    _check(since < version, "a delta's from is not below its to")
    _check(
        isinstance(fields, dict) and len(fields) <= MAX_FIELDS and all(isinstance(n, str) and n not in sections for n in fields),
        "a delta's fields are not a dict of at most 256 names that are not sections",
    )
    _check(isinstance(items, dict) and isinstance(deleted, dict), "a delta's items or deletions are not dicts")
    count = 0
    for section, part in items.items():
        _check(section in sections and isinstance(part, dict), "a delta's items are not {section: {key: value}}")
        _check(all(map(_is_key, part)), "an item's key is not a str of at most 1024")
        count += len(part)
    for section, keys in deleted.items():
        _check(section in sections and isinstance(keys, list), "a delta's deletions are not {section: [key, ...]}")
        _check(all(map(_is_key, keys)), "a deleted key is not a str of at most 1024")
        _check(not set(keys) & items.get(section, {}).keys(), "a delta both changes and deletes an item")
        count += len(keys)
    _check(count <= MAX_ITEMS, "a delta carries more than 100000 items")
    _check(since > 0 or not any(deleted.values()), "a full entry carries deletions")
    return Delta(node_id, incarnation, since, version, fields, items, deleted)


def _is_key(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_KEY
