"""A process whose node goes away while it waits for the node's welcome learns it at once, not after its timeout.

Regression: a worker forked just before its node stopped waited the full 5 s for a
welcome that could never come, then printed a traceback into the node's output.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import zmq

from zmesh.exceptions import NodeUnavailableError
from zmesh.runtime import Runtime
from zmesh.transport import protocol, sockets

HELLO_TIMEOUT_S = 60.0  # far beyond the test's own timeout: the answer must come from the lost connection


@pytest.mark.timeout(30)
def test_a_hello_fails_at_once_when_the_node_goes_away_before_answering(isolated_run_dir: Path) -> None:
    ctx = sockets.new_context()
    door = ctx.socket(zmq.ROUTER)
    door.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{isolated_run_dir}/door.sock"
    door.bind(address)
    outcome: list[BaseException | Runtime] = []

    def start() -> None:
        try:
            outcome.append(Runtime(address, kind="worker", token="t", connect_timeout=HELLO_TIMEOUT_S))
        except BaseException as exc:  # the test asserts on it
            outcome.append(exc)

    starter = threading.Thread(target=start, daemon=True)
    started_at = time.monotonic()
    starter.start()
    try:
        # The "node" takes the hello, then dies without answering it.
        assert door.poll(20_000), "no hello arrived"
        frames = door.recv_multipart()
        assert protocol.decode_json(frames[1:], protocol.HELLO_TAG) is not None
        door.close(linger=0)
        starter.join(timeout=20)
        assert not starter.is_alive(), "the hello still waits for a node that is gone"
    finally:
        if not door.closed:
            door.close(linger=0)
        ctx.term()
    (result,) = outcome
    assert isinstance(result, NodeUnavailableError), result
    assert "went away" in str(result)
    assert time.monotonic() - started_at < HELLO_TIMEOUT_S
