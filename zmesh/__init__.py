"""zmesh: a peer-to-peer actor mesh with Ray's actor API."""

from __future__ import annotations

from zmesh import exceptions
from zmesh.actor import ActorClass, ActorHandle, ActorMethod, method
from zmesh.api import (
    available_resources,
    cluster_resources,
    get,
    get_actor,
    get_gpu_ids,
    init,
    is_initialized,
    kill,
    put,
    remote,
    shutdown,
    wait,
)
from zmesh.object_ref import ObjectRef

__version__ = "0.1.0"

__all__ = [
    "ActorClass",
    "ActorHandle",
    "ActorMethod",
    "ObjectRef",
    "__version__",
    "available_resources",
    "cluster_resources",
    "exceptions",
    "get",
    "get_actor",
    "get_gpu_ids",
    "init",
    "is_initialized",
    "kill",
    "method",
    "put",
    "remote",
    "shutdown",
    "wait",
]
