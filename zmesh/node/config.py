"""Node tunables in one frozen record, settable from the CLI and the environment."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from typing import Any

import psutil

from zmesh.options import validate_resources


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

    @classmethod
    def from_env(cls, **overrides: Any) -> NodeConfig:
        env: dict[str, Any] = {}
        if "ZMESH_NUM_CPUS" in os.environ:
            env["num_cpus"] = float(os.environ["ZMESH_NUM_CPUS"])
        if "ZMESH_NUM_GPUS" in os.environ:
            env["num_gpus"] = float(os.environ["ZMESH_NUM_GPUS"])
        if "ZMESH_RESOURCES" in os.environ:
            env["resources"] = json.loads(os.environ["ZMESH_RESOURCES"])
        if "ZMESH_KEEP_DEAD_ACTORS" in os.environ:
            env["keep_dead_actors"] = int(os.environ["ZMESH_KEEP_DEAD_ACTORS"])
        env.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**env)
        config.validate()
        return config

    def validate(self) -> None:
        for name in ("num_cpus", "num_gpus", "memory"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        validate_resources(self.resources)
        if self.keep_dead_actors < 0:
            raise ValueError(f"keep_dead_actors must be >= 0, got {self.keep_dead_actors}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ValueError(f"listen address must be an IP address, got {self.host!r}") from None
        if self.insecure and not self.loopback:
            raise ValueError(f"--insecure is allowed on loopback only, not on {self.host}")

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    def total_resources(self) -> dict[str, float]:
        total = {
            "CPU": float(self.num_cpus if self.num_cpus is not None else (psutil.cpu_count() or 1)),
            "GPU": float(self.num_gpus),
            "memory": float(self.memory if self.memory is not None else psutil.virtual_memory().total),
        }
        total.update(self.resources)
        return total
