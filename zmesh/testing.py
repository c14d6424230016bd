"""Test harness: a real `zmesh node` daemon in a subprocess, condition waits, leak checks."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

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
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "zmesh", "node", "--port", "0", *args],
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
            if "zmesh.node.zygote" not in cmdline and "zmesh node" not in cmdline:
                continue
            if run_dir is not None and proc.environ().get("ZMESH_RUN_DIR") != run_dir:
                continue
            found.append(proc)
        except psutil.Error:
            continue
    return found
