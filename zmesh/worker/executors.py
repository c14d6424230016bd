"""How a worker runs the calls it receives: inline on the main thread, on threads, or on an asyncio loop.

An executor decides *how* calls run (ordering, concurrency, groups); a ``Target``
decides *what* runs and how a call is decoded and its result framed — an actor's
methods today (``worker.ActorWorker``). Remote functions and generators plug in as
other targets, or as executors that answer one call with several messages.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import zmq

from zmesh.runtime import Runtime, calls
from zmesh.transport import protocol, serialization, sockets
from zmesh.worker.streams import Credit, Credits

CallItem = calls.CallItem
Reply = tuple[tuple[Any, ...], list[Any]]  # a result's batch entry and its frames


class Target(Protocol):
    """What an executor runs."""

    rt: Runtime
    limits: dict[str, int]  # concurrency group -> how many of its calls may run at once
    call_target: calls.CallTarget  # the actor and incarnation a CALL batch must name to run here
    message_type: bytes  # what its callers send: CALL (an actor's methods) or TASK (a task worker's functions)
    credits: Credits  # its streaming calls' producers, where acks land

    def split(self, identity: bytes, msg: protocol.Message) -> tuple[calls.CallTarget, list[Any]]:
        """The target a batch names and its items, in order; ProtocolError if malformed."""

    def keep_code(self, items: list[Any]) -> None:
        """Items go back to their caller unrun: keep any code they carry, which later ones will not (tasks)."""

    def refusal(self, target: calls.CallTarget, items: list[CallItem]) -> list[Any]:
        """The frames refusing a batch meant for ``target`` (another actor or incarnation), unrun."""

    def group_of(self, method_name: str, group: str | None) -> str | None:
        """The group a call runs in; None for a group the target does not define."""

    def run(self, item: Any) -> Reply:
        """Run one call (a CallItem, or a task's TaskItem) on this thread: decode, invoke, frame the result (errors included)."""

    async def run_async(self, item: Any) -> Reply:
        """The same on an asyncio loop: coroutines are awaited, refs in the arguments too."""


class Executor(Protocol):
    def submit(self, items: list[CallItem]) -> None:
        """Calls the I/O thread received, in order (not used by ``Inline``, whose calls come on its own sockets)."""

    def serve(self) -> None:
        """Run calls on the main thread until the process ends."""


# Results of one batch's quick calls leave together: one message, one encryption and one wake-up of
# the caller for many results (pipelined calls ran 1.85x as fast). None is held past _HOLD_S: the main
# thread sends what it holds before the next call once it is that old, and the flusher thread sends it
# during a call that takes longer. The last call of a batch (a synchronous call's only one) goes at once.
_HOLD_S = 0.001
_HOLD_MAX = 64  # results in one message at most


class Inline:
    """One call at a time on the main thread, in arrival order, on call sockets of its own.

    The main thread receives, runs and answers each call itself: two thread hand-offs
    fewer per call than going through the I/O thread. ``_lock`` guards the sockets and
    the held results: the main thread holds it except while a call runs or while it
    sleeps in epoll; the flusher takes it only to send results that waited too long.
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        rt = target.rt
        self.sockets, self.address = sockets.servers(rt.context, rt.security, rt.listen_host, rt.socket_dir)
        # The call being answered now, (socket, caller identity): prints of the creator's calls travel ahead of the result.
        self.current: tuple[sockets.Socket, bytes] | None = None
        self._lock = threading.Lock()
        self._held: list[tuple[Any, ...]] = []
        self._held_frames: list[Any] = []
        self._held_to: tuple[sockets.Socket, bytes] | None = None
        self._held_since = 0.0
        self._holding = threading.Event()  # set while results are held: the flusher watches them
        self._flusher: threading.Thread | None = None
        self._epoll = select.epoll()
        self._by_fd = {sockets.fileno(server): server for server in self.sockets}
        # Messages a streaming call's wait read off the sockets that are not its acks: run after it, in order.
        self._deferred: collections.deque[tuple[sockets.Socket, list[Any]]] = collections.deque()
        self._pumped = False  # a streaming call read the sockets itself: their epoll signals may be spent
        # Set while the running task waits in get: what is queued behind it goes back to its callers unrun, as it
        # comes (the task may wait for one of them). Tasks only: an actor's calls wait their turn, in order.
        self._giving_back = threading.Event()
        # The batch being answered and the index of the call running now: the rest of it goes back first.
        self._batch: tuple[sockets.Socket, bytes, list[Any], int] | None = None
        self._batch_given = False
        self._giver: threading.Thread | None = None

    def submit(self, items: list[CallItem]) -> None:
        raise protocol.ProtocolError("a sequential actor takes calls on its own sockets only")

    def serve(self) -> None:
        # epoll on the sockets' descriptors, then ask each socket: cheaper than zmq_poll per call.
        waiter, by_fd = self._epoll, self._by_fd
        for fd in by_fd:
            waiter.register(fd, select.EPOLLIN)
        ready = list(self.sockets)
        self._lock.acquire()
        while True:
            for sock in ready:
                # Answering sends on ``sock``, which may swallow its fd's next signal: ask it again each time.
                while (message := self._next_message(sock)) is not None:
                    self._answer(*message)
            if self._pumped:
                self._pumped = False
                ready = list(self.sockets)
                continue
            self._lock.release()
            try:
                ready = [by_fd[fd] for fd, _ in waiter.poll()]
            finally:
                self._lock.acquire()

    def _next_message(self, sock: sockets.Socket) -> tuple[sockets.Socket, list[Any]] | None:
        """What a streaming call deferred comes first: it was received before anything still in the sockets."""
        if self._deferred:
            return self._deferred.popleft()
        if sockets.readable(sock):
            return sock, sockets.recv(sock)
        return None

    def _answer(self, sock: sockets.Socket, frames: list[Any]) -> None:
        rt = self.target.rt
        try:
            msg = protocol.decode(frames[1:])
            if msg.type == protocol.RELEASE_LENT and len(msg.header) == 1:
                rt.release_lent(frames[0], msg.header[0])
                return
            if msg.type == protocol.STREAM_ACK:
                self.target.credits.on_ack(frames[0], msg)  # late: that stream ended already
                return
            if msg.type != self.target.message_type:
                raise protocol.ProtocolError(f"unexpected {msg.type!r} on a worker's call socket")
            target, items = self.target.split(frames[0], msg)
        except (protocol.ProtocolError, serialization.DeserializationError) as exc:
            rt.drop(frames[0], exc)
            return
        if target != self.target.call_target:
            try:
                sockets.send(sock, [frames[0], *self.target.refusal(target, items)])
            except zmq.ZMQError:
                pass  # the caller is gone
            return
        last = len(items) - 1
        for index, item in enumerate(items):
            if self._held and time.monotonic() - self._held_since >= _HOLD_S:
                self._send_held()
            self.current = (sock, item[0])
            self._batch = (sock, item[0], items, index)
            self._lock.release()
            try:
                entry, flat = self.target.run(item)
            finally:
                self._lock.acquire()
                self.current = None
            if not self._held:
                self._held_to, self._held_since = (sock, item[0]), time.monotonic()
            self._held.append(entry)
            self._held_frames.extend(flat)
            self._batch = None
            if index == last or len(self._held) >= _HOLD_MAX or self._batch_given:
                self._send_held()
            elif len(self._held) == 1:
                self._watch_held()
            if self._batch_given:
                self._batch_given = False
                return  # the rest went back to its caller while this call waited

    # ------------------------------------------------------------------ a task waiting in get gives its queue back

    def give_back(self, blocked: bool) -> None:
        """The running task starts (True) or stops (False) waiting in get (main thread, during the task)."""
        if not blocked:
            with self._lock:
                self._giving_back.clear()
                self._pumped = True  # the giver may have read signals the main thread's epoll now misses
            return
        with self._lock:
            self._send_held()
            batch = self._batch
            if batch is not None and not self._batch_given:
                self._batch_given = True
                sock, identity, items, index = batch
                self._return(sock, identity, items[index + 1 :])
            self._giving_back.set()
            self._give_back_now()
        if self._giver is None:
            self._giver = threading.Thread(target=self._give_back_late, name="zmesh-give-back", daemon=True)
            self._giver.start()

    def _give_back_late(self) -> None:
        """While the running task waits: tasks that arrive meanwhile go back too, within 20 ms."""
        while True:
            self._giving_back.wait()
            time.sleep(0.02)
            with self._lock:
                if self._giving_back.is_set():
                    self._give_back_now()

    def _give_back_now(self) -> None:
        """Read the sockets: tasks go back unrun, acks and releases are handled, the rest waits (``_lock`` held)."""
        for sock in self.sockets:
            while sockets.readable(sock):
                self._between_items(sock, sockets.recv(sock))
        kept: collections.deque[tuple[sockets.Socket, list[Any]]] = collections.deque()
        for sock, frames in self._deferred:
            try:
                msg = protocol.decode(frames[1:])
                if msg.type != self.target.message_type:
                    raise protocol.ProtocolError("not a task")
                target, items = self.target.split(frames[0], msg)
            except (protocol.ProtocolError, serialization.DeserializationError):
                kept.append((sock, frames))  # answered (or dropped) after the task, as it would have been
                continue
            if target != self.target.call_target:
                kept.append((sock, frames))
                continue
            self._return(sock, frames[0], items)
        self._deferred = kept

    def _return(self, sock: sockets.Socket, identity: bytes, items: list[Any]) -> None:
        if not items:
            return
        self.target.keep_code(items)
        try:
            sockets.send(sock, [identity, *calls.refusal(self.target.call_target, items, protocol.RETURNED)])
        except zmq.ZMQError:
            pass  # the caller is gone

    def send_item(self, frames: list[Any]) -> None:
        """Send a streaming call's item to its caller (main thread, during the call); earlier calls' results go first."""
        assert self.current is not None
        sock, identity = self.current
        with self._lock:
            self._send_held()
            try:
                sockets.send(sock, [identity, *frames])
            except zmq.ZMQError:
                pass  # the caller is gone: it will never ack, and the producer stops when the node says so

    def wait_credit(self, credit: Credit, index: int, timeout: float) -> bool:
        """Read the call sockets until ``credit`` allows item ``index`` (main thread, during a streaming call).

        Acks and releases are handled at once; calls (and anything else) wait in ``_deferred``
        for after the streaming call, in the order they came. False after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            self._pumped = True
            while True:
                for sock in self.sockets:
                    while sockets.readable(sock):
                        self._between_items(sock, sockets.recv(sock))
                if credit.cancelled or credit.allows(index):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.release()
                try:
                    # Short naps: a send by the flusher may swallow a socket's signal.
                    self._epoll.poll(min(left, 0.05))
                finally:
                    self._lock.acquire()

    def _between_items(self, sock: sockets.Socket, frames: list[Any]) -> None:
        try:
            msg = protocol.decode(frames[1:])
            if msg.type == protocol.STREAM_ACK:
                self.target.credits.on_ack(frames[0], msg)
                return
        except (protocol.ProtocolError, serialization.DeserializationError) as exc:
            self.target.rt.drop(frames[0], exc)
            return
        if msg.type == protocol.RELEASE_LENT and len(msg.header) == 1:
            self.target.rt.release_lent(frames[0], msg.header[0])
            return
        self._deferred.append((sock, frames))

    def _send_held(self) -> None:
        """Send the held results as one message (with ``_lock`` held)."""
        held, frames, to = self._held, self._held_frames, self._held_to
        self._held, self._held_frames, self._held_to = [], [], None
        if not held or to is None:
            return
        sock, identity = to
        try:
            sockets.send(sock, [identity, *calls.message(calls.RESULT, held, frames)])
        except zmq.ZMQError:
            pass  # the caller is gone

    def _watch_held(self) -> None:
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_late, name="zmesh-results", daemon=True)
            self._flusher.start()
        self._holding.set()

    def _flush_late(self) -> None:
        """The flusher: sends results held past ``_HOLD_S`` while the main thread runs a long call."""
        while True:
            self._holding.wait()
            time.sleep(_HOLD_S)
            with self._lock:
                if self._held and time.monotonic() - self._held_since >= _HOLD_S:
                    self._send_held()
                if not self._held:
                    self._holding.clear()

    def send_ahead(self, frames: list[Any], only_to: bytes | None) -> bool:
        """Send ``frames`` to the caller of the call running now, ahead of its result (main thread only)."""
        current = self.current
        if current is None or current[1] != only_to or threading.current_thread() is not threading.main_thread():
            return False
        sock, identity = current
        with self._lock:
            self._send_held()  # results of the calls before this one go first, as they would have
            try:
                sockets.send(sock, [identity, *frames])
            except zmq.ZMQError:
                return False
        return True


