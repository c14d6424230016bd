"""The public functions: init, shutdown, remote, get, wait, put, kill, get_actor."""

from __future__ import annotations

import atexit
import dataclasses
import inspect
import logging
import operator
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, overload

from zmesh import runtime as runtime_mod
from zmesh.actor import ActorClass, ActorHandle
from zmesh.exceptions import NodeUnavailableError
from zmesh.generator import ObjectRefGenerator
from zmesh.object_ref import ObjectRef
from zmesh.options import WINDOW_OPTION, ActorOptions, TaskOptions, validate_name, validate_resources
from zmesh.remote_function import RemoteFunction
from zmesh.runtime import Runtime
from zmesh.transport import rundir, sockets
from zmesh.transport.security import INSECURE_ENV, KEY_ENV, Security, resolve_key

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "default"

_lock = threading.RLock()
_embedded: Any = None  # the in-process node started by init(), if any
_atexit_registered = False


def _reset_after_fork() -> None:
    # The parent's embedded node is not ours, and another thread may have held the lock at the fork.
    global _lock, _embedded
    _lock = threading.RLock()
    _embedded = None


os.register_at_fork(after_in_child=_reset_after_fork)


def _parse_address(address: str) -> str:
    text = address.strip()
    if text.startswith("tcp://"):
        text = text[len("tcp://") :]
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address must be 'host:port', 'auto' or None, got {address!r}")
    return f"tcp://{host}:{port}"


def _local_node() -> tuple[str | None, dict[str, Any]]:
    """The address of the node to use when none is given, and what its run-directory record says."""
    if os.environ.get("ZMESH_ADDRESS"):
        return _parse_address(os.environ["ZMESH_ADDRESS"]), {}
    info = rundir.read_node_info()
    return (info["address"], info) if info else (None, {})


def _client_security(address: str, cluster_key: str | None, info: dict[str, Any]) -> Security:
    """The key a driver presents: the one given, else the local node's, else this user's."""
    if os.environ.get(INSECURE_ENV) == "1" or info.get("insecure"):
        if sockets.local_address_towards(address) != "127.0.0.1":
            raise ValueError(f"an insecure connection is allowed on loopback only, not to {address}")
        return Security(None)
    key, _ = resolve_key(cluster_key if cluster_key is not None else (os.environ.get(KEY_ENV) or info.get("key_file")))
    return Security(key)


