"""The `zmesh` command: node, status, stop; signals; errors when no node is there; bad flags."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, pid_alive

import zmesh
from zmesh.exceptions import ActorUnavailableError
from zmesh.testing import NodeProcess, wait_for

ZMESH_SCRIPT = str(ROOT / ".venv" / "bin" / "zmesh")


@zmesh.remote
class Service:
    def pid(self) -> int:
        return os.getpid()

    def crash(self) -> None:
        os._exit(1)


def _status_cmd(*args: str, script: bool = False, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    prefix = [ZMESH_SCRIPT] if script else [sys.executable, "-m", "zmesh"]
    return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _detached_actors(node: NodeProcess) -> dict[str, int]:
    """Create two detached actors from this process (one restarted once), disconnect; returns name -> worker pid."""
    zmesh.init(address="auto")
    alpha = Service.options(name="alpha", lifetime="detached", max_restarts=2).remote()
    beta = Service.options(name="beta", lifetime="detached", num_cpus=1).remote()
    zmesh.get([alpha.pid.remote(), beta.pid.remote()], timeout=20)
    with pytest.raises(ActorUnavailableError):
        zmesh.get(alpha.crash.remote(), timeout=20)
    pids = {"alpha": zmesh.get(alpha.pid.remote(), timeout=20), "beta": zmesh.get(beta.pid.remote(), timeout=20)}
    zmesh.shutdown()
    return pids


def _node_record(run_dir: Path) -> Path:
    return run_dir / "node.json"


def test_node_banner_names_its_address(isolated_run_dir: Path) -> None:
    proc = subprocess.Popen([ZMESH_SCRIPT, "node", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)\s*$", line)
        assert match, line
        assert 0 < int(match.group(1)) < 65536
        wait_for(lambda: _node_record(isolated_run_dir).exists(), timeout=10, what="the node record")
        assert json.loads(_node_record(isolated_run_dir).read_text())["address"] == f"tcp://127.0.0.1:{match.group(1)}"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        if proc.stdout:
            proc.stdout.close()


@pytest.mark.parametrize("script", [False, True], ids=["python-m", "console-script"])
def test_status_shows_node_resources_and_actors(node: NodeProcess, script: bool) -> None:
    pids = _detached_actors(node)
    result = _status_cmd("status", script=script)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert node.address.removeprefix("tcp://") in out
    assert f"pid {node.pid}" in out
    assert "resources (used / total):" in out
    cpu = [line.split() for line in out.splitlines() if line.strip().startswith("CPU")]
    assert cpu == [["CPU", "1", "/", "4"]], out
    rows = {line.split()[2]: line.split() for line in out.splitlines() if " alpha " in line or " beta " in line}
    assert set(rows) == {"alpha", "beta"}, out
    alpha, beta = rows["alpha"], rows["beta"]
    assert alpha[1] == "Service"
    assert "ALIVE" in alpha and "ALIVE" in beta
    assert alpha[-2:] == [str(pids["alpha"]), "1"]  # pid, restarts
    assert beta[-2:] == [str(pids["beta"]), "0"]

    as_json = _status_cmd("status", "--json", script=script)
    assert as_json.returncode == 0, as_json.stderr
    status = json.loads(as_json.stdout)
    by_name = {a["name"]: a for a in status["actors"]}
    assert by_name["alpha"]["restarts"] == 1
    assert by_name["alpha"]["pid"] == pids["alpha"]
    assert by_name["beta"]["state"] == "ALIVE"
    assert status["resources_total"]["CPU"] == 4
    assert status["resources_available"]["CPU"] == 3


def test_stop_stops_the_node_and_its_workers(node: NodeProcess, isolated_run_dir: Path) -> None:
    pids = _detached_actors(node)
    result = _status_cmd("stop", script=True)
    assert result.returncode == 0, result.stderr
    assert node.proc.wait(15) == 0
    for pid in pids.values():
        wait_for(lambda pid=pid: not pid_alive(pid), timeout=10, what=f"worker {pid} to exit")
    assert not _node_record(isolated_run_dir).exists()
    after = _status_cmd("status")
    assert after.returncode != 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_node_cleanly(node: NodeProcess, isolated_run_dir: Path, sig: signal.Signals) -> None:
    pids = _detached_actors(node)
    descendants = [p.pid for p in node.descendants()]
    assert set(pids.values()) <= set(descendants)
    assert _node_record(isolated_run_dir).exists()
    node.proc.send_signal(sig)
    assert node.proc.wait(15) == 0
    for pid in descendants:
        wait_for(lambda pid=pid: not pid_alive(pid), timeout=10, what=f"node child {pid} to exit")
    assert not _node_record(isolated_run_dir).exists()


def test_status_without_node_fails_fast() -> None:
    start = time.monotonic()
    result = _status_cmd("status", timeout=20)
    assert time.monotonic() - start < 10
    assert result.returncode != 0
    assert "no zmesh node is running" in result.stderr


def test_status_with_unreachable_address_fails_fast() -> None:
    start = time.monotonic()
    result = _status_cmd("status", "--address", "127.0.0.1:1", timeout=20)
    assert time.monotonic() - start < 10
    assert result.returncode != 0
    assert "127.0.0.1:1" in result.stderr


def test_init_auto_without_node_raises_connection_error() -> None:
    start = time.monotonic()
    with pytest.raises(ConnectionError):
        zmesh.init(address="auto")
    assert time.monotonic() - start < 5
    assert not zmesh.is_initialized()


@pytest.mark.parametrize("timeout", [None, 1.0], ids=["default-timeout", "connect_timeout=1"])
def test_init_with_nothing_at_address_raises_connection_error(timeout: float | None) -> None:
    kwargs = {} if timeout is None else {"connect_timeout": timeout}
    start = time.monotonic()
    with pytest.raises(ConnectionError):
        zmesh.init(address="127.0.0.1:1", **kwargs)
    elapsed = time.monotonic() - start
    assert elapsed < (10 if timeout is None else 4)
    assert not zmesh.is_initialized()


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1", "127.0.0.1:notaport", "127.0.0.1:99999", ":6390"])
def test_init_with_malformed_address_raises_value_error(address: str) -> None:
    with pytest.raises(ValueError):
        zmesh.init(address=address)
    assert not zmesh.is_initialized()


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--resources", "notjson"], "--resources"),
        (["--resources", '{"special": -1}'], "--resources"),
        (["--num-cpus", "-1"], "--num-cpus"),
    ],
    ids=["resources-notjson", "resources-negative", "num-cpus-negative"],
)
def test_bad_node_flags_exit_nonzero_naming_the_flag(args: list[str], flag: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "zmesh", "node", "--port", "0", *args], capture_output=True, text=True, timeout=20, cwd=ROOT
    )
    assert result.returncode != 0
    assert "listening on" not in result.stdout
    assert flag in result.stderr, result.stderr
