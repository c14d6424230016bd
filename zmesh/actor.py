"""ActorClass, ActorHandle, ActorMethod and ``method()``: what users hold; no I/O of their own."""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from zmesh import runtime as runtime_mod
from zmesh.generator import ObjectRefGenerator
from zmesh.object_ref import ObjectRef
from zmesh.options import STREAMING, ActorOptions, MethodOptions
from zmesh.runtime import Runtime, ownership
from zmesh.transport import serialization
from zmesh.transport.ids import ActorId, new_actor_id

F = TypeVar("F", bound=Callable[..., Any])

# name -> (num_returns or "streaming", concurrency group, signature without self or None)
MethodMeta = dict[str, tuple[int | str, str | None, inspect.Signature | None]]


def current_runtime() -> Runtime:
    rt = runtime_mod.current()
    if rt is None:
        from zmesh import api

        return api.auto_init()
    return rt


def method(*, num_returns: int | str = 1, concurrency_group: str | None = None) -> Callable[[F], F]:
    """Declare options of an actor method: ``@zmesh.method(concurrency_group="io")``, ``num_returns="streaming"``."""
    opts = MethodOptions.build(num_returns=num_returns, concurrency_group=concurrency_group)

    def decorate(fn: F) -> F:
        fn._zmesh_method_options = opts  # type: ignore[attr-defined]
        return fn

    return decorate


def _methods(cls: type) -> MethodMeta:
    meta: MethodMeta = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("__") and name != "__call__":
            continue
        static = inspect.getattr_static(cls, name, None)
        if not callable(member) or isinstance(static, property):
            continue
        opts = getattr(member, "_zmesh_method_options", None) or MethodOptions()
        num_returns = opts.num_returns
        if num_returns == 1 and (inspect.isgeneratorfunction(member) or inspect.isasyncgenfunction(member)):
            num_returns = STREAMING  # a generator method streams its items, as in Ray
        meta[name] = (num_returns, opts.concurrency_group, _signature(member, static))
    return meta


def _signature(member: Any, static: Any) -> inspect.Signature | None:
    try:
        sig = inspect.signature(member)
    except (TypeError, ValueError):
        return None
    if isinstance(static, staticmethod | classmethod):
        return sig
    params = list(sig.parameters.values())[1:]
    return sig.replace(parameters=params)


def code_path() -> list[str]:
    return [os.path.abspath(p or os.curdir) for p in sys.path if isinstance(p, str)]


class ActorClass:
    """What ``@zmesh.remote`` makes of a class: ``.remote()`` creates an actor."""

    def __init__(self, cls: type, options: ActorOptions, shared: dict[str, Any] | None = None) -> None:
        self._cls = cls
        self._options = options
        # Shared across .options() copies: the class is serialized and hashed once.
        self._shared = shared if shared is not None else {}
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__
        self.__module__ = cls.__module__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"Actors cannot be instantiated directly. Instead of '{self.__name__}()', use '{self.__name__}.remote()'.")

    def __repr__(self) -> str:
        return f"ActorClass({self._cls.__module__}.{self._cls.__qualname__})"

    def options(self, **options: Any) -> ActorClass:
        """A copy with these options; raises ValueError on a bad one."""
        return ActorClass(self._cls, ActorOptions.build(self._options, **options), self._shared)

    def _class_blob(self) -> tuple[str, bytes, MethodMeta]:
        code = self._shared.get("code")
        if code is None:
            # One assignment: a thread creating its first actor of this class at the same moment sees all or none.
            blob = serialization.dumps_code(self._cls)
            code = self._shared["code"] = (hashlib.sha256(blob).hexdigest()[:32], blob, _methods(self._cls))
        return code

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        rt = current_runtime()
        opts = self._options
        key, blob, methods = self._class_blob()
        init = inspect.getattr_static(self._cls, "__init__", None)
        init_sig = _signature(init, init) if inspect.isfunction(init) else None
        if init_sig is not None:
            try:
                init_sig.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{self.__name__}.remote(): {exc}") from None
        groups = sorted(opts.concurrency_groups)
        with ownership.collect() as refs:
            args_frames = serialization.dumps_args(args, kwargs)
        meta = {"methods": methods, "max_task_retries": opts.max_task_retries, "groups": groups}
        meta_key = f"meta-{opts.max_task_retries}-{groups}"
        meta_blob = self._shared.get(meta_key)
        if meta_blob is None:
            meta_blob = self._shared[meta_key] = serialization.dumps_code(meta)
        actor_id = new_actor_id()
        spec = {
            "actor_id": actor_id,
            "class_name": self.__name__,
            "name": opts.name,
            "namespace": opts.namespace or rt.namespace,
            # The actor's own code runs in its creator's namespace, as a Ray actor runs in its job's.
            "job_namespace": rt.namespace,
            "detached": opts.lifetime == "detached",
            "get_if_exists": opts.get_if_exists,
            "resources": opts.resource_demand(),
            "max_restarts": opts.max_restarts,
            "strategy": opts.scheduling_strategy,
            "max_concurrency": opts.max_concurrency,
            "concurrency_groups": dict(opts.concurrency_groups),
            # Modules the class refers to by name must import in the worker as they do here.
            "sys_path": code_path(),
        }
        reply = rt.create_actor(actor_id, spec, key, blob, meta_blob, args_frames, wait=opts.name is not None, keep=refs)
        if reply is not None:
            actor_id, created, existing_meta = reply
            if not created:  # get_if_exists found a live actor: describe it, not our class
                return ActorHandle(actor_id, self.__name__, existing_meta)
        return ActorHandle(actor_id, self.__name__, meta_blob, meta)


