"""Serialization: plain pickle for envelopes, cloudpickle for code, protocol 5 out-of-band buffers.

This is the only module that unpickles bytes received from another process.
"""

from __future__ import annotations

import io
import pickle
import threading
from typing import Any, Protocol

import cloudpickle

# Builtin types that plain pickle ships correctly by value; anything else may
# reference a class from the driver's __main__, which only cloudpickle can ship.
_PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None), complex})
# Values at least this large travel as their own frames, so zmq sends them without a copy.
_OOB_THRESHOLD = 64 * 1024


_unpickling = threading.RLock()


class SegmentStore(Protocol):
    """This process's end of its node's shared-memory store (``runtime/segments.py``)."""

    threshold: int

    def write(self, frames: list[Any]) -> list[Any] | None:
        """Put ``frames`` in a new segment; returns the one descriptor frame that stands for them (None: not now)."""
        ...

    def read(self, descriptor: Any) -> tuple[list[Any], Any]:
        """The frames a descriptor stands for, mapped, and what must stay alive while they are read."""
        ...

    def adopt(self, frames: list[Any]) -> Any:
        """What keeps a segment written for this process alive (None if it was not written for us)."""
        ...

    def inline(self, value: Any) -> list[Any] | None:
        """For a top-level call argument: the descriptor to send in its place (a ref to our own value in the store)."""
        ...


# Set by the process's runtime once it knows its node (one runtime per process). Module state, not a parameter:
# values are pickled deep inside cloudpickle and user code, and every path that makes frames would carry it.
_store: SegmentStore | None = None


def use_store(store: SegmentStore | None) -> None:
    global _store
    _store = store


def current_store() -> SegmentStore | None:
    return _store


def is_descriptor(frames: list[Any]) -> bool:
    """Whether a value's frames are a shared-memory descriptor (``S``) rather than the value itself."""
    if len(frames) != 1:
        return False
    first = frames[0]
    # Every result passes here (objects.complete_locked): bytes, the usual frame, without a memoryview.
    return first[:1] == b"S" if type(first) is bytes else bytes(memoryview(first)[:1]) == b"S"


def read_descriptor(frames: list[Any]) -> tuple[list[Any], Any]:
    """The mapped frames behind a descriptor, and what keeps them readable (see ``SegmentStore.read``)."""
    if _store is None:
        raise DeserializationError("a shared-memory value arrived in a process without an object store")
    return _store.read(frames[0])


def adopt(frames: list[Any] | None) -> Any:
    """The hold on a segment written for this process (a result, an item), to keep with its entry; else None."""
    if frames is None or len(frames) != 1 or _store is None or not is_descriptor(frames):
        return None
    return _store.adopt(frames)


class SerializationError(TypeError):
    """A value could not be serialized; names the value that failed."""


class DeserializationError(Exception):
    """Received bytes could not be turned back into a value."""


def dumps_header(header: tuple[Any, ...]) -> bytes:
    return pickle.dumps(header, protocol=5)


class _BuiltinsOnly(pickle.Unpickler):
    """Headers hold builtin values only: naming any class or function is refused, so a header cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise DeserializationError(f"headers may not refer to {module}.{name}")


def loads_header(data: bytes) -> tuple[Any, ...]:
    try:
        header = _BuiltinsOnly(io.BytesIO(data)).load()
    except Exception as exc:  # any garbage must turn into one error type
        raise DeserializationError(f"undecodable header: {exc}") from None
    if not isinstance(header, tuple):
        raise DeserializationError("header is not a tuple")
    return header


def dumps_code(obj: Any) -> bytes:
    """Pickle a class or function by value so the receiver needs none of the sender's modules."""
    try:
        blob: bytes = cloudpickle.dumps(obj, protocol=5)
        return blob
    except Exception as exc:
        raise SerializationError(f"cannot serialize {obj!r}: {exc}") from exc


def loads_code(data: bytes) -> Any:
    try:
        return pickle.loads(data)
    except Exception as exc:
        raise DeserializationError(f"cannot load shipped code: {exc}") from exc


def _is_plain(value: Any) -> bool:
    kind = type(value)
    if kind is bytes or kind is str:
        return len(value) < _OOB_THRESHOLD
    if kind in _PLAIN_TYPES:
        return True
    if kind is tuple or kind is list:
        return len(value) < 64 and all(_is_small_atom(v) for v in value)
    if kind is dict:
        return len(value) < 64 and all(_is_small_atom(k) and _is_small_atom(v) for k, v in value.items())
    return False


