"""A wake-up after the I/O loop stopped writes nowhere.

Regression for a rare abort inside libzmq: a thread that woke the loop just as it
stopped wrote to the closed wake-up descriptor's number, which the kernel had given to
the next file opened (often one of ZeroMQ's own eventfds). ZeroMQ then read a command
that was never sent and aborted the process.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

import pytest

from zmesh.runtime.io_loop import IoLoop

_STOP = object()


def _outbox(outbox: deque[Any]) -> bool:
    while outbox:
        if outbox.popleft() is _STOP:
            return False
    return True


def _loop() -> IoLoop:
    return IoLoop(_outbox, lambda: None, lambda sock, frames, exc: None, (ValueError,))


@pytest.mark.timeout(30)
def test_a_wake_after_stop_does_not_write_to_the_next_file_given_the_number() -> None:
    loop = _loop()
    loop.start()
    loop.stop(_STOP)
    reused = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # the lowest free number: most likely the loop's old one
    try:
        loop.wake()
        loop.push("late work")
        with pytest.raises(BlockingIOError):
            os.eventfd_read(reused)  # nothing was written to it
    finally:
        os.close(reused)
    assert loop.stopped