class ActorHandle:
    """A reference to an actor; picklable, so it can be passed to other actors."""

    def __init__(self, actor_id: ActorId, class_name: str, meta_blob: bytes, meta: dict[str, Any] | None = None) -> None:
        self._zmesh_actor_id = actor_id
        self._zmesh_class_name = class_name
        self._zmesh_meta_blob = meta_blob
        self._zmesh_meta = meta if meta is not None else serialization.loads_code(meta_blob)

    def __getattr__(self, name: str) -> ActorMethod:
        if name.startswith("_zmesh_"):
            raise AttributeError(name)
        entry = self._zmesh_meta["methods"].get(name)
        if entry is None:
            raise AttributeError(f"'{self._zmesh_class_name}' actor has no method '{name}'")
        num_returns, group, sig = entry
        bound = ActorMethod(self, name, num_returns, group, sig)
        self.__dict__[name] = bound  # later lookups skip __getattr__
        return bound

    def __repr__(self) -> str:
        return f"Actor({self._zmesh_class_name}, {self._zmesh_actor_id})"

    def __hash__(self) -> int:
        return hash(self._zmesh_actor_id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorHandle) and other._zmesh_actor_id == self._zmesh_actor_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (ActorHandle, (self._zmesh_actor_id, self._zmesh_class_name, self._zmesh_meta_blob))


class ActorMethod:
    """``handle.method``: call it with ``.remote(...)``."""

    def __init__(
        self,
        handle: ActorHandle,
        name: str,
        num_returns: int | str,
        group: str | None,
        sig: inspect.Signature | None,
        window: int | None = None,
    ) -> None:
        self._handle = handle
        self._name = name
        self._num_returns = num_returns
        self._group = group
        self._window = window  # _generator_backpressure_num_objects, as given
        self._sig = sig
        self._arity = positional_arity(sig)
        # A group the actor does not define fails each call, naming it (it used to run in the default group).
        groups = handle._zmesh_meta.get("groups")
        undefined = group is not None and groups is not None and group not in groups
        self._group_error = _unknown_group(handle._zmesh_class_name, name, group, groups or []) if undefined else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"Actor methods cannot be called directly. Instead of '{self._name}()', use '{self._name}.remote()'.")

    def options(self, **options: Any) -> ActorMethod:
        opts = MethodOptions.build(MethodOptions(self._num_returns, self._group, self._window), **options)
        return ActorMethod(
            self._handle, self._name, opts.num_returns, opts.concurrency_group, self._sig, opts._generator_backpressure_num_objects
        )

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        if self._group_error is not None:
            raise ValueError(self._group_error)
        arity = self._arity
        if self._sig is not None and (kwargs or arity is None or not arity[0] <= len(args) <= arity[1]):
            try:
                self._sig.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{self._handle._zmesh_class_name}.{self._name}.remote(): {exc}") from None
        rt = current_runtime()
        with ownership.collect() as refs:
            args_frames = serialization.dumps_args(args, kwargs)
        handle = self._handle
        if self._num_returns == STREAMING:  # never retried: its consumer may have taken items already
            window = MethodOptions(STREAMING, None, self._window).stream_window
            oids = rt.submit_call(handle._zmesh_actor_id, self._name, args_frames, 1, self._group, 0, refs, window)
            return ObjectRefGenerator(ObjectRef(oids[0], rt.address, rt), rt)
        num_returns = self._num_returns
        assert isinstance(num_returns, int)
        oids = rt.submit_call(
            handle._zmesh_actor_id, self._name, args_frames, num_returns, self._group, handle._zmesh_meta["max_task_retries"], refs
        )
        address = rt.address
        if num_returns == 1:
            return ObjectRef(oids[0], address, rt)
        return [ObjectRef(oid, address, rt) for oid in oids]


def positional_arity(sig: inspect.Signature | None) -> tuple[int, int] | None:
    """(fewest, most) positional arguments ``sig`` takes, if it has plain positional parameters only.

    Checking a call's count against it is all ``sig.bind`` would do for such a method, at a
    fraction of the cost on the call path.
    """
    if sig is None:
        return None
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = list(sig.parameters.values())
    if not all(p.kind in plain for p in params):
        return None
    return sum(1 for p in params if p.default is inspect.Parameter.empty), len(params)


def _unknown_group(class_name: str, method_name: str, group: Any, groups: list[str]) -> str:
    defined = ", ".join(repr(g) for g in groups) or "none"
    return (
        f"{class_name}.{method_name} uses concurrency group {group!r}, which the actor does not define "
        f"(defined: {defined}; declare it with .options(concurrency_groups={{{group!r}: N}}))"
    )
