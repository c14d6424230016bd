"""A driver holding another cluster key is told so at once, by fingerprint, and never told a node 'went away'."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

import zmesh
from zmesh.exceptions import NodeUnavailableError
from zmesh.testing import NodeProcess, wait_for
from zmesh.transport.security import ClusterKey

pytestmark = pytest.mark.timeout(60)

# Loopback: the node hangs up within milliseconds and ZeroMQ retries every 50 ms; a second leaves room for a busy machine.
FAST = 1.0


@zmesh.remote
class Echo:
    def echo(self, value: str) -> str:
        return value


def _secrets(key: ClusterKey) -> list[str]:
    return [key.secret.decode(), key.public.decode()]


def test_init_with_another_key_fails_at_once_naming_the_keys_fingerprint(
    node: NodeProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = tmp_path / "other.key"
    ClusterKey.generate().save(other)
    key = ClusterKey.load(other)
    caplog.set_level(logging.DEBUG, logger="zmesh")
    start = time.monotonic()
    with pytest.raises(NodeUnavailableError) as info:
        zmesh.init(address=node.address, cluster_key=other, connect_timeout=20)
    elapsed = time.monotonic() - start
    assert elapsed < FAST, f"init took {elapsed:.2f} s to notice the handshake failed"
    message = str(info.value)
    assert "another cluster key" in message and key.fingerprint in message, message
    assert not zmesh.is_initialized()
    logged = caplog.text
    assert "went away" not in logged and "are lost" not in logged, logged
    assert not any(secret in message or secret in logged for secret in _secrets(key))
    # This user's own key, the node's: admitted as before.
    zmesh.init(address=node.address)
    assert zmesh.get(Echo.remote().echo.remote("in"), timeout=20) == "in"


def test_an_insecure_driver_of_a_secure_node_fails_at_once_saying_why(
    node: NodeProcess, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ZMESH_INSECURE", "1")
    caplog.set_level(logging.DEBUG, logger="zmesh")
    start = time.monotonic()
    with pytest.raises(NodeUnavailableError, match="requires CurveZMQ"):
        zmesh.init(address=node.address, connect_timeout=20)
    assert time.monotonic() - start < FAST
    assert "went away" not in caplog.text


def test_a_node_that_was_reached_and_dies_is_still_reported_gone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="zmesh")
    node = NodeProcess(str(tmp_path))  # its own run directory: a killed node leaves its socket files there
    try:
        zmesh.init(address=node.address)
        assert zmesh.get(Echo.remote().echo.remote("up"), timeout=20) == "up"
        node.proc.kill()
        node.proc.wait()
        wait_for(lambda: "went away" in caplog.text, 20, what="the driver to notice its node died")
    finally:
        zmesh.shutdown()
        node.stop()
