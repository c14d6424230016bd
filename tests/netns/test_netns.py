"""Two hosts on a private network (network namespaces joined by a veth pair): CURVE off loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from zmesh.testing import NodeProcess
from zmesh.transport.security import ClusterKey

# Network namespaces, their addresses and bridges are the host's: tests that make them run one at a time.
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 to make network namespaces"),
    pytest.mark.xdist_group("netns"),
]

SUBNET = "10.231.77"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def hosts() -> Iterator[tuple[str, str]]:
    """Two namespaces, ``a`` at SUBNET.1 and ``b`` at SUBNET.2, removed afterwards."""
    tag = f"zm{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"
    try:
        for ns in (a, b):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", f"{tag}va", "netns", a, "type", "veth", "peer", "name", f"{tag}vb", "netns", b)
        _ip("-n", a, "addr", "add", f"{SUBNET}.1/24", "dev", f"{tag}va")
        _ip("-n", b, "addr", "add", f"{SUBNET}.2/24", "dev", f"{tag}vb")
        _ip("-n", a, "link", "set", f"{tag}va", "up")
        _ip("-n", b, "link", "set", f"{tag}vb", "up")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        assert a not in listed and b not in listed


DRIVER = """
import sys, threading, zmesh
zmesh.init(address=sys.argv[1], cluster_key=sys.argv[2] if len(sys.argv) > 2 else None, connect_timeout=3)
logged = threading.Event()
show = zmesh.runtime.current().on_log
def on_log(prefix, stream, text):
    show(prefix, stream, text)
    logged.set()
zmesh.runtime.current().on_log = on_log

@zmesh.remote
class Where:
    def host(self, note):
        import socket
        print("hello from the other host")
        return note + " answered"

print(zmesh.get(Where.remote().host.remote("driver on b")))
assert logged.wait(30), "the actor's print never reached the driver"
"""


def test_driver_on_one_host_uses_an_actor_on_the_other(hosts: tuple[str, str], isolated_run_dir: Path, tmp_path: Path) -> None:
    a, b = hosts
    key = tmp_path / "cluster.key"
    ClusterKey.generate().save(key)
    node = NodeProcess(str(isolated_run_dir), "--listen", f"{SUBNET}.1", "--cluster-key", str(key), prefix=["ip", "netns", "exec", a])
    try:
        assert node.address.startswith(f"{SUBNET}.1:")
        env = {**os.environ, "ZMESH_RUN_DIR": str(tmp_path / "run-b")}
        ok = subprocess.run(
            ["ip", "netns", "exec", b, sys.executable, "-c", DRIVER, node.address, str(key)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert ok.returncode == 0, ok.stderr
        assert "driver on b answered" in ok.stdout
        assert "hello from the other host" in ok.stdout  # the actor's print crossed back to the driver
        # The same driver with its own key instead of the cluster's is refused.
        refused = subprocess.run(
            ["ip", "netns", "exec", b, sys.executable, "-c", DRIVER, node.address],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, "XDG_CONFIG_HOME": str(tmp_path / "other-user-config")},
        )
        assert refused.returncode != 0
        assert "NodeUnavailableError" in refused.stderr
    finally:
        assert node.stop() == 0


def test_node_without_a_key_refuses_a_network_address(hosts: tuple[str, str], isolated_run_dir: Path) -> None:
    a, _ = hosts
    out = subprocess.run(
        ["ip", "netns", "exec", a, sys.executable, "-m", "zmesh", "node", "--listen", f"{SUBNET}.1", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "ZMESH_RUN_DIR": str(isolated_run_dir)},
    )
    assert out.returncode != 0
    assert "zmesh keygen" in out.stderr
