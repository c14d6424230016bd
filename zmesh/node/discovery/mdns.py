"""mDNS discovery: announce this node as ``_zmesh._tcp.local.`` on one interface and find others of its cluster.

All zeroconf work runs on the event loop thread that python-zeroconf starts for
its own ``Zeroconf`` instance (``use_asyncio=False``, so it never attaches to a
loop the caller happens to run). Callers only touch a lock-guarded inbox:
``poll()`` and ``removed()`` never block on the network.

Lifecycle on the loop: ``start()`` opens the sockets (milliseconds) and queues
``_begin``, which starts an ``AsyncServiceBrowser`` and a registration task (the
name probe takes ~1 s). Browser events resolve the peer with ``AsyncServiceInfo``
(usually straight from the cache the announcement filled). ``close()`` cancels
those tasks, sends the goodbye and closes zeroconf, all within about half a second.

A found address is only a candidate: the TXT record is unauthenticated, so the
cluster name and fingerprint filter out other clusters' noise, not attackers;
the daemon's authenticated hello decides membership.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import re
import threading
from typing import Any

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo

logger = logging.getLogger(__name__)

SERVICE = "_zmesh._tcp.local."

TXT_KEYS = ("cluster", "node_id", "proto", "py", "fp")
"""Everything the TXT record says; public facts only (the fingerprint is a hash of the public key)."""

_RESOLVE_TIMEOUT_MS = 3000
# Bounds for close(): the goodbye is three packets 125 ms apart; the rest is slack for a busy loop.
_STOP_TIMEOUT_S = 0.6
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")


def _address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class MdnsSource:
    """Announces this node and finds others of the same cluster on one interface."""

    def __init__(
        self,
        *,
        cluster: str,
        node_id: str,
        host: str,
        port: int,
        fingerprint: str | None,
        protocol_version: int,
        python: str,
    ) -> None:
        # The node id becomes a DNS label twice (instance and host name); a dot would split it.
        if not _LABEL.fullmatch(node_id):
            raise ValueError(f"node id must be 1-63 letters, digits, '-' or '_', got {node_id!r}")
        self._host = host.strip("[]")
        self._port = port
        self._node_id = node_id
        self._own = _address(self._host, port)
        self._want = {"cluster": cluster, "fp": fingerprint or "", "proto": str(protocol_version)}
        self._properties = {"cluster": cluster, "node_id": node_id, "proto": str(protocol_version), "py": python, "fp": fingerprint or ""}
        self._info = AsyncServiceInfo(
            SERVICE,
            f"{node_id}.{SERVICE}",
            parsed_addresses=[self._host] if self._usable() is None else [],
            port=port,
            properties=self._properties,
            server=f"zmesh-{node_id}.local.",
        )
        # _lifecycle orders start() against close() (possibly on other threads); _lock guards the inbox.
        self._lifecycle = threading.Lock()
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self._zc: Zeroconf | None = None
        self._found: dict[str, None] = {}
        self._gone: dict[str, None] = {}
        self._by_name: dict[str, list[str]] = {}
        # Only touched on zeroconf's loop thread.
        self._browser: AsyncServiceBrowser | None = None
        self._register_task: asyncio.Task[None] | None = None
        self._resolving: set[asyncio.Task[None]] = set()

    @property
    def properties(self) -> dict[str, str]:
        """The TXT record this node announces."""
        return dict(self._properties)

    @property
    def running(self) -> bool:
        """Whether mDNS is on: started, not closed, and the interface could be opened."""
        return self._zc is not None and not self._closed

    def _usable(self) -> str | None:
        """Why mDNS cannot run on our host address, or None."""
        try:
            ip = ipaddress.ip_address(self._host)
        except ValueError:
            return f"{self._host!r} is not an IP address"
        if ip.is_unspecified:
            return f"{self._host} names no single interface"
        if ip.is_loopback:
            return "loopback carries no multicast"
        return None

    def start(self) -> None:
        """Open mDNS on our interface and begin announcing and browsing; returns in milliseconds.

        Discovery is best effort: if the interface cannot do mDNS the node runs
        without it, so this logs a warning instead of raising.
        """
        with self._lifecycle:
            if self._started or self._closed:
                return
            self._started = True
            problem = self._usable()
            if problem is not None:
                logger.warning("zmesh mDNS: off on %s: %s", self._host, problem)
                return
            try:
                # Exactly our interface: binding to all would announce on networks the node does not listen on.
                zc = Zeroconf(interfaces=[self._host], use_asyncio=False)
            except Exception as exc:  # zeroconf raises OSError, NotImplementedError, RuntimeError... all mean "no mDNS here"
                logger.warning("zmesh mDNS: off, cannot open mDNS on %s: %s", self._host, exc)
                return
            assert zc.loop is not None  # use_asyncio=False: zeroconf started its own loop thread
            self._zc = zc
            zc.loop.call_soon_threadsafe(self._begin)

    def poll(self) -> list[str]:
        """Candidate addresses (``tcp://ip:port``) of this cluster seen since the last poll; never our own."""
        with self._lock:
            found = list(self._found)
            self._found.clear()
        return found

    def removed(self) -> list[str]:
        """Addresses whose goodbye (or record expiry) arrived since the last call."""
        with self._lock:
            gone = list(self._gone)
            self._gone.clear()
        return gone

    def known(self) -> list[str]:
        """Every address currently announced by a node of this cluster (whether or not polled already)."""
        with self._lock:
            return list(dict.fromkeys(a for addresses in self._by_name.values() for a in addresses))

    def close(self) -> None:
        """Send the goodbye and close zeroconf; bounded (well under a second), idempotent, never raises."""
        with self._lifecycle:
            if self._closed:
                return
            self._closed = True
            zc, self._zc = self._zc, None
        if zc is None or zc.loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop(zc), zc.loop).result(_STOP_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            logger.warning("zmesh mDNS: the goodbye did not finish within %s s", _STOP_TIMEOUT_S)
        except Exception:
            logger.debug("zmesh mDNS: stopping failed", exc_info=True)
        try:
            # Nothing is left registered or pending, so this only closes sockets and joins the loop thread.
            zc.close()
        except Exception:
            logger.debug("zmesh mDNS: closing zeroconf failed", exc_info=True)

    # ------------------------------------------------------------------ on zeroconf's loop thread

    def _begin(self) -> None:
        zc = self._zc
        if zc is None:  # closed before the loop got here
            return
        self._browser = AsyncServiceBrowser(zc, SERVICE, handlers=[self._on_change])
        self._register_task = asyncio.ensure_future(self._register(zc))

    async def _register(self, zc: Zeroconf) -> None:
        try:
            # The probe for name conflicts takes ~1 s; another node with our id would make us "id-2", harmlessly.
            announced = await zc.async_register_service(self._info, allow_name_change=True)
            await announced
            logger.debug("zmesh mDNS: announced %s as %s", self._own, self._info.name)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("zmesh mDNS: could not announce %s", self._own, exc_info=True)

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            self._forget(name)
            return
        # Resolving may wait for answers: a task, so the loop (and the other events) never wait on it.
        task = asyncio.ensure_future(self._resolve(zeroconf, name))
        self._resolving.add(task)
        task.add_done_callback(self._resolving.discard)

    async def _resolve(self, zc: Zeroconf, name: str) -> None:
        info = AsyncServiceInfo(SERVICE, name)
        if not await info.async_request(zc, _RESOLVE_TIMEOUT_MS):
            logger.debug("zmesh mDNS: %s did not resolve", name)
            return
        props = info.decoded_properties
        if props.get("node_id") == self._node_id:
            return
        theirs = {key: props.get(key) or "" for key in self._want}
        if theirs != self._want:
            logger.debug("zmesh mDNS: ignoring %s (node %s): %s", name, props.get("node_id"), theirs)
            # A node we accepted that now announces another cluster or key has left ours.
            self._forget(name)
            return
        if info.port is None:
            return
        version = IPVersion.V6Only if ":" in self._host else IPVersion.V4Only
        addresses = [_address(a, info.port) for a in info.parsed_addresses(version)]
        addresses = [a for a in addresses if a != self._own]
        if not addresses:
            return
        with self._lock:
            self._by_name[name] = addresses
            for address in addresses:
                self._gone.pop(address, None)
                self._found[address] = None
        logger.debug("zmesh mDNS: found %s at %s", props.get("node_id"), addresses)

    def _forget(self, name: str) -> None:
        with self._lock:
            for address in self._by_name.pop(name, []):
                # Not yet polled: no point offering an address that has already said goodbye.
                self._found.pop(address, None)
                self._gone[address] = None

    async def _stop(self, zc: Zeroconf) -> None:
        tasks: list[asyncio.Task[Any]] = [*self._resolving]
        if self._register_task is not None:
            tasks.append(self._register_task)
        for task in tasks:
            task.cancel()
        if tasks:
            # A cancelled probe must be over before the goodbye, or it could register after it.
            await asyncio.wait(tasks)
        if self._browser is not None:
            await self._browser.async_cancel()
        # Only a registered name gets a goodbye; a probe cancelled above never announced anything.
        await zc.async_unregister_all_services()
