"""Node tunables in one frozen record, settable from the CLI and the environment."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import psutil

from zmesh.options import validate_name, validate_resources


@dataclasses.dataclass(frozen=True, slots=True)
class NodeConfig:
    host: str = "127.0.0.1"
    port: int = 0
    num_cpus: float | None = None
    num_gpus: float = 0
    memory: float | None = None
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    # Written to the run directory so `address="auto"` finds this node; off for embedded nodes.
    advertise: bool = True
    # Seconds a waiting creation logs its warning after, when it can never fit.
    infeasible_warning_s: float = 5.0
    # Path of the cluster key file; None means $ZMESH_CLUSTER_KEY_FILE, else the per-user key.
    cluster_key: str | None = None
    # No CURVE at all: loopback only, for measuring what encryption costs.
    insecure: bool = False
    # Dead actors remembered for status and late callers; the oldest are forgotten first.
    keep_dead_actors: int = 1000
    # Workers kept forked and connected while creations keep coming, each for one actor (node/pool/warm.py).
    warm_workers: int = 4
    # Seconds without a creation after which the warm workers are sent away.
    warm_idle_s: float = 2.0
    # Workers starting at once (forked, not yet asking for their actor); 0: one per two CPU cores, at least one.
    worker_start_limit: int = 0
    # Task workers kept when no lease wants them (0: one per CPU); more than that exit after task_idle_s idle.
    task_workers_idle: int = 0
    task_idle_s: float = 10.0
    # ---- the shared-memory object store (see docs/objects.md)
    # Bytes of large objects this node's store holds at once; None: 30% of the machine's memory, as Ray's default.
    object_store_memory: int | None = None
    # Values whose frames reach this many bytes go into shared memory (docs/objects.md says why 1 MiB).
    store_threshold: int = 1 << 20
    # A transfer from another node moves in chunks of this size, with this many chunks in flight.
    transfer_chunk: int = 4 << 20
    transfer_window: int = 4
    # A transfer with no chunk arriving for this long fails its readers (ObjectLostError).
    transfer_stall_s: float = 10.0

    # ---- the mesh (see docs/mesh.md)
    # Nodes of one host with the same cluster name find each other through the run directory.
    cluster: str | None = None
    # Seed addresses (host:port) of other nodes; one reachable seed is enough to learn the mesh.
    join: tuple[str, ...] = ()
    # mDNS announce and browse: None means on exactly when listening on a non-loopback address.
    mdns: bool | None = None
    # How often discovery sources are read and unreached candidates retried.
    discovery_interval_s: float = 0.5
    # Failure detection (SWIM with Lifeguard's refinements): see node/membership.py.
    probe_interval_s: float = 0.2
    probe_timeout_s: float = 0.1
    indirect_probes: int = 3
    suspicion_min_s: float = 1.8
    suspicion_max_s: float = 3.6
    lag_tolerance_s: float = 0.25
    tombstone_s: float = 300.0
    # Gossip of each node's entry (resources, actors, names): see node/gossip.py.
    gossip_fanout: int = 3
    gossip_round_s: float = 0.1
    sync_interval_s: float = 1.0
    # A node-to-node request (a name claim, a placement) unanswered this long is retried elsewhere or failed.
    mesh_request_timeout_s: float = 5.0
    # ---- actors across the mesh (see docs/mesh.md)
    # Members besides the host that hold a restartable actor's creation: losing this many nodes at once loses none.
    keepers: int = 3
    # Hard node affinity to a member whose entry has not arrived by gossip yet waits this long before failing.
    affinity_wait_s: float = 10.0
    # A name's home frees a claim whose actor gossip has not shown for this long (its release was lost).
    name_grace_s: float = 5.0
    # Two live holders of one name (a healed partition) must last this long before the younger loses it.
    name_conflict_s: float = 2.0

    @classmethod
    def from_env(cls, **overrides: Any) -> NodeConfig:
        """Defaults, then ``ZMESH_<FIELD>`` variables (``ZMESH_PROBE_INTERVAL_S=0.1``), then ``overrides``."""
        env: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = os.environ.get(f"ZMESH_{field.name.upper()}")
            if raw is not None and field.name not in ("cluster_key",):
                env[field.name] = parse_field(field.name, raw)
        env.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**env)
        config.validate()
        return config

    def validate(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("_s") and (isinstance(value, bool) or not isinstance(value, int | float) or not value > 0):
                raise ValueError(f"{field.name} must be a number of seconds > 0, got {value!r}")
        if self.suspicion_max_s < self.suspicion_min_s:
            raise ValueError(f"suspicion_max_s ({self.suspicion_max_s}) must be >= suspicion_min_s ({self.suspicion_min_s})")
        for name in ("indirect_probes", "gossip_fanout"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.cluster is not None:
            validate_name(self.cluster, "cluster name")
            if "/" in self.cluster or self.cluster.startswith("."):
                raise ValueError(f"cluster name {self.cluster!r} must not contain '/' or start with '.'")
        for seed in self.join:
            parse_seed(seed)
        for name in ("num_cpus", "num_gpus", "memory"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        validate_resources(self.resources)
        if self.keep_dead_actors < 0:
            raise ValueError(f"keep_dead_actors must be >= 0, got {self.keep_dead_actors}")
        if not isinstance(self.keepers, int) or not 0 <= self.keepers <= 8:
            raise ValueError(f"keepers must be an int in 0..8, got {self.keepers!r}")
        if not (self.affinity_wait_s >= 0 and self.name_grace_s > 0 and self.name_conflict_s >= 0):
            raise ValueError(f"affinity_wait_s must be >= 0 and name_grace_s > 0, got {self.affinity_wait_s!r}, {self.name_grace_s!r}")
        store = self.object_store_memory
        if store is not None and (isinstance(store, bool) or not isinstance(store, int) or store < 1):
            raise ValueError(f"object_store_memory must be a number of bytes >= 1, got {self.object_store_memory!r}")
        for name in ("store_threshold", "transfer_chunk", "transfer_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("warm_workers", "worker_start_limit", "task_workers_idle"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ValueError(f"listen address (host) must be an IP address, got {self.host!r}") from None
        if self.insecure and not self.loopback:
            raise ValueError(f"--insecure is allowed on loopback only, not on {self.host}")

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    @property
    def mdns_enabled(self) -> bool:
        return self.mdns if self.mdns is not None else not self.loopback

    def total_resources(self) -> dict[str, float]:
        total = {
            "CPU": float(self.num_cpus if self.num_cpus is not None else (psutil.cpu_count() or 1)),
            "GPU": float(self.num_gpus),
            "memory": float(self.memory if self.memory is not None else psutil.virtual_memory().total),
        }
        total.update(self.resources)
        return total


def parse_seed(seed: str) -> str:
    """``host:port`` as a ZeroMQ TCP endpoint; raises ValueError naming the bad seed."""
    host, sep, port = seed.removeprefix("tcp://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"a --join seed must be host:port, got {seed!r}")
    return f"tcp://{host.strip('[]')}:{int(port)}"


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(raw: str) -> int:
    """``2G``, ``512M``, ``1000000``: a number of bytes (binary units); ValueError naming the text otherwise."""
    text = raw.strip().lower().removesuffix("ib").removesuffix("b")
    unit = text[-1:] if text[-1:] in _UNITS else ""
    try:
        value = float(text[: len(text) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"expected a size such as 2G, 512M or 1000000, got {raw!r}") from None
    if not 1 <= value < 1 << 60:
        raise ValueError(f"a size must be at least 1 byte, got {raw!r}")
    return int(value)


def parse_field(name: str, raw: str) -> Any:
    """A config field's value from text (an environment variable or ``--config KEY=VALUE``)."""
    fields = {f.name: f for f in dataclasses.fields(NodeConfig)}
    if name not in fields:
        raise ValueError(f"unknown node setting {name!r}; known: {', '.join(sorted(fields))}")
    try:
        if name == "resources":
            return json.loads(raw)
        if name == "join":
            return tuple(s.strip() for s in raw.split(",") if s.strip())
        if name == "mdns" and raw.lower() == "auto":
            return None
        if name in ("mdns", "advertise", "insecure"):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError("expected on or off" + (" or auto" if name == "mdns" else ""))
            return raw.lower() in ("1", "true", "yes", "on")
        if name in ("cluster", "host", "cluster_key"):
            return raw
        if name == "object_store_memory":
            return parse_bytes(raw)
        if fields[name].type == "int":
            return int(raw)
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"bad value {raw!r} for node setting {name}: {exc}") from None


def cli_settings(items: Sequence[str], flags: Mapping[str, tuple[str, Any]]) -> dict[str, Any]:
    """Node settings from ``--config KEY=VALUE`` items and from flags (``{field: (flag, value)}``, given ones only).

    A setting given both ways is refused rather than one silently winning: which was meant is a guess.
    Raises ValueError naming the bad item, key or value.
    """
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--config takes KEY=VALUE, got {item!r}")
        settings[key] = parse_field(key, raw)
    for field, (flag, value) in flags.items():
        if field in settings:
            raise ValueError(f"{flag} and --config {field}=... both set {field}; give only one")
        settings[field] = value
    return settings
