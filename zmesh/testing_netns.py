"""A private network for tests: N network namespaces on one bridge, with partitions; never the machine's own network.

Layout for ``NetnsNetwork(3)``::

    switch namespace  <prefix>-sw:  br0 ── p0 ── p1 ── p2     (bridge ports, no addresses)
                                            │     │     │      (veth pairs)
    host namespaces   <prefix>-h0..h2:     eth0  eth0  eth0    (10.x.y.1, .2, .3 /24)

Every interface is created inside a namespace (``ip -n``), so nothing is added
to, or multicast on, the root namespace's interfaces. Multicast (mDNS on
224.0.0.251) crosses the bridge because the bridge floods it (snooping off) and
the sender picks its interface itself (zeroconf sets ``IP_MULTICAST_IF``), so no
multicast route is needed.

Faults:

- ``cut(i)`` sets host i's bridge port to the ``disabled`` STP state: the
  switch drops everything from and to it while the host still sees its link up,
  like a partition beyond the first switch.
- ``cut_between(a, b)`` works inside the host namespaces, since this kernel
  has no tc classifiers, bridge VLAN filtering or netfilter tools: each host of
  one group routes the other group's addresses into a ``sink`` interface
  (a veth whose peer nobody answers on), so what it sends there vanishes
  silently (a connect hangs as in a real partition, rather than failing fast),
  and strict reverse-path filtering (``rp_filter=1``, set on every host) drops
  what arrives from them, multicast included, because the route back to the
  sender no longer leaves through ``eth0``.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import psutil

logger = logging.getLogger(__name__)

_IP_TIMEOUT_S = 30.0
_counter = itertools.count()
_PREFIX = "zn"  # namespace names: zn<pid>x<seq>-sw, zn<pid>x<seq>-h<i>


class NetnsError(RuntimeError):
    """An ``ip`` command the harness needs failed."""


def _ip(*args: str, check: bool = True) -> str:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT_S)
    if check and out.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {out.stderr.strip() or out.returncode}")
    return out.stdout


def _bridge(*args: str) -> str:
    out = subprocess.run(["bridge", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT_S)
    if out.returncode != 0:
        raise NetnsError(f"bridge {' '.join(args)}: {out.stderr.strip() or out.returncode}")
    return out.stdout


def _namespaces() -> set[str]:
    # "name (id: 3)" or just "name"
    return {line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()}


@functools.cache
def netns_available() -> str | None:
    """None if this process can build a NetnsNetwork, else why not (a reason to skip)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None or shutil.which("bridge") is None:
        return "iproute2 (ip, bridge) missing"
    if shutil.which("sysctl") is None:
        return "sysctl missing"
    probe = f"{_PREFIX}{os.getpid()}probe"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
        _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create namespaces, bridges and veths: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _remove_stale() -> None:
    """Remove namespaces left by harness runs whose process is gone (a killed test run)."""
    for name in _namespaces():
        if not name.startswith(_PREFIX) or "x" not in name:
            continue
        pid = name[len(_PREFIX) :].split("x", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            logger.info("removing stale test namespace %s", name)
            _kill_inside(name)
            _ip("netns", "del", name, check=False)


def _kill_inside(name: str) -> list[int]:
    """SIGKILL the processes still inside a namespace we made; they would keep it (and its veths) alive."""
    pids = [int(p) for p in _ip("netns", "pids", name, check=False).split() if p.isdigit()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # Wait for them to die without reaping: a child of ours belongs to its Popen, which must still
    # see its exit status. A zombie has already let go of its namespaces.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.01)
    return pids


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _stop_with_parent() -> None:
    """In the child, before exec: the kernel SIGKILLs it when the test process dies."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class NetnsNetwork:
    """N network namespaces on one bridge, each with one address that exists only inside it."""

    def __init__(self, hosts: int, subnet: str | None = None) -> None:
        if not 1 <= hosts <= 250:
            raise ValueError(f"hosts must be in 1..250, got {hosts}")
        seq = next(_counter)
        pid = os.getpid()
        # Each network has its own bridge in its own namespace, so two networks with the same
        # subnet never meet; the pid-derived default only makes logs easier to tell apart.
        net = ipaddress.ip_network(subnet or f"10.{200 + pid % 50}.{seq % 256}.0/24")
        if net.version != 4 or net.num_addresses < hosts + 2:
            raise ValueError(f"subnet {net} is not an IPv4 network with room for {hosts} hosts")
        self.subnet = net
        self.prefix = f"{_PREFIX}{pid}x{seq}"
        self.switch = f"{self.prefix}-sw"
        self.names: list[str] = [f"{self.prefix}-h{i}" for i in range(hosts)]
        self.addresses: list[str] = [str(net.network_address + 1 + i) for i in range(hosts)]
        self.interface = "eth0"
        self._made: list[str] = []
        self._cut: set[int] = set()
        self._blocked: set[tuple[int, int]] = set()
        self._sinks: set[int] = set()

    # ------------------------------------------------------------------ set-up and tear-down

    def __enter__(self) -> NetnsNetwork:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close(check=exc is None)

    def _build(self) -> None:
        _remove_stale()
        for name in (self.switch, *self.names):
            _ip("netns", "add", name)
            self._made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        # IPv6 off before the veths exist (interfaces take the namespace's defaults when made):
        # link-local IPv6 would be a second path around the partitions, and DAD only adds noise.
        for name in (self.switch, *self.names):
            self._sysctl(name, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        for name in self.names:
            # Strict reverse-path filtering is what makes cut_between drop inbound traffic.
            self._sysctl(name, "net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.default.rp_filter=1")
        # Snooping off: with no querier on this bridge, flooding every group is the predictable choice.
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            port = f"p{i}"
            _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", self.interface, "netns", name)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", name, "addr", "add", f"{self.addresses[i]}/{self.subnet.prefixlen}", "dev", self.interface)
            _ip("-n", name, "link", "set", self.interface, "up")

    @staticmethod
    def _sysctl(name: str, *settings: str) -> None:
        out = subprocess.run(
            ["ip", "netns", "exec", name, "sysctl", "-qw", *settings], capture_output=True, text=True, timeout=_IP_TIMEOUT_S
        )
        if out.returncode != 0:
            raise NetnsError(f"sysctl {' '.join(settings)} in {name}: {out.stderr.strip()}")

    def close(self, check: bool = True) -> None:
        """Kill what still runs inside, delete every namespace (with its veths and bridge), and verify.

        Safe to call twice. ``check`` raises NetnsError if anything is left; it is
        off when the with-block already failed, so that error is the one reported.
        """
        leftovers: dict[str, list[int]] = {}
        for name in reversed(self._made):
            killed = _kill_inside(name)
            if killed:
                leftovers[name] = killed
            _ip("netns", "del", name, check=False)
        remaining = _namespaces() & set(self._made)
        # Veths and the bridge exist only inside these namespaces: nothing to look for in the root
        # namespace, but a namespace that a process still holds would keep them alive.
        still_held = {name: pids for name in self._made if (pids := _ip("netns", "pids", name, check=False).split())}
        self._made = []
        if leftovers:
            logger.warning("NetnsNetwork killed processes left in its namespaces: %s", leftovers)
        if check and (remaining or still_held):
            raise NetnsError(f"namespaces left behind: {sorted(remaining)} {still_held}")

    # ------------------------------------------------------------------ running things inside

    def exec_prefix(self, i: int) -> list[str]:
        """The argv prefix that runs a command on host i."""
        return ["ip", "netns", "exec", self.names[i]]

    def popen(self, i: int, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` on host i; the child dies with the test process (it would hold the namespace)."""
        kwargs.setdefault("preexec_fn", _stop_with_parent)
        return subprocess.Popen([*self.exec_prefix(i), *argv], **kwargs)

    def run(self, i: int, argv: list[str], timeout: float = 30.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on host i to completion, capturing text output."""
        kwargs.setdefault("capture_output", True)
        return subprocess.run([*self.exec_prefix(i), *argv], text=True, timeout=timeout, **kwargs)

    # ------------------------------------------------------------------ faults

    def cut(self, i: int) -> None:
        """Disconnect host i from everyone: its switch port drops every frame, both ways."""
        self._check(i)
        self._port_state(i, "0", "disabled")
        self._cut.add(i)

    def heal(self, i: int) -> None:
        """Undo ``cut(i)`` (partitions from ``cut_between`` stay)."""
        self._check(i)
        self._port_state(i, "3", "forwarding")
        self._cut.discard(i)

    def _port_state(self, i: int, state: str, shown: str) -> None:
        # `ip link set ... type bridge_slave state` is silently ignored on this kernel; `bridge` works.
        # Read it back, since a fault that silently did not happen would make a test pass for nothing.
        _bridge("-n", self.switch, "link", "set", "dev", f"p{i}", "state", state)
        if f"state {shown}" not in _bridge("-n", self.switch, "link", "show", "dev", f"p{i}"):
            raise NetnsError(f"port p{i} did not go to state {shown}")

    def cut_between(self, group_a: Iterable[int], group_b: Iterable[int]) -> None:
        """Partition two groups: no host of one reaches any host of the other; others are unaffected."""
        a, b = list(group_a), list(group_b)
        for i in (*a, *b):
            self._check(i)
        if set(a) & set(b):
            raise ValueError(f"a host cannot be on both sides: {sorted(set(a) & set(b))}")
        for i in a:
            for j in b:
                self._block(i, j)
                self._block(j, i)

    def heal_between(self, group_a: Iterable[int], group_b: Iterable[int]) -> None:
        """Undo ``cut_between`` for these two groups."""
        for i in group_a:
            for j in group_b:
                self._unblock(i, j)
                self._unblock(j, i)

    def heal_all(self) -> None:
        """Undo every cut and partition."""
        for i in sorted(self._cut):
            self.heal(i)
        for i, j in sorted(self._blocked):
            self._unblock(i, j)

    def _block(self, i: int, j: int) -> None:
        """Host i stops talking to host j (its sends vanish; j's packets fail i's reverse-path check)."""
        if (i, j) in self._blocked:
            return
        name = self.names[i]
        if i not in self._sinks:
            # Both ends up (a route needs a carrier); neither has an address, so nobody answers ARP.
            _ip("-n", name, "link", "add", "sink", "type", "veth", "peer", "name", "sink-peer")
            _ip("-n", name, "link", "set", "sink-peer", "up")
            _ip("-n", name, "link", "set", "sink", "up")
            self._sinks.add(i)
        _ip("-n", name, "route", "add", f"{self.addresses[j]}/32", "dev", "sink")
        self._blocked.add((i, j))

    def _unblock(self, i: int, j: int) -> None:
        if (i, j) not in self._blocked:
            return
        _ip("-n", self.names[i], "route", "del", f"{self.addresses[j]}/32", "dev", "sink")
        self._blocked.discard((i, j))
        # The neighbour entry for j failed while routed into the sink; forget it so traffic resumes at once.
        _ip("-n", self.names[i], "neigh", "flush", "dev", "sink", check=False)

    def _check(self, i: int) -> None:
        if not 0 <= i < len(self.names):
            raise IndexError(f"no host {i} in a network of {len(self.names)}")

    def reachable(self, i: int, j: int, timeout: float = 1.0) -> bool:
        """Whether host i can open TCP to host j within ``timeout`` (a refusal counts: it came back)."""
        out = self.run(i, [sys.executable, "-c", _PROBE, self.addresses[j], str(timeout)], timeout=timeout + 30)
        return out.stdout.strip() == "yes"


# Port 9 (discard) has no listener: a RST (refused) proves the round trip; silence until the timeout means cut.
_PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 9), timeout=float(sys.argv[2])).close()
    print("yes")
except ConnectionRefusedError:
    print("yes")
except OSError:
    print("no")
"""
