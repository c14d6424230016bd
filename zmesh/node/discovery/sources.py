"""Where other nodes might be: candidate addresses from seeds, the run directory and mDNS.

A candidate is only an address to knock at; it becomes a member after an
authenticated hello (the CURVE handshake with the cluster key, then a join the
mesh checks). Every source offers ``poll() -> list[str]`` of ``tcp://`` addresses
and ``close()``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import psutil

from zmesh.node.config import NodeConfig, parse_seed
from zmesh.transport import rundir

logger = logging.getLogger(__name__)


class Source(Protocol):
    def poll(self) -> list[str]: ...

    def close(self) -> None: ...


class Seeds:
    """``--join`` seeds: offered every poll, since a seed may come up after us (the mesh skips members)."""

    def __init__(self, seeds: Iterable[str]) -> None:
        self._addresses = [parse_seed(s) for s in seeds]

    def poll(self) -> list[str]:
        return list(self._addresses)

    def close(self) -> None:
        pass


def cluster_dir(cluster: str) -> Path:
    path = rundir.run_dir() / "clusters" / cluster
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


class RunDirectory:
    """Nodes of one host and one cluster name: each writes ``clusters/NAME/<node id>.json`` in the run directory."""

    def __init__(self, cluster: str, node_id: str, address: str) -> None:
        self._dir = cluster_dir(cluster)
        self._mine = self._dir / f"{node_id}.json"
        proc = psutil.Process()
        record = {"node_id": node_id, "address": address, "pid": os.getpid(), "create_time": proc.create_time()}
        tmp = self._mine.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self._mine)

    def poll(self) -> list[str]:
        found = []
        for path in self._dir.glob("*.json"):
            if path == self._mine:
                continue
            try:
                record = json.loads(path.read_text())
                alive = psutil.Process(record["pid"]).create_time() == record["create_time"]
            except (OSError, ValueError, KeyError, TypeError, psutil.Error):
                alive = False
            if not alive:
                path.unlink(missing_ok=True)  # a node that was killed could not remove its own
            elif isinstance(record.get("address"), str):
                found.append(record["address"])
        return found

    def close(self) -> None:
        self._mine.unlink(missing_ok=True)


class Announced:
    """mDNS as a source: every address currently announced, so a knock that went unanswered is retried."""

    def __init__(self, mdns: Any) -> None:
        self._mdns = mdns

    def poll(self) -> list[str]:
        self._mdns.poll()  # drain its news; known() is the whole current picture
        return list(self._mdns.known())

    def close(self) -> None:
        self._mdns.close()


def sources_for(config: NodeConfig, node_id: str, address: str, key: Any) -> list[Source]:
    """The discovery sources a node's config asks for: seeds, the run directory of its cluster, mDNS."""
    sources: list[Source] = []
    if config.join:
        sources.append(Seeds(config.join))
    if config.cluster is not None and config.advertise:
        sources.append(RunDirectory(config.cluster, node_id, address))
    if config.mdns_enabled:
        from zmesh.node.discovery.mdns import MdnsSource
        from zmesh.transport.protocol import PROTOCOL_VERSION, python_version

        host, _, port = address.removeprefix("tcp://").rpartition(":")
        mdns = MdnsSource(
            cluster=config.cluster or "default",
            node_id=node_id,
            host=host,
            port=int(port),
            fingerprint=key.fingerprint if key is not None else None,
            protocol_version=PROTOCOL_VERSION,
            python=python_version(),
        )
        mdns.start()
        sources.append(Announced(mdns))
    return sources