class Threaded:
    """Calls on threads: ``limit`` at a time per concurrency group (``max_concurrency`` for the default one)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.inbox: queue.SimpleQueue[CallItem | None] = queue.SimpleQueue()

    def submit(self, items: list[CallItem]) -> None:
        for item in items:
            self.inbox.put(item)

    def serve(self) -> None:
        target = self.target
        pools = {g: ThreadPoolExecutor(max_workers=n, thread_name_prefix=f"zmesh-{g}") for g, n in target.limits.items()}
        while (item := self.inbox.get()) is not None:
            group = target.group_of(item[2], item[3])
            if group is None:
                self._execute(item)  # answers with the error at once
            else:
                pools[group].submit(self._execute, item)

    def _execute(self, item: CallItem) -> None:
        self.target.rt.send_result(item[0], *self.target.run(item))


class AsyncLoop:
    """Calls as tasks on one asyncio loop; a semaphore per concurrency group bounds how many run at once."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.loop: asyncio.AbstractEventLoop | None = None
        self._early: list[CallItem] = []  # calls that arrived before the loop ran
        self._handoff = threading.Lock()  # orders "the loop is set" against calls arriving on the I/O thread
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, items: list[CallItem]) -> None:
        # Under the hand-off lock: a call must not land in the early list after the loop took it for good.
        with self._handoff:
            if self.loop is None:
                self._early.extend(items)
                return
            self.loop.call_soon_threadsafe(self._dispatch, items)

    def serve(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._semaphores = {g: asyncio.Semaphore(n) for g, n in self.target.limits.items()}
        with self._handoff:
            self.loop = asyncio.get_running_loop()
            early, self._early = self._early, []
        self._dispatch(early)
        await asyncio.Event().wait()  # the worker runs until its process ends

    def _dispatch(self, items: list[CallItem]) -> None:
        for item in items:
            task = asyncio.ensure_future(self._execute(item))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _execute(self, item: CallItem) -> None:
        target = self.target
        group = target.group_of(item[2], item[3]) or next(iter(self._semaphores))
        async with self._semaphores[group]:
            entry, frames = await target.run_async(item)
        target.rt.send_result(item[0], entry, frames)
