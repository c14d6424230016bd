"""Actor and method options: keyword-only, validated once into frozen records."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

_MAX_NAME = 256


def validate_name(value: Any, what: str) -> str:
    """A non-empty printable name; raises ValueError naming ``what`` otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, got {type(value).__name__} {value!r}")
    if not value or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > _MAX_NAME:
        raise ValueError(f"{what} is {len(value)} characters long; at most {_MAX_NAME} are allowed")
    if not value.isprintable():
        raise ValueError(f"{what} {value!r} contains non-printable characters")
    return value


def _amount(value: Any, what: str, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    if integer and value != int(value):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return float(value)


def _count(value: Any, what: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


def validate_resources(value: Any, what: str = "resources") -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a dict of name -> amount, got {type(value).__name__}")
    out: dict[str, float] = {}
    for key, amount in value.items():
        validate_name(key, f"{what} key")
        if key in ("CPU", "GPU", "memory"):
            raise ValueError(f"{what} must not contain {key!r}; use num_cpus / num_gpus / memory")
        out[key] = _amount(amount, f"{what}[{key!r}]")
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class ActorOptions:
    name: str | None = None
    namespace: str | None = None
    lifetime: str | None = None
    get_if_exists: bool = False
    num_cpus: float = 0.0
    num_gpus: float = 0.0
    memory: float = 0.0
    resources: Mapping[str, float] = dataclasses.field(default_factory=dict)
    max_concurrency: int | None = None
    concurrency_groups: Mapping[str, int] = dataclasses.field(default_factory=dict)
    max_restarts: int = 0
    max_task_retries: int = 0
    # Kept as the node reads it: "DEFAULT", "SPREAD" or [NODE_AFFINITY, node id, soft].
    scheduling_strategy: Any = "DEFAULT"

    @classmethod
    def build(cls, base: ActorOptions | None = None, **options: Any) -> ActorOptions:
        """Validate ``options`` over ``base``; raises ValueError naming the bad option."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"unknown actor option(s): {', '.join(unknown)}; valid options are {', '.join(sorted(fields))}")
        merged = dataclasses.asdict(base) if base is not None else {}
        merged.update(options)
        return cls(**_validated(merged))

    def resource_demand(self) -> dict[str, float]:
        demand = {"CPU": self.num_cpus, "GPU": self.num_gpus, "memory": self.memory}
        demand.update(self.resources)
        return {k: v for k, v in demand.items() if v > 0}


def _validated(o: dict[str, Any]) -> dict[str, Any]:
    out = dict(o)
    if o.get("name") is not None:
        out["name"] = validate_name(o["name"], "actor name")
    if o.get("namespace") is not None:
        out["namespace"] = validate_name(o["namespace"], "namespace")
    if o.get("lifetime") not in (None, "detached", "non_detached"):
        raise ValueError(f'lifetime must be None or "detached", got {o["lifetime"]!r}')
    if o.get("lifetime") == "non_detached":
        out["lifetime"] = None
    out["get_if_exists"] = bool(o.get("get_if_exists", False))
    if out["get_if_exists"] and out.get("name") is None:
        raise ValueError("get_if_exists=True needs a name")
    for key in ("num_cpus", "num_gpus", "memory"):
        out[key] = _amount(o.get(key) or 0, key)
    if out["num_gpus"] > 1 and out["num_gpus"] != int(out["num_gpus"]):
        raise ValueError(f"num_gpus above 1 must be a whole number, got {out['num_gpus']!r}")
    out["resources"] = validate_resources(o.get("resources"))
    if o.get("max_concurrency") is not None:
        out["max_concurrency"] = _count(o["max_concurrency"], "max_concurrency", minimum=1)
    groups = o.get("concurrency_groups") or {}
    if not isinstance(groups, Mapping):
        raise ValueError(f"concurrency_groups must be a dict of group name -> limit, got {type(groups).__name__}")
    out["concurrency_groups"] = {
        validate_name(k, "concurrency group name"): _count(v, f"concurrency_groups[{k!r}]", minimum=1) for k, v in groups.items()
    }
    out["max_restarts"] = _count(o.get("max_restarts", 0), "max_restarts", minimum=-1)
    out["max_task_retries"] = _count(o.get("max_task_retries", 0), "max_task_retries", minimum=-1)
    from zmesh.util.scheduling_strategies import to_wire

    out["scheduling_strategy"] = to_wire(o.get("scheduling_strategy"))
    return out


STREAMING = "streaming"
# Items a streaming call's producer may run ahead of its consumer when the call names no window.
DEFAULT_STREAM_WINDOW = 64
_UNBOUNDED_WINDOW = 1 << 62  # _generator_backpressure_num_objects=-1, as in Ray: no back-pressure


@dataclasses.dataclass(frozen=True, slots=True)
class MethodOptions:
    num_returns: int | str = 1  # or STREAMING: the call returns an ObjectRefGenerator
    concurrency_group: str | None = None
    # How many items a streaming call's producer may run ahead of its consumer (Ray's name); None: the default.
    _generator_backpressure_num_objects: int | None = None

    @property
    def stream_window(self) -> int:
        window = self._generator_backpressure_num_objects
        return DEFAULT_STREAM_WINDOW if window is None else _UNBOUNDED_WINDOW if window == -1 else window

    @classmethod
    def build(cls, base: MethodOptions | None = None, **options: Any) -> MethodOptions:
        valid = ("_generator_backpressure_num_objects", "concurrency_group", "num_returns")
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown method option(s): {', '.join(unknown)}; valid options are {', '.join(valid)}")
        merged = dataclasses.asdict(base) if base is not None else {}
        merged.update(options)
        num_returns = merged.get("num_returns", 1)
        if num_returns != STREAMING:
            num_returns = _count(num_returns, 'num_returns (an int or "streaming")', minimum=1)
        group = merged.get("concurrency_group")
        if group is not None:
            validate_name(group, "concurrency_group")
        window = merged.get("_generator_backpressure_num_objects")
        if window is not None and window != -1:
            window = _count(window, "_generator_backpressure_num_objects (or -1: no limit)", minimum=1)
        return cls(num_returns=num_returns, concurrency_group=group, _generator_backpressure_num_objects=window)


# Ray's name for a streaming generator's window: how many items the producer may run ahead of the consumer.
WINDOW_OPTION = "_generator_backpressure_num_objects"


@dataclasses.dataclass(frozen=True, slots=True)
class TaskOptions:
    """Options of a remote function (``@zmesh.remote(...)`` on a function, ``f.options(...)``), Ray's defaults."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: float = 0.0
    resources: Mapping[str, float] = dataclasses.field(default_factory=dict)
    num_returns: int | str = 1  # an int >= 0, or "streaming"
    max_retries: int = 3
    # False, True, or the exception classes whose raising makes the task run again.
    retry_exceptions: bool | tuple[type[BaseException], ...] = False
    scheduling_strategy: Any = "DEFAULT"
    name: str | None = None
    generator_window: int | None = None  # set as _generator_backpressure_num_objects

    @classmethod
    def build(cls, base: TaskOptions | None = None, **options: Any) -> TaskOptions:
        """Validate ``options`` over ``base``; raises ValueError naming the bad option."""
        if WINDOW_OPTION in options:
            options["generator_window"] = options.pop(WINDOW_OPTION)
        fields = {f.name for f in dataclasses.fields(cls)} - {"generator_window"}
        unknown = sorted(set(options) - fields - {"generator_window"})
        if unknown:
            valid = ", ".join(sorted(fields | {WINDOW_OPTION}))
            raise ValueError(f"unknown task option(s): {', '.join(unknown)}; valid options are {valid}")
        merged = dataclasses.asdict(base) if base is not None else {}
        merged.update(options)
        return cls(**_validated_task(merged))

    def resource_demand(self) -> dict[str, float]:
        demand = {"CPU": self.num_cpus, "GPU": self.num_gpus, "memory": self.memory}
        demand.update(self.resources)
        return {k: v for k, v in demand.items() if v > 0}


def _validated_task(o: dict[str, Any]) -> dict[str, Any]:
    out = dict(o)
    for key in ("num_cpus", "num_gpus", "memory"):
        default = 1.0 if key == "num_cpus" else 0.0
        out[key] = _amount(default if o.get(key) is None else o[key], key)
    if out["num_gpus"] > 1 and out["num_gpus"] != int(out["num_gpus"]):
        raise ValueError(f"num_gpus above 1 must be a whole number, got {out['num_gpus']!r}")
    out["resources"] = validate_resources(o.get("resources"))
    returns = o.get("num_returns", 1)
    if returns not in ("streaming", "dynamic"):
        returns = _count(returns, "num_returns", minimum=0)
    out["num_returns"] = "streaming" if returns == "dynamic" else returns
    out["max_retries"] = _count(o.get("max_retries", 3), "max_retries", minimum=-1)
    retry = o.get("retry_exceptions", False)
    if isinstance(retry, bool):
        out["retry_exceptions"] = retry
    elif isinstance(retry, list | tuple) and all(isinstance(t, type) and issubclass(t, BaseException) for t in retry):
        out["retry_exceptions"] = tuple(retry)
    else:
        raise ValueError(f"retry_exceptions must be a bool or a list of exception classes, got {retry!r}")
    if o.get("name") is not None:
        out["name"] = validate_name(o["name"], "task name")
    if o.get("generator_window") is not None and o["generator_window"] != -1:
        out["generator_window"] = _count(o["generator_window"], f"{WINDOW_OPTION} (or -1: no limit)", minimum=1)
    from zmesh.util.scheduling_strategies import to_wire

    out["scheduling_strategy"] = to_wire(o.get("scheduling_strategy"))
    return out
