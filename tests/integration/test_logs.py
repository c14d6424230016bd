"""Output of actors (print, logging) reaches the console of the driver that owns them, prefixed ``(Class pid=N)``."""

from __future__ import annotations

import re

from conftest import run_driver

from zmesh.testing import NodeProcess

# The driver records what reaches its stdout/stderr (still passing it through), so it can wait until the
# actor's lines have arrived before it exits: logs travel apart from results, so they may come after them.
SCRIPT = """
import logging
import os
import sys

import zmesh
from zmesh.testing import wait_for


class Tee:
    def __init__(self, inner):
        self.inner, self.seen = inner, ""

    def write(self, text):
        self.seen += text
        return self.inner.write(text)

    def flush(self):
        self.inner.flush()


@zmesh.remote
class Chatty:
    def talk(self, word):
        print("hello", word)
        print("to stderr", word, file=sys.stderr)
        print("line one\\nline two")
        logging.getLogger("chatty.app").warning("careful %s", word)
        return os.getpid()


@zmesh.remote
class Quiet:
    def pid(self):
        return os.getpid()


if __name__ == "__main__":
    sys.stdout, sys.stderr = Tee(sys.stdout), Tee(sys.stderr)
    zmesh.init(**({"num_cpus": 2} if "EMBEDDED" in os.environ else {}))
    chatty = Chatty.remote()
    pid = zmesh.get(chatty.talk.remote("world"), timeout=20)
    quiet = Quiet.remote()
    print("PIDS", pid, zmesh.get(quiet.pid.remote(), timeout=20), flush=True)
    wait_for(lambda: "careful world" in sys.stderr.seen and "line two" in sys.stdout.seen, timeout=15, what="actor output")
    zmesh.shutdown()
"""


def check_output(stdout: str, stderr: str) -> None:
    match = re.search(r"^PIDS (\d+) (\d+)$", stdout, re.MULTILINE)
    assert match, stdout
    pid, quiet_pid = match.groups()
    prefix = f"(Chatty pid={pid}) "
    out_lines = stdout.splitlines()
    err_lines = stderr.splitlines()
    # print() to stdout reaches the driver's stdout, prefixed with the actor's class and pid; each line is prefixed.
    assert prefix + "hello world" in out_lines, stdout
    assert prefix + "line one" in out_lines, stdout
    assert prefix + "line two" in out_lines, stdout
    # print() to stderr and logging reach the driver's stderr.
    assert prefix + "to stderr world" in err_lines, stderr
    assert any(line.startswith(prefix) and line.endswith("careful world") for line in err_lines), stderr
    assert "hello world" not in stderr and "to stderr" not in stdout
    # The other actor printed nothing.
    assert f"pid={quiet_pid}" not in stdout + stderr


def test_actor_output_reaches_driver_console_embedded() -> None:
    result = run_driver(SCRIPT, env={"EMBEDDED": "1"})
    assert result.returncode == 0, result.stderr
    check_output(result.stdout, result.stderr)


def test_actor_output_reaches_driver_not_node(node: NodeProcess) -> None:
    result = run_driver(SCRIPT)
    assert result.returncode == 0, result.stderr
    check_output(result.stdout, result.stderr)


def test_a_line_printed_during_a_call_is_not_lost_when_the_driver_exits_at_once() -> None:
    code = (
        "import zmesh\n"
        "zmesh.init()\n"
        "@zmesh.remote\n"
        "class Talker:\n"
        "    def say(self, n):\n"
        "        print(f'last words {n}')\n"
        "        return n\n"
        "talker = Talker.remote()\n"
        "print(zmesh.get([talker.say.remote(n) for n in range(3)]))\n"
    )
    for _ in range(3):  # the line travels ahead of the result on the same connection: never behind it
        out = run_driver(code)
        assert out.returncode == 0, out.stderr
        for n in range(3):
            assert f"last words {n}" in out.stdout