def init(
    address: str | None = None,
    *,
    namespace: str | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    resources: dict[str, float] | None = None,
    object_store_memory: int | None = None,
    ignore_reinit_error: bool = False,
    connect_timeout: float = 5.0,
    cluster_key: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Connect this process to zmesh.

    ``address=None``: the node running on this host, or else a new embedded node
    (loopback only, stopped at exit). ``"auto"``: the node running on this host.
    ``"host:port"``: that node. ``cluster_key``: the key file of the cluster
    (default: ``$ZMESH_CLUSTER_KEY_FILE``, the local node's, or this user's own
    key, made on first use). ``object_store_memory``: bytes of shared memory for
    large objects on a new local node (default 30% of RAM). Returns a description of the node.
    """
    global _embedded, _atexit_registered
    with _lock:
        rt = runtime_mod.current()
        if rt is not None:
            if ignore_reinit_error:
                return dict(rt.node_info)
            raise RuntimeError(
                "zmesh.init() was already called in this process; call zmesh.shutdown() first or pass ignore_reinit_error=True"
            )
        ns = validate_name(namespace, "namespace") if namespace is not None else DEFAULT_NAMESPACE
        custom = validate_resources(resources)
        node_address: str | None
        info: dict[str, Any] = {}
        key_path = os.fspath(cluster_key) if cluster_key is not None else None
        if address in (None, "auto"):
            node_address, info = _local_node()
            if node_address is None and address == "auto":
                raise NodeUnavailableError("address='auto' but no zmesh node is running on this host; start one with `zmesh node`")
        elif address == "local":
            node_address = None
        elif isinstance(address, str):
            node_address = _parse_address(address)
        else:
            raise ValueError(f"address must be a str or None, got {type(address).__name__}")
        if node_address is not None and (num_cpus is not None or num_gpus is not None or resources or object_store_memory):
            raise ValueError(
                "num_cpus, num_gpus, resources and object_store_memory describe a new local node; "
                "they cannot be given when connecting to a running one"
            )
        if node_address is None:
            from zmesh.node.config import NodeConfig
            from zmesh.node.daemon import Node

            config = NodeConfig.from_env(
                num_cpus=num_cpus,
                num_gpus=num_gpus or 0,
                resources=custom,
                **({"object_store_memory": object_store_memory} if object_store_memory is not None else {}),
                advertise=False,
                cluster_key=key_path,
                insecure=os.environ.get(INSECURE_ENV) == "1",
            )
            node = Node(config)
            node.start()
            _embedded = node
            node_address = node.address
            security = node.security
        else:
            security = _client_security(node_address, key_path, info)
        try:
            rt = Runtime(node_address, kind="driver", namespace=ns, connect_timeout=connect_timeout, security=security)
        except BaseException:
            _stop_embedded()
            raise
        runtime_mod.set_current(rt)
        if not _atexit_registered:
            atexit.register(shutdown)
            _atexit_registered = True
        return dict(rt.node_info)


def auto_init() -> Runtime:
    """Called by the first ``.remote()`` when nobody called ``init()``, as Ray does."""
    with _lock:
        if runtime_mod.current() is None:
            init()
        rt = runtime_mod.current()
        assert rt is not None
        return rt


def _stop_embedded() -> None:
    global _embedded
    node, _embedded = _embedded, None
    if node is not None:
        node.stop()


def is_initialized() -> bool:
    return runtime_mod.current() is not None


def shutdown() -> None:
    """Disconnect; actors this process owns (not detached) die, and an embedded node stops."""
    with _lock:
        rt = runtime_mod.current()
        runtime_mod.set_current(None)
        if rt is not None:
            rt.close()
        _stop_embedded()


def _require() -> Runtime:
    rt = runtime_mod.current()
    if rt is None:
        raise RuntimeError("zmesh is not initialized in this process; call zmesh.init() first")
    return rt


@overload
def remote(__target: type) -> ActorClass: ...  # type: ignore[overload-overlap]
@overload
def remote(__target: Callable[..., Any]) -> RemoteFunction: ...
@overload
def remote(**options: Any) -> Callable[[Any], Any]: ...
def remote(*args: Any, **options: Any) -> Any:
    """``@zmesh.remote`` or ``@zmesh.remote(**options)``: a class becomes an actor class, a function a remote function."""
    if args:
        if len(args) != 1 or options:
            raise TypeError("use @zmesh.remote or @zmesh.remote(option=value, ...)")
        return _make_remote(args[0], ActorOptions(), TaskOptions(), set())
    # Checked now, before the target is known: a bad option fails at the decorator, as in Ray.
    actor_keys = {f.name for f in dataclasses.fields(ActorOptions)}
    task_keys = {f.name for f in dataclasses.fields(TaskOptions)} - {"generator_window"} | {WINDOW_OPTION}
    unknown = sorted(set(options) - actor_keys - task_keys)
    if unknown:
        valid = ", ".join(sorted(actor_keys | task_keys))
        raise ValueError(f"unknown option(s): {', '.join(unknown)}; valid options are {valid}")
    actor_opts = ActorOptions.build(**{k: v for k, v in options.items() if k in actor_keys})
    task_opts = TaskOptions.build(**{k: v for k, v in options.items() if k in task_keys})
    return lambda target: _make_remote(target, actor_opts, task_opts, set(options))


def _make_remote(target: Any, actor_opts: ActorOptions, task_opts: TaskOptions, given: set[str]) -> ActorClass | RemoteFunction:
    if inspect.isclass(target):
        _only(given, {f.name for f in dataclasses.fields(ActorOptions)}, f"actor class {target.__name__}")
        return ActorClass(target, actor_opts)
    if callable(target):
        task_keys = {f.name for f in dataclasses.fields(TaskOptions)} | {WINDOW_OPTION}
        _only(given, task_keys, f"remote function {getattr(target, '__name__', target)!r}")
        return RemoteFunction(target, task_opts)
    raise TypeError(f"@zmesh.remote expects a class or a function, got {type(target).__name__}")


def _only(given: set[str], valid: set[str], what: str) -> None:
    wrong = sorted(given - valid)
    if wrong:
        raise ValueError(f"option(s) {', '.join(wrong)} do not apply to {what}; valid options are {', '.join(sorted(valid))}")


def cancel(ref: ObjectRef | ObjectRefGenerator, *, force: bool = False, recursive: bool = True) -> None:
    """Cancel the task behind ``ref``: a pending one never runs, a running one is interrupted (``force``: its worker
    is killed); ``get`` then raises TaskCancelledError. A finished task is left as it is."""
    if isinstance(ref, ObjectRefGenerator):
        ref._cancel()  # the producer stops at its next item
        ref = ref.completed()
    if not isinstance(ref, ObjectRef):
        raise TypeError(f"zmesh.cancel() expects an ObjectRef or ObjectRefGenerator, got {type(ref).__name__}")
    _require().cancel(ref.id, bool(force), bool(recursive))


def _check_refs(value: Any, what: str) -> tuple[list[ObjectRef], bool]:
    if isinstance(value, ObjectRef):
        return [value], True
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            if not isinstance(item, ObjectRef):
                raise TypeError(f"{what} expects ObjectRefs, but item {i} is {type(item).__name__} {item!r:.60}")
        return list(value), False
    raise TypeError(f"{what} expects an ObjectRef or a list of ObjectRefs, got {type(value).__name__} {value!r:.60}")


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0):
        raise ValueError(f"timeout must be None or a number >= 0, got {timeout!r}")


def get(refs: ObjectRef | Sequence[ObjectRef], *, timeout: float | None = None) -> Any:
    """The value(s) behind ``refs``; raises the remote error, or GetTimeoutError."""
    items, single = _check_refs(refs, "zmesh.get()")
    _check_timeout(timeout)
    values = _require().get([(r.id, r.owner) for r in items], timeout)
    return values[0] if single else values


_ref_id = operator.attrgetter("id")


class _Refs(list[ObjectRef]):
    """The not-ready list ``wait`` returns: it remembers that its refs were checked.

    Draining with ``while refs: done, refs = wait(refs)`` passes this list straight
    back, so its items need no second check: without this, every call re-checks the
    whole list and draining n refs costs O(n^2) Python steps. A list changed in
    place since is checked again (its length no longer matches).
    """

    __slots__ = ("checked",)
    checked: int


def wait(
    refs: Sequence[ObjectRef], *, num_returns: int = 1, timeout: float | None = None, fetch_local: bool = True
) -> tuple[list[ObjectRef], list[ObjectRef]]:
    """Split ``refs`` into (ready, not ready) once ``num_returns`` are ready or ``timeout`` passes.

    ``ready`` keeps the order of ``refs``. Draining with ``while refs: done, refs = wait(refs)``
    stays fast: checks over the whole list run at C speed, and the scan for ready refs stops
    at the ``num_returns``-th one.
    """
    if isinstance(refs, ObjectRef):
        raise TypeError("zmesh.wait() expects a list of ObjectRefs, not a single ObjectRef")
    if not isinstance(refs, list | tuple):
        raise TypeError(f"zmesh.wait() expects a list of ObjectRefs, got {type(refs).__name__} {refs!r:.60}")
    items: Sequence[ObjectRef] = refs
    _check_timeout(timeout)
    if isinstance(num_returns, bool) or not isinstance(num_returns, int) or not 1 <= num_returns <= max(len(items), 1):
        raise ValueError(f"num_returns must be an int between 1 and len(refs)={len(items)}, got {num_returns!r}")
    if type(items) is not _Refs or items.checked != len(items):
        if not set(map(type, items)) <= {ObjectRef}:
            _check_refs(list(items), "zmesh.wait()")  # raises, naming the first item that is not a ref
        if len(set(map(_ref_id, items))) != len(items):
            raise ValueError("zmesh.wait() got the same ObjectRef more than once")
    if not items:
        return [], []
    rt = _require()
    ready_at = rt.objects.first_done(map(_ref_id, items), num_returns)
    if len(ready_at) < num_returns:
        entries = rt.entries_for([(r.id, r.owner) for r in items])
        rt.wait_done(entries, num_returns, timeout)
        ready_at = [i for i, entry in enumerate(entries) if entry.done][:num_returns]
    ready = [items[i] for i in ready_at]
    not_ready = _Refs()
    start = 0
    for i in ready_at:
        not_ready += items[start:i]
        start = i + 1
    not_ready += items[start:]
    not_ready.checked = len(not_ready)
    return ready, not_ready


def put(value: Any) -> ObjectRef:
    """Store ``value`` in this process and return a reference other processes can fetch."""
    if isinstance(value, ObjectRef):
        raise TypeError("zmesh.put() of an ObjectRef is not allowed; pass the ref itself")
    rt = _require()
    return ObjectRef(rt.put(value), rt.address, rt)


# How long kill and get_actor wait for the node (they only ask it; a live node answers in microseconds).
NODE_TIMEOUT_S = 30.0


def kill(actor: ActorHandle, *, no_restart: bool = True, timeout: float = NODE_TIMEOUT_S) -> None:
    """Kill the actor's worker now. With ``no_restart=False`` it restarts if it has restarts left.

    NodeUnavailableError if the node does not answer within ``timeout`` seconds.
    """
    if not isinstance(actor, ActorHandle):
        raise TypeError(f"zmesh.kill() expects an actor handle, got {type(actor).__name__}")
    _check_timeout(timeout)
    _require().request("kill", (actor._zmesh_actor_id, bool(no_restart)), timeout=timeout)


def get_actor(name: str, namespace: str | None = None, *, timeout: float = NODE_TIMEOUT_S) -> ActorHandle:
    """A handle to the live actor with this name; ValueError if there is none.

    NodeUnavailableError if the node does not answer within ``timeout`` seconds.
    """
    validate_name(name, "actor name")
    _check_timeout(timeout)
    rt = _require()
    ns = validate_name(namespace, "namespace") if namespace is not None else rt.namespace
    actor_id, class_name, meta_blob = rt.request("lookup", (ns, name), timeout=timeout)
    return ActorHandle(actor_id, class_name, meta_blob)


def get_gpu_ids() -> list[int]:
    """The GPU ids this actor's worker was given (from CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [int(x) for x in visible.split(",") if x.strip().isdigit()]


def _status() -> dict[str, Any]:
    """The connected node's status (its actors, resources and the members it knows)."""
    status: dict[str, Any] = _require().request("status")
    return status
