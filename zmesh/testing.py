"""Test harnesses: a real `zmesh node` daemon in a subprocess, a multi-node LocalCluster, condition waits."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psutil

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(interval)


def _stop_with_parent() -> None:
    """In the child, before exec: the kernel sends SIGTERM when the process that started it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class NodeProcess:
    """A `zmesh node` daemon running as a child process, for one test."""

    def __init__(self, run_dir: str, *args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> None:
        self.run_dir = run_dir
        self.env = {**os.environ, "ZMESH_RUN_DIR": run_dir, **(env or {})}
        # A free port unless the caller chose one (the node refuses a setting given both as a flag and --config).
        given = [a for i, a in enumerate(args) if a == "--port" or (i > 0 and args[i - 1] == "--config" and a.startswith("port="))]
        port = [] if given else ["--port", "0"]
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "zmesh", "node", *port, *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # A test runner killed mid-test (a timeout, Ctrl-C twice) must not leave its nodes running.
            preexec_fn=_stop_with_parent,
        )
        # The banner comes once drivers can find the node; log lines may come before it.
        line = ""
        self._early: list[str] = []
        while self.proc.stdout is not None:
            line = self.proc.stdout.readline()
            if not line or line.startswith("zmesh node "):
                break
            self._early.append(line)
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"zmesh node did not start: {getattr(self, 'output', '')!r}")
        self.address = line.rsplit(" ", 1)[1].strip()
        # Read the node's output as it comes: a full pipe would block the node and its workers' prints.
        self._reader = threading.Thread(target=self._read_output, name="zmesh-node-output", daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._early.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def descendants(self) -> list[psutil.Process]:
        try:
            children: list[psutil.Process] = psutil.Process(self.pid).children(recursive=True)
            return children
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code. Safe to call twice."""
        if hasattr(self, "output"):
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.join(timeout)
        elif self.proc.stdout:
            self._early.append(self.proc.stdout.read())
        if self.proc.stdout:
            self.proc.stdout.close()
        self.output = "".join(self._early)
        return self.proc.returncode

    def output_so_far(self) -> str:
        """What the node has printed until now (its log, and lines its workers could not deliver)."""
        return "".join(self._early)


def zmesh_processes(run_dir: str | None = None) -> list[psutil.Process]:
    """Live zmesh processes (nodes, zygotes, forked workers) of this user.

    With ``run_dir``, only those started with that ``ZMESH_RUN_DIR`` in their
    environment, which is how a test finds exactly the processes it started.
    """
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.pid == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            if "zmesh.node.pool.zygote" not in cmdline and "zmesh node" not in cmdline:
                continue
            if run_dir is not None and proc.environ().get("ZMESH_RUN_DIR") != run_dir:
                continue
            found.append(proc)
        except psutil.Error:
            continue
    return found


# Mesh timings for tests: detection within about a second, still tolerant of a busy 2-core machine.
FAST_MESH = {
    "probe_interval_s": "0.1",
    "probe_timeout_s": "0.08",
    "suspicion_min_s": "0.8",
    "suspicion_max_s": "1.6",
    "gossip_round_s": "0.05",
    "sync_interval_s": "0.5",
    "discovery_interval_s": "0.2",
}


def _config_text(value: Any) -> str:
    """A node setting as ``--config KEY=VALUE`` takes it."""
    import json

    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "auto"  # the one setting that takes None (mdns)
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


class LocalCluster:
    """N real `zmesh node` processes on 127.0.0.1 that form one mesh: for testing actor code across nodes.

    ::

        with LocalCluster(nodes=3, num_cpus=2) as cluster:
            cluster.connect()                    # this process becomes a driver of node 0
            a = Counter.options(scheduling_strategy="SPREAD").remote()
            cluster.kill_node(1)                 # SIGKILL; the mesh declares it dead within seconds

    The nodes share a private run directory and cluster name, so they find each other
    with no other setting; every process is stopped and the directory removed on exit,
    also when the test fails. ``config`` sets any node setting (``zmesh/node/config.py``),
    those with an argument here too (``num_cpus``, ``num_gpus``, ``resources``, ``cluster``), but
    not both ways at once; ``fast=True`` (the default) shrinks the failure-detection timings for quick tests.
    """

    def __init__(
        self,
        nodes: int = 3,
        num_cpus: float | None = None,
        resources: dict[str, float] | list[dict[str, float]] | None = None,
        *,
        num_gpus: float | None = None,
        config: dict[str, Any] | None = None,
        fast: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        if nodes < 1:
            raise ValueError(f"a LocalCluster needs at least one node, got {nodes}")
        for key, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus), ("resources", resources)):
            if value is not None and key in (config or {}):
                raise ValueError(f"{key} is given both as an argument and in config; give only one")
        self.size = nodes
        self.num_cpus = num_cpus if num_cpus is not None else 2
        self.num_gpus = num_gpus if num_gpus is not None else 0
        self.resources = resources
        self.config = {**(FAST_MESH if fast else {}), **{k: _config_text(v) for k, v in (config or {}).items()}}
        self.env = dict(env or {})
        self.timeout = timeout
        self.name = self.config.get("cluster") or f"lc-{os.getpid()}-{os.urandom(3).hex()}"
        self.nodes: list[NodeProcess] = []
        self.run_dir = ""
        self._frozen: set[int] = set()
        self._connected = False

    # --- lifecycle

    def __enter__(self) -> LocalCluster:
        import tempfile

        self.run_dir = tempfile.mkdtemp(prefix="zmesh-cluster-")
        try:
            for i in range(self.size):
                self._start(i)
            self.wait_converged()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _node_args(self, i: int, resources: dict[str, float] | None) -> list[str]:
        if isinstance(self.resources, list):
            resources = resources if resources is not None else (self.resources[i] if i < len(self.resources) else None)
        elif resources is None:
            resources = self.resources
        if resources and "resources" in self.config:
            raise ValueError("resources are given both as an argument and in config; give only one")
        flags = {"cluster": self.name, "num_cpus": str(self.num_cpus), "num_gpus": str(self.num_gpus)}
        if resources:
            import json

            flags["resources"] = json.dumps(resources)
        args = []
        for key, value in flags.items():
            if key not in self.config:  # config gives it instead
                args += ["--" + key.replace("_", "-"), value]
        for key, value in self.config.items():
            args += ["--config", f"{key}={value}"]
        return args

    def _start(self, i: int, resources: dict[str, float] | None = None) -> NodeProcess:
        node = NodeProcess(self.run_dir, *self._node_args(i, resources), env=self.env)
        self.nodes.append(node)
        return node

    def close(self) -> None:
        """Stop every node (thawing frozen ones first) and remove the run directory; safe to call twice."""
        import shutil

        if self._connected:
            import zmesh

            zmesh.shutdown()
            self._connected = False
        for i in list(self._frozen):
            self.thaw_node(i)
        for node in self.nodes:
            node.stop()
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # --- using it

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def connect(self, i: int = 0, **init_options: Any) -> Any:
        """Make this process a driver of node ``i`` (``zmesh.init``); ``close()`` shuts it down."""
        import zmesh

        if "cluster_key" in self.config:
            init_options.setdefault("cluster_key", self.config["cluster_key"])
        info = zmesh.init(address=self.nodes[i].address, **init_options)
        self._connected = True
        return info

    def node_id(self, i: int) -> str:
        return str(self.status(i)["node_id"])

    def status(self, i: int, timeout: float = 5.0) -> dict[str, Any]:
        """Node ``i``'s status (members, actors, waiting creations), asked without a driver."""
        return dict(self._ask(i, "status", timeout=timeout))

    def members(self, i: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        return list(self._ask(i, "members", timeout=timeout))

    def _ask(self, i: int, op: str, *args: Any, timeout: float = 5.0) -> Any:
        from zmesh.node.admin import request
        from zmesh.node.config import parse_field
        from zmesh.transport.security import Security, resolve_key

        if parse_field("insecure", self.config.get("insecure", "off")):
            security = Security(None)
        else:
            path = self.config.get("cluster_key") or self.env.get("ZMESH_CLUSTER_KEY_FILE") or os.environ.get("ZMESH_CLUSTER_KEY_FILE")
            security = Security(resolve_key(path)[0])
        return request(f"tcp://{self.nodes[i].address}", op, args, security=security, timeout=timeout)

    def live_indexes(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.proc.poll() is None and i not in self._frozen]

    def converged(self, indexes: list[int] | None = None) -> bool:
        """Whether each of these nodes (default: every running, unfrozen one) sees exactly the others alive."""
        indexes = self.live_indexes() if indexes is None else indexes
        wanted = {"tcp://" + self.nodes[i].address for i in indexes}
        for i in indexes:
            try:
                members = self.members(i, timeout=2.0)
            except Exception:
                return False
            alive = {m["address"] for m in members if m["state"] == "ALIVE"}
            if alive != wanted:
                return False
        return True

    def wait_converged(self, timeout: float | None = None) -> None:
        wait_for(self.converged, timeout or self.timeout, interval=0.1, what="the LocalCluster's nodes to see each other")

    def wait_for(self, predicate: Callable[[], T], timeout: float = 10.0) -> T:
        return wait_for(predicate, timeout, interval=0.05)

    # --- faults

    def add_node(self, resources: dict[str, float] | None = None, wait: bool = True) -> int:
        """Start one more node; returns its index once every node sees it (unless ``wait=False``)."""
        self._start(len(self.nodes), resources)
        if wait:
            self.wait_converged()
        return len(self.nodes) - 1

    def kill_node(self, i: int) -> None:
        """SIGKILL node ``i`` (its workers die with it): the mesh must notice on its own."""
        node = self.nodes[i]
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()
        self._frozen.discard(i)
        node.stop()

    def stop_node(self, i: int) -> int:
        """SIGTERM node ``i``: it says goodbye and its peers drop it at once."""
        self._frozen.discard(i)
        return self.nodes[i].stop()

    def freeze_node(self, i: int) -> None:
        """SIGSTOP node ``i``: it stops answering without closing a connection."""
        os.kill(self.nodes[i].pid, signal.SIGSTOP)
        self._frozen.add(i)

    def thaw_node(self, i: int) -> None:
        os.kill(self.nodes[i].pid, signal.SIGCONT)
        self._frozen.discard(i)
