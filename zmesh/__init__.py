"""zmesh: a peer-to-peer actor mesh with Ray's actor API."""

from __future__ import annotations

from zmesh import exceptions
from zmesh.actor import ActorClass, ActorHandle, ActorMethod, method
from zmesh.api import (
    cancel,
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
from zmesh.cluster import (
    available_resources,
    cluster_resources,
    get_runtime_context,
    membership_events,
    nodes,
    on_membership,
)
from zmesh.generator import ObjectRefGenerator
from zmesh.object_ref import ObjectRef
from zmesh.remote_function import RemoteFunction

__version__ = "0.1.0"

__all__ = [
    "ActorClass",
    "ActorHandle",
    "ActorMethod",
    "ObjectRef",
    "ObjectRefGenerator",
    "RemoteFunction",
    "__version__",
    "available_resources",
    "cancel",
    "cluster_resources",
    "exceptions",
    "get",
    "get_actor",
    "get_gpu_ids",
    "get_runtime_context",
    "init",
    "is_initialized",
    "kill",
    "membership_events",
    "method",
    "nodes",
    "on_membership",
    "put",
    "remote",
    "shutdown",
    "wait",
]
