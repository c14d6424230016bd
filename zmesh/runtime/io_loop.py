"""The I/O thread: epoll over the sockets' descriptors, wake-ups, and who may touch a socket when.

One thread serves every socket of a process. Whoever holds ``lock`` may use the
sockets: the I/O thread, except while it sleeps in epoll on the sockets'
descriptors (which touches no socket); then a user thread may take the lock to
send something itself instead of waking the I/O thread (a third of a
synchronous call's latency). User threads hand work over with ``push``: a deque,
and an eventfd written only when the thread sleeps.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from zmesh.transport import sockets

logger = logging.getLogger(__name__)

# Messages taken from one socket before the others get their turn.
_FAIR_SHARE = 1000
# The loop wakes at least this often, for its periodic work.
TICK_S = 1.0

MessageHandler = Callable[[list[Any]], None]
MalformedHandler = Callable[[sockets.Socket, list[Any], BaseException], None]


class IoLoop:
    def __init__(
        self,
        process_outbox: Callable[[deque[Any]], bool],
        after_round: Callable[[], None],
        on_malformed: MalformedHandler,
        malformed: tuple[type[BaseException], ...],
    ) -> None:
        self.lock = threading.Lock()
        self.outbox: deque[Any] = deque()
        self._process_outbox = process_outbox  # drains the outbox in order; False means stop
        self._after_round = after_round
        self._on_malformed = on_malformed
        self._malformed = malformed
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Guards the wake-up descriptor against a write after it was closed: the kernel reuses the number at
        # once, often for one of ZeroMQ's own eventfds, and a stray 1 there makes ZeroMQ read a command that
        # was never sent and abort the process. Reentrant: a release from __del__ may wake us inside wake().
        self._wake_lock = threading.RLock()
        self._sleeping = False
        self._epoll = select.epoll()
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._by_fd: dict[int, sockets.Socket] = {}
        self._fd_of: dict[sockets.Socket, int] = {}
        self._on_message: dict[sockets.Socket, MessageHandler] = {}
        self._on_ready: dict[sockets.Socket, Callable[[], None]] = {}
        self._touched: set[sockets.Socket] = set()
        self._thread = threading.Thread(target=self._run, name="zmesh-io", daemon=True)
        self._server = self._thread  # the thread serving the sockets now: the I/O thread, or one waiting in serve_until
        self._closers: list[Callable[[], None]] = []

    def start(self) -> None:
        self._thread.start()

    @property
    def on_io_thread(self) -> bool:
        """Whether this thread serves the sockets now (and may send on them without handing over)."""
        return threading.current_thread() is self._server

    def serve_until(self, sock: sockets.Socket, done: Callable[[], bool], limit_ns: int) -> bool:
        """Receive from ``sock`` on this thread until ``done()``, for at most ``limit_ns``; True if done.

        For a thread about to wait for one answer on ``sock`` while the I/O thread sleeps: it
        polls the socket itself instead of sleeping until the I/O thread wakes it. Stops
        early when work is handed to the I/O thread meanwhile.
        """
        if not self.lock.acquire(blocking=False):
            return done()
        if not self._thread.is_alive():  # it stopped and closed the sockets (leaving the lock free)
            self.lock.release()
            return done()
        fd = self._fd_of.get(sock)
        if fd is None:  # not watched (any more)
            self.lock.release()
            return done()
        deadline = time.perf_counter_ns() + limit_ns
        self._server = threading.current_thread()
        # The I/O thread would wake for this socket's answer too, and then fight this thread for the
        # GIL: it does not watch the socket meanwhile (re-armed below, which reports an answer come since).
        self._epoll.modify(fd, 0)
        try:
            while not self.outbox and sock in self._on_message:
                if sockets.readable(sock):
                    self._drain(sock)
                    if done():
                        return True
                elif time.perf_counter_ns() > deadline:
                    break
                else:
                    # Let a thread of this core run: ZeroMQ's own I/O thread may be the one bringing the answer.
                    os.sched_yield()
            return done()
        except zmq.ZMQError:
            return done()  # closed meanwhile: the I/O thread reports what was lost
        finally:
            if self._fd_of.get(sock) == fd:  # a handler may have closed it meanwhile
                self._epoll.modify(fd, select.EPOLLIN)
            self._server = self._thread
            self.lock.release()

    # --- sockets (I/O thread, or before start)

    def watch(self, sock: sockets.Socket, on_message: MessageHandler) -> None:
        """Receive every message of ``sock`` and pass its frames to ``on_message``."""
        self._on_message[sock] = on_message
        self._register(sock)

    def watch_ready(self, sock: sockets.Socket, on_ready: Callable[[], None]) -> None:
        """Call ``on_ready`` when ``sock`` may be readable; it reads the socket itself (monitors, ZAP)."""
        self._on_ready[sock] = on_ready
        self._register(sock)

    def _register(self, sock: sockets.Socket) -> None:
        fd = sockets.fileno(sock)
        self._by_fd[fd] = sock
        self._fd_of[sock] = fd
        self._epoll.register(fd, select.EPOLLIN)
        self._touched.add(sock)

    def unwatch(self, sock: sockets.Socket) -> None:
        fd = self._fd_of.pop(sock, None)
        if fd is None:
            fd = sockets.fileno(sock)
        self._by_fd.pop(fd, None)
        self._epoll.unregister(fd)
        self._touched.discard(sock)
        self._on_message.pop(sock, None)
        self._on_ready.pop(sock, None)

    def touched(self, sock: sockets.Socket) -> None:
        """Look at ``sock`` again this round: a send on it may have swallowed its descriptor's signal."""
        self._touched.add(sock)

    def on_close(self, closer: Callable[[], None]) -> None:
        """Run ``closer`` on the I/O thread when it stops (closing sockets must happen there)."""
        self._closers.append(closer)

    # --- hand-over from any thread

    def push(self, item: Any) -> None:
        """Queue work for the I/O thread; wakes it only when it sleeps."""
        self.outbox.append(item)
        if self._sleeping:
            self.wake()

    def nudge(self) -> None:
        """Wake the I/O thread only if it sleeps (it looks at its queues before it sleeps again)."""
        if self._sleeping:
            self.wake()

    def wake(self) -> None:
        with self._wake_lock:
            if self._wake_fd < 0:
                return  # stopped: nobody to wake
            try:
                os.eventfd_write(self._wake_fd, 1)
            except OSError:
                pass

    def stop(self, stop_item: Any, timeout: float = 5.0) -> None:
        """Push ``stop_item`` (the outbox processor answers False to it) and wait for the thread."""
        self.push(stop_item)
        self.wake()
        if self._thread.is_alive() and not self.on_io_thread:
            self._thread.join(timeout)
        if self._thread.is_alive():
            # Still reading the descriptor (stopping from the I/O thread itself, or a handler that hangs): leave
            # it open rather than let the number pass to another file under the thread's feet.
            return
        with self._wake_lock:
            fd, self._wake_fd = self._wake_fd, -1
        if fd >= 0:
            os.close(fd)

    @property
    def stopped(self) -> bool:
        """Whether the I/O thread has ended (and, with it, every use of the sockets it served)."""
        return not self._thread.is_alive()

    # --- the thread

    def _run(self) -> None:
        lock = self.lock
        lock.acquire()
        try:
            while True:
                try:
                    if not self._serve_ready():
                        break
                except zmq.ContextTerminated:
                    break
                except Exception:
                    logger.exception("zmesh I/O thread: unexpected error; continuing")
                # Announce the nap first, then look again: a submission between the two sees the flag.
                self._sleeping = True
                if self.outbox or self._touched:
                    self._sleeping = False
                    continue
                lock.release()
                try:
                    events = self._epoll.poll(TICK_S)
                finally:
                    self._sleeping = False
                    lock.acquire()
                for fd, _ in events:
                    sock = self._by_fd.get(fd)
                    if sock is not None:
                        self._touched.add(sock)
                    elif fd == self._wake_fd:
                        try:
                            os.eventfd_read(self._wake_fd)
                        except BlockingIOError:
                            pass
        finally:
            for closer in self._closers:
                try:
                    closer()
                except Exception:
                    logger.exception("zmesh I/O thread: error while closing")
            self._epoll.close()
            lock.release()

    def _serve_ready(self) -> bool:
        """Serve readable sockets and the submitted work until neither is left; False means stop."""
        outbox = self.outbox
        while True:
            touched, self._touched = self._touched, set()
            for sock in touched:
                self._drain(sock)
            if outbox and not self._process_outbox(outbox):
                return False
            if not self._touched and not outbox:
                break
        self._after_round()
        return True

    def _drain(self, sock: sockets.Socket) -> None:
        """Receive what ``sock`` holds; a send may swallow its fd's signal, so always ask the socket."""
        ready = self._on_ready.get(sock)
        if ready is not None:
            ready()
            return
        handler = self._on_message.get(sock)
        if handler is None:
            return
        for _ in range(_FAIR_SHARE):
            if not sockets.readable(sock):
                return
            frames = sockets.recv(sock)
            try:
                handler(frames)
            except self._malformed as exc:
                self._on_malformed(sock, frames, exc)
            except Exception:
                # Our bug, not the peer's: say so loudly, and go on serving.
                logger.exception("zmesh I/O thread: internal error while handling a message; continuing")
            if sock not in self._on_message:
                return  # the handler closed it
        self._touched.add(sock)  # more left: come back after the others had their turn
