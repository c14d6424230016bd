"""Errors zmesh raises, under one root.

::

    ZmeshError
     ├── TaskError               remote code raised; also an instance of the user's exception class
     ├── ActorError
     │    ├── ActorDiedError     the actor is dead and will not come back
     │    └── ActorUnavailableError  the call was lost with a worker that is being restarted
     ├── GetTimeoutError         also a TimeoutError
     ├── ActorAlreadyExistsError also a ValueError
     ├── ObjectLostError         the owner of an object is gone
     ├── ObjectStoreFullError    a large value does not fit in its node's shared-memory store
     ├── TaskCancelledError      the task was cancelled with zmesh.cancel()
     ├── WorkerCrashedError      the task's worker died and no retry was left
     └── NodeUnavailableError    also a ConnectionError: no node answered
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ActorAlreadyExistsError",
    "ActorDiedError",
    "ActorError",
    "ActorUnavailableError",
    "GetTimeoutError",
    "NodeUnavailableError",
    "ObjectLostError",
    "ObjectStoreFullError",
    "TaskCancelledError",
    "TaskError",
    "WorkerCrashedError",
    "ZmeshError",
]


class ZmeshError(Exception):
    """Root of every error zmesh raises itself."""


class ActorError(ZmeshError):
    """A call could not run because of its actor's state."""


class ActorDiedError(ActorError):
    """The actor is dead: killed, out of restarts, its owner gone, or its ``__init__`` raised."""


class ActorUnavailableError(ActorError):
    """The worker hosting the actor died while this call was in flight; the actor is restarting."""


class GetTimeoutError(ZmeshError, TimeoutError):
    """``get`` or ``wait`` ran past its timeout."""


class ActorAlreadyExistsError(ZmeshError, ValueError):
    """An actor with that name already exists in that namespace."""


class ObjectLostError(ZmeshError):
    """The value behind an ObjectRef can no longer be fetched (its owner exited)."""


class ObjectStoreFullError(ZmeshError):
    """A large value does not fit in its node's object store (``--object-store-memory``); the message gives the sizes."""


class TaskCancelledError(ZmeshError):
    """The task was cancelled with ``zmesh.cancel()`` before it finished."""


class WorkerCrashedError(ZmeshError):
    """The worker running the task died (or its node did), and the task had no retry left."""


class NodeUnavailableError(ZmeshError, ConnectionError):
    """No zmesh node answered at the address given."""


class TaskError(ZmeshError):
    """The remote code raised. ``get`` raises an instance that is also of the user's class.

    ``cause`` is the original exception where it could be rebuilt,
    ``remote_traceback`` the formatted traceback from the worker.
    """

    cause: BaseException | None
    remote_traceback: str
    function_name: str

    def __init__(self, message: str, cause: BaseException | None = None, remote_traceback: str = "", function_name: str = "") -> None:
        Exception.__init__(self, message)
        self.cause = cause
        self.remote_traceback = remote_traceback
        self.function_name = function_name

    def __str__(self) -> str:
        head = super().__str__() if self.args else ""
        if self.remote_traceback:
            return f"{head}\n\nRemote traceback ({self.function_name}):\n{self.remote_traceback}".rstrip()
        return head

    def __reduce__(self) -> Any:
        # The dynamic subclass cannot be pickled by name; rebuild it from its parts.
        return (
            _rebuild_task_error,
            (_pickle_cause(self.cause), self.args[0] if self.args else "", self.remote_traceback, self.function_name),
        )

    @classmethod
    def from_cause(cls, cause: BaseException | None, message: str, remote_traceback: str, function_name: str) -> TaskError:
        """A TaskError that is also an instance of ``type(cause)``, so ``except UserError`` still works."""
        if cause is None or isinstance(cause, TaskError):
            if isinstance(cause, TaskError):
                return cause
            return cls(message, None, remote_traceback, function_name)
        user_cls = type(cause)
        try:
            combined = _combined_class(user_cls)
            # No __init__ runs: the user's may need arguments we do not have; copy its state instead.
            err: TaskError = BaseException.__new__(combined)
            err.__dict__.update(getattr(cause, "__dict__", {}))
        except TypeError:
            # Classes with an incompatible layout (some C types) cannot be mixed in.
            return cls(message, cause, remote_traceback, function_name)
        err.args = (message,)
        err.cause = cause
        err.remote_traceback = remote_traceback
        err.function_name = function_name
        return err


_COMBINED: dict[type, type] = {}


def _combined_class(user_cls: type) -> type:
    combined = _COMBINED.get(user_cls)
    if combined is None:
        combined = type(f"TaskError({user_cls.__name__})", (TaskError, user_cls), {"__module__": __name__})
        _COMBINED[user_cls] = combined
    return combined


def _pickle_cause(cause: BaseException | None) -> bytes | None:
    if cause is None:
        return None
    from zmesh.transport import serialization

    # Class, args and state, not the exception itself: unpickling an exception calls its
    # __init__ with its args, which fails for classes whose __init__ takes other arguments.
    try:
        return serialization.dumps_code((type(cause), cause.args, getattr(cause, "__dict__", {})))
    except serialization.SerializationError:
        return None


def _rebuild_task_error(cause_blob: bytes | None, message: str, remote_traceback: str, function_name: str) -> TaskError:
    cause = None
    if cause_blob is not None:
        from zmesh.transport import serialization

        try:
            user_cls, args, state = serialization.loads_code(cause_blob)
            cause = BaseException.__new__(user_cls)
            cause.args = args
            cause.__dict__.update(state)
        except (serialization.DeserializationError, TypeError, ValueError):
            cause = None  # the class is not importable here: keep the text only
    return TaskError.from_cause(cause, message, remote_traceback, function_name)