def _is_small_atom(value: Any) -> bool:
    kind = type(value)
    return kind in _PLAIN_TYPES and (kind not in (bytes, str) or len(value) < 1024)


def dumps_value(value: Any) -> list[Any]:
    """Frames for one value: ``[pickle stream, *out-of-band buffers]``."""
    store = _store
    if type(value) is bytes and len(value) >= _OOB_THRESHOLD:
        stored = store.write([b"B", value]) if store is not None and len(value) >= store.threshold else None
        return stored if stored is not None else [b"B", value]
    if _is_plain(value):
        return [pickle.dumps(value, protocol=5)]
    buffers: list[Any] = []

    def keep_large(buf: pickle.PickleBuffer) -> bool:
        try:
            raw = buf.raw()
        except BufferError:
            return True  # not contiguous: pickled in-band, which copies it once (docs/objects.md)
        if raw.nbytes < _OOB_THRESHOLD:
            return True
        buffers.append(raw)
        return False

    stream = io.BytesIO()
    try:
        cloudpickle.CloudPickler(stream, protocol=5, buffer_callback=keep_large).dump(value)
    except Exception as exc:
        raise SerializationError(f"cannot serialize {_describe(value)}: {exc}") from exc
    head = stream.getvalue()
    if store is not None and len(head) + sum(b.nbytes for b in buffers) >= store.threshold:
        # Written once, into shared memory, before this returns: the segment is the snapshot.
        stored = store.write([head, *buffers])
        if stored is not None:
            return stored
    # A value is a snapshot of the moment it was passed: copy what its owner could still
    # change (a numpy array, a bytearray); immutable bytes travel without a copy.
    return [head, *(raw if type(raw.obj) is bytes else bytes(raw) for raw in buffers)]


def loads_value(frames: list[Any]) -> Any:
    if not frames:
        raise DeserializationError("value has no frames")
    if is_descriptor(frames):
        # ``_keep`` holds the segment until this returns; the views the value keeps hold the mapping after.
        frames, _keep = read_descriptor(frames)
    head = frames[0]
    if len(frames) == 2 and head == b"B":
        return bytes(frames[1])
    try:
        # Read-only views: every get of one object shares its frames, so no reader may change them (as Ray's store).
        # One thread at a time: unpickling imports modules (numpy on first use), and two threads importing a
        # C extension at once can fail with _DeadlockError in a threaded actor.
        with _unpickling:
            return pickle.loads(head, buffers=[memoryview(f).toreadonly() for f in frames[1:]])
    except Exception as exc:
        raise DeserializationError(f"cannot deserialize value: {exc!r}") from exc


def dumps_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """Frames for call arguments.

    No arguments: no frames. Only small builtin values: one pickle of
    ``(args, kwargs)``. Otherwise a layout frame, then each argument's own
    frames, so a failure names the argument and large ones travel apart.
    """
    if not args and not kwargs:
        return []
    if all(_is_plain(v) for v in args) and all(_is_plain(v) for v in kwargs.values()):
        return [b"P" + pickle.dumps((args, kwargs), protocol=5)]
    layout: list[tuple[str | None, int]] = []
    frames: list[Any] = []
    for index, value in enumerate(args):
        part = _dump_arg(value, f"argument {index}")
        layout.append((None, len(part)))
        frames.extend(part)
    for name, value in kwargs.items():
        part = _dump_arg(value, f"keyword argument {name!r}")
        layout.append((name, len(part)))
        frames.extend(part)
    return [b"L" + pickle.dumps(layout, protocol=5), *frames]


def _dump_arg(value: Any, what: str) -> list[Any]:
    store = _store
    if store is not None:
        inlined = store.inline(value)
        if inlined is not None:
            return inlined
    try:
        return dumps_value(value)
    except SerializationError as exc:
        raise SerializationError(f"could not serialize {what} ({_describe(value)}): {exc.__cause__ or exc}") from None


def loads_args(frames: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    if not frames:
        return [], {}
    head = bytes(frames[0])
    try:
        with _unpickling:
            decoded = pickle.loads(head[1:])
    except Exception as exc:
        raise DeserializationError(f"undecodable arguments: {exc}") from None
    if head[:1] == b"P":
        args, kwargs = decoded
        return list(args), dict(kwargs)
    args_out: list[Any] = []
    kwargs_out: dict[str, Any] = {}
    pos = 1
    for name, count in decoded:
        value = loads_value(frames[pos : pos + count])
        pos += count
        if name is None:
            args_out.append(value)
        else:
            kwargs_out[name] = value
    return args_out, kwargs_out


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"
