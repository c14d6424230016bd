"""RemoteFunction: what ``@zmesh.remote`` makes of a function; ``f.remote(...)`` submits a task. No I/O of its own."""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

from zmesh.actor import code_path, current_runtime, positional_arity
from zmesh.generator import ObjectRefGenerator
from zmesh.object_ref import ObjectRef
from zmesh.options import STREAMING, MethodOptions, TaskOptions
from zmesh.runtime import ownership
from zmesh.runtime.task_calls import Task
from zmesh.transport import serialization


class RemoteFunction:
    """A remote function: ``f.remote(*args)`` runs ``f`` in a pooled worker of some node and returns ObjectRef(s)."""

    def __init__(self, fn: Any, options: TaskOptions, shared: dict[str, Any] | None = None) -> None:
        self._fn = fn
        self._options = options
        # Shared across .options() copies: the function is pickled and hashed once.
        self._shared = shared if shared is not None else {}
        self.__name__ = getattr(fn, "__name__", "function")
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)
        self.__doc__ = fn.__doc__
        self.__module__ = getattr(fn, "__module__", None)  # type: ignore[assignment]
        self._name = options.name or self.__qualname__
        try:
            self._sig: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):
            self._sig = None
        self._arity = positional_arity(self._sig)
        demand = options.resource_demand()
        strategy = options.scheduling_strategy
        self._demand = demand
        self._strategy = strategy
        self._shape = (tuple(sorted(demand.items())), repr(strategy))
        self._options_wire = {"name": self._name}
        # A generator function streams its items, as in Ray 2.60, unless it declared how many values it returns.
        generates = inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)
        self._streaming = options.num_returns == STREAMING or (generates and options.num_returns == 1)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"Remote functions cannot be called directly. Instead of '{self.__name__}()', use '{self.__name__}.remote()'.")

    def __repr__(self) -> str:
        return f"RemoteFunction({self.__module__}.{self.__qualname__})"

    def options(self, **options: Any) -> RemoteFunction:
        """A copy with these options; raises ValueError on a bad one."""
        return RemoteFunction(self._fn, TaskOptions.build(self._options, **options), self._shared)

    def _blob(self) -> tuple[str, bytes, list[str]]:
        """(key, pickled function, import path), made once; one assignment, so a thread racing us sees all or none."""
        code = self._shared.get("code")
        if code is None:
            try:
                blob = serialization.dumps_code(self._fn)
            except serialization.SerializationError as exc:
                raise TypeError(f"remote function {self.__qualname__!r} cannot be pickled: {exc.__cause__ or exc}") from None
            # Modules the function refers to by name must import in the worker as they do here.
            code = self._shared["code"] = ("f" + hashlib.sha256(blob).hexdigest()[:32], blob, code_path())
        return code

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        arity = self._arity
        if self._sig is not None and (kwargs or arity is None or not arity[0] <= len(args) <= arity[1]):
            try:
                self._sig.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{self.__qualname__}.remote(): {exc}") from None
        rt = current_runtime()
        key, blob, path = self._blob()
        opts = self._options
        with ownership.collect() as refs:
            frames = serialization.dumps_args(args, kwargs)
        deps = [(a.id, a.owner) for a in args if type(a) is ObjectRef]
        if kwargs:
            deps += [(v.id, v.owner) for v in kwargs.values() if type(v) is ObjectRef]
        streaming = self._streaming
        returns = 1 if streaming else int(opts.num_returns)
        oids = tuple(rt.new_object_id() for _ in range(max(1, returns)))
        wire = self._options_wire
        if streaming:
            window = MethodOptions(STREAMING, None, opts.generator_window).stream_window
            wire = {**wire, "window": window}
            rt.streams.open(oids[0], window)
        task = Task(
            oids=oids,
            fn_key=key,
            fn_blob=blob,
            name=self._name,
            frames=frames,
            options=wire,
            shape=self._shape,
            # A stream's items went out as they were made: run again, it would send them twice. It is never retried.
            retries=0 if streaming else opts.max_retries,
            retry_exceptions=opts.retry_exceptions,
            keep=refs or None,
            deps=[],
            path=path,
        )
        rt.submit_task(task, deps, self._demand, self._strategy)
        if returns == 1:
            ref = ObjectRef(oids[0], rt.address, rt)
            return ObjectRefGenerator(ref, rt) if streaming else ref
        out = [ObjectRef(oid, rt.address, rt) for oid in oids]
        if returns == 0:
            return None  # its ref is dropped here: the task still runs, its result is freed when it comes
        return out
