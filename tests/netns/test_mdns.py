"""mDNS discovery between network namespaces, and the namespace harness (NetnsNetwork) itself.

Multicast runs only inside namespaces these tests create: every MdnsSource here
runs in a child process started with ``ip netns exec``; the test process itself
only builds MdnsSource objects on loopback, where they refuse to start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from zmesh.node.discovery.mdns import SERVICE, TXT_KEYS, MdnsSource
from zmesh.testing import wait_for
from zmesh.testing_netns import NetnsError, NetnsNetwork, netns_available

ROOT = Path(__file__).resolve().parents[2]
_why_not = netns_available()
needs_netns = pytest.mark.skipif(_why_not is not None, reason=f"network namespaces unavailable: {_why_not}")
# Network namespaces, their addresses and bridges are the host's: tests that make them run one at a time.
pytestmark = pytest.mark.xdist_group("netns")

# One MdnsSource in a namespace. It reports on stdout, one event a line, with seconds since
# just before start(): "started DT", "found ADDR", "removed ADDR", "log T MESSAGE", "closed DT".
# A line "close" (or EOF) on stdin closes it.
PEER = r"""
import json, logging, select, sys, threading, time
from zmesh.node.discovery.mdns import MdnsSource

T0 = time.monotonic()
LOCK = threading.Lock()  # log lines come from zeroconf's thread: one whole line at a time

def say(line):
    with LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

class Lines(logging.Handler):
    def emit(self, record):
        say(f"log {time.monotonic() - T0:.3f} {record.getMessage()}")

log = logging.getLogger("zmesh.node.discovery.mdns")
log.setLevel(logging.DEBUG)
log.addHandler(Lines())
source = MdnsSource(**json.loads(sys.argv[1]))
T0 = time.monotonic()
source.start()
say(f"started {time.monotonic() - T0:.4f}")
while True:
    for address in source.poll():
        say(f"found {address}")
    for address in source.removed():
        say(f"removed {address}")
    ready, _, _ = select.select([sys.stdin], [], [], 0.05)
    if ready and sys.stdin.readline().strip() in ("close", ""):
        break
t = time.monotonic()
source.close()
say(f"closed {time.monotonic() - t:.4f}")
"""

# A plain zeroconf browser, not zmesh's: prints the TXT record of every _zmesh service as it is on the wire.
RAW_BROWSER = r"""
import json, sys, time
from zeroconf import ServiceBrowser, Zeroconf
zc = Zeroconf(interfaces=[sys.argv[1]])
seen = set()
def on_change(zeroconf, service_type, name, state_change):
    seen.add(name)
ServiceBrowser(zc, sys.argv[2], handlers=[on_change])
deadline = time.monotonic() + 10
while time.monotonic() < deadline and not seen:
    time.sleep(0.05)
for name in sorted(seen):
    info = zc.get_service_info(sys.argv[2], name, timeout=3000)
    if info is not None:
        print(json.dumps({k.decode(): (v or b"").decode() for k, v in info.properties.items()}), flush=True)
zc.close()
"""


class Peer:
    """An MdnsSource running in host i's namespace, and the lines it printed so far."""

    def __init__(
        self,
        net: NetnsNetwork,
        i: int,
        *,
        cluster: str = "blue",
        fingerprint: str | None = "f1f1f1f1f1f1f1f1",
        protocol_version: int = 1,
    ) -> None:
        self.node_id = f"node{i}"
        self.port = 7000 + i
        self.address = f"tcp://{net.addresses[i]}:{self.port}"
        config = {
            "cluster": cluster,
            "node_id": self.node_id,
            "host": net.addresses[i],
            "port": self.port,
            "fingerprint": fingerprint,
            "protocol_version": protocol_version,
            "python": "3.11",
        }
        self.lines: list[str] = []
        self.proc = net.popen(
            i,
            [sys.executable, "-c", PEER, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        # A reader thread, so the child never blocks on a full pipe; it ends at the child's EOF.
        self._reader = threading.Thread(target=self._read, name=f"mdns-peer-{i}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def _words(self, kind: str) -> list[list[str]]:
        return [line.split()[1:] for line in list(self.lines) if line.split()[:1] == [kind]]

    def found(self) -> set[str]:
        return {words[0] for words in self._words("found")}

    def removed(self) -> set[str]:
        return {words[0] for words in self._words("removed")}

    def seconds(self, kind: str) -> float | None:
        words = self._words(kind)
        return float(words[0][0]) if words else None

    def logged(self, text: str) -> list[str]:
        return [line for line in list(self.lines) if line.startswith("log ") and text in line]

    def close(self) -> None:
        """Ask for close() and wait; kill if it hangs (the test then fails on the missing "closed")."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.write("close\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def output(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    """Networks and peers of one test, torn down in reverse (peers before their namespaces), even on failure."""
    with contextlib.ExitStack() as stack:
        yield stack


def wait_peers(predicate: Callable[[], object], what: str, peers: list[Peer], timeout: float = 8) -> None:
    """wait_for, and on a timeout show what every peer printed (the only trace of what happened in there)."""
    try:
        wait_for(predicate, timeout=timeout, what=what)
    except TimeoutError as exc:
        report = "\n".join(f"--- {p.node_id} {p.address}\n{p.output()}" for p in peers)
        raise TimeoutError(f"{exc}\n{report}") from None


def network(stack: contextlib.ExitStack, hosts: int) -> NetnsNetwork:
    return stack.enter_context(NetnsNetwork(hosts))


def peer(stack: contextlib.ExitStack, net: NetnsNetwork, i: int, **kwargs: Any) -> Peer:
    p = Peer(net, i, **kwargs)
    stack.callback(p.close)
    return p


# ---------------------------------------------------------------------- MdnsSource in namespaces


@needs_netns
@pytest.mark.timeout(30)
def test_three_hosts_find_each_other_and_not_themselves(stack: contextlib.ExitStack) -> None:
    net = network(stack, 3)
    peers = [peer(stack, net, i) for i in range(3)]
    everyone = {p.address for p in peers}

    def all_found() -> bool:
        return all(p.found() == everyone - {p.address} for p in peers)

    # Registration probes ~1 s, then the announcement reaches the others at once: a few seconds is ample.
    wait_peers(all_found, "each host to find the other two", peers)
    for p in peers:
        assert p.address not in p.found(), p.output()


@needs_netns
@pytest.mark.timeout(30)
def test_start_returns_long_before_registration_ends(stack: contextlib.ExitStack) -> None:
    net = network(stack, 2)
    a, b = peer(stack, net, 0), peer(stack, net, 1)
    wait_peers(lambda: a.logged("announced") and b.found() == {a.address}, "a to be announced and found", [a, b])
    started = a.seconds("started")
    announced = float(a.logged("announced")[0].split()[1])
    assert started is not None and started < 0.2, a.output()
    # The probe really is slow: start() did not just happen to be quick because registering was.
    assert announced > 0.5, a.output()


@needs_netns
@pytest.mark.timeout(30)
def test_other_clusters_fingerprints_and_protocols_are_ignored(stack: contextlib.ExitStack) -> None:
    net = network(stack, 5)
    ours = [peer(stack, net, 0), peer(stack, net, 1)]
    other_cluster = peer(stack, net, 2, cluster="green")
    other_key = peer(stack, net, 3, fingerprint="0123456789abcdef")
    other_protocol = peer(stack, net, 4, protocol_version=2)
    strangers = [other_cluster, other_key, other_protocol]

    # Each of ours logs why it ignored each stranger: proof they were heard, not just missed.
    def ignored_everyone() -> bool:
        return all(p.logged(f"(node {s.node_id})") for p in ours for s in strangers)

    wait_peers(ignored_everyone, "our hosts to hear and ignore the strangers", ours + strangers)
    wait_peers(lambda: ours[0].found() == {ours[1].address} and ours[1].found() == {ours[0].address}, "ours to pair", ours + strangers)
    for p in ours:
        assert not p.found() & {s.address for s in strangers}, p.output()
    # The other cluster's node ignores ours just the same.
    wait_peers(lambda: all(other_cluster.logged(f"(node {p.node_id})") for p in ours), "green to ignore blue", ours + strangers)
    assert not other_cluster.found(), other_cluster.output()


@needs_netns
@pytest.mark.timeout(30)
def test_close_sends_a_goodbye_that_peers_see(stack: contextlib.ExitStack) -> None:
    net = network(stack, 2)
    a, b = peer(stack, net, 0), peer(stack, net, 1)
    wait_peers(lambda: a.found() == {b.address} and b.found() == {a.address}, "a and b to find each other", [a, b])
    b.close()
    closed = b.seconds("closed")
    assert closed is not None and closed < 1.0, b.output()
    wait_peers(lambda: a.removed() == {b.address}, "a to see b's goodbye", [a, b], timeout=5)


@needs_netns
@pytest.mark.timeout(30)
def test_the_txt_record_holds_only_public_facts(stack: contextlib.ExitStack) -> None:
    from zmesh.transport.security import ClusterKey

    key = ClusterKey.generate()
    net = network(stack, 2)
    announcer = peer(stack, net, 0, fingerprint=key.fingerprint)
    out = net.run(1, [sys.executable, "-c", RAW_BROWSER, net.addresses[1], SERVICE], timeout=30, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert records == [{"cluster": "blue", "node_id": "node0", "proto": "1", "py": "3.11", "fp": key.fingerprint}], announcer.output()
    text = out.stdout
    for secret in (key.secret.decode(), key.public.decode()):
        assert secret not in text


# ---------------------------------------------------------------------- MdnsSource without a network


def _source(host: str, node_id: str = "abc123") -> MdnsSource:
    return MdnsSource(cluster="blue", node_id=node_id, host=host, port=7000, fingerprint=None, protocol_version=1, python="3.11")


def test_txt_keys_are_exactly_the_documented_ones() -> None:
    props = _source("10.9.9.9").properties
    assert tuple(props) == TXT_KEYS
    assert props == {"cluster": "blue", "node_id": "abc123", "proto": "1", "py": "3.11", "fp": ""}


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::1"])
def test_no_mdns_on_loopback_or_the_wildcard(host: str, caplog: pytest.LogCaptureFixture) -> None:
    source = _source(host)
    with caplog.at_level(logging.WARNING, logger="zmesh.node.discovery.mdns"):
        source.start()
    assert not source.running
    assert "mDNS: off" in caplog.text
    assert source.poll() == [] and source.removed() == []
    source.close()
    source.close()


def test_close_without_start_is_a_no_op() -> None:
    source = _source("10.9.9.9")
    source.close()
    source.start()  # after close: stays off rather than opening sockets nobody will close
    assert not source.running


@pytest.mark.parametrize("node_id", ["", "a.b", "x" * 64])
def test_node_ids_that_are_not_dns_labels_are_refused(node_id: str) -> None:
    with pytest.raises(ValueError, match="node id"):
        _source("10.9.9.9", node_id)


# ---------------------------------------------------------------------- the harness


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=30, check=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=True).stdout


@needs_netns
@pytest.mark.timeout(30)
def test_hosts_reach_each_other_and_cut_heal_one() -> None:
    with NetnsNetwork(3) as net:
        assert len(set(net.addresses)) == 3 and len(set(net.names)) == 3
        assert all(net.reachable(i, j) for i in range(3) for j in range(3) if i != j)
        net.cut(1)
        assert not net.reachable(0, 1, timeout=0.5)
        assert not net.reachable(1, 2, timeout=0.5)
        assert net.reachable(0, 2)
        net.heal(1)
        assert net.reachable(0, 1) and net.reachable(1, 2)


@needs_netns
@pytest.mark.timeout(30)
def test_cut_between_splits_two_groups_and_spares_the_rest(stack: contextlib.ExitStack) -> None:
    net = network(stack, 3)
    net.cut_between([0], [1])
    assert not net.reachable(0, 1, timeout=0.5)
    assert not net.reachable(1, 0, timeout=0.5)
    assert net.reachable(0, 2) and net.reachable(2, 1)
    # Multicast is split too: host 2 hears both sides, the sides never hear each other.
    peers = [peer(stack, net, i) for i in range(3)]
    wait_peers(lambda: all(p.found() == {peers[2].address} for p in peers[:2]), "both sides to find host 2", peers)
    wait_peers(lambda: peers[2].found() == {peers[0].address, peers[1].address}, "host 2 to find both sides", peers)
    assert peers[0].found() == {peers[2].address} and peers[1].found() == {peers[2].address}
    net.heal_all()
    assert net.reachable(0, 1) and net.reachable(1, 0)


@needs_netns
@pytest.mark.timeout(30)
def test_exit_removes_everything_even_after_an_error() -> None:
    links_before = _root_links()
    with pytest.raises(RuntimeError, match="boom"), NetnsNetwork(2) as net:
        names = [*net.names, net.switch]
        listed = _namespaces()
        assert all(name in listed for name in names)
        # A process left running inside would keep its namespace, veth and all, alive: exit kills it.
        sleeper = net.popen(0, ["sleep", "60"])
        net.cut_between([0], [1])
        raise RuntimeError("boom")
    assert sleeper.wait(5) != 0
    listed = _namespaces()
    assert not [name for name in names if name in listed]
    assert _root_links() == links_before


@needs_netns
def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        NetnsNetwork(0)
    with pytest.raises(ValueError):
        NetnsNetwork(3, subnet="10.1.2.0/30")
    with NetnsNetwork(2, subnet="10.251.7.0/24") as net:
        assert net.addresses == ["10.251.7.1", "10.251.7.2"]
        with pytest.raises(IndexError):
            net.cut(2)
        with pytest.raises(ValueError):
            net.cut_between([0], [0, 1])
    with pytest.raises(NetnsError):
        net.cut(0)  # after exit: the namespaces are gone
