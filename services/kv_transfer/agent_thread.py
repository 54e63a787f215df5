"""One thread that owns a NIXL agent: runs the calls handed to it and keeps the agent
progressing between them.

Why a thread of our own rather than NIXL's progress thread: the UCX backend's progress
thread polls without pausing (the Python wrapper fixes its delay at 0), so every worker
would burn a whole core doing nothing, which halves a 2-core host. Without it, a UCX worker
advances only when the agent is called, so this thread calls ``get_new_notifs`` whenever it
has been idle for ``progress_interval_s`` (serving peers' connection traffic). Measured here
(2 cores, 16 MiB between two processes): 9 GB/s with a 1 ms interval and both cores
idle, against 5 GB/s with NIXL's progress threads spinning both cores.

Every call to the agent goes through this thread, so the agent is never used from two
threads at once, and a slow call never blocks an event loop.

A transfer lives on this thread from start to end (:meth:`AgentThread.transfer`): the
thread makes its handle, posts it, checks it every ``WATCH_INTERVAL_S`` while it is in
flight, releases it, and only then resolves the caller's future: one hop from the event
loop and one back per transfer. On a GPU, where CUDA IPC moves 16 MiB in about 0.15 ms,
each further hop (a separate post, watch and release) cost about as much as the copy.

A short transfer may skip both hops (:meth:`AgentThread.run_inline`): the caller's thread
takes the agent while the thread is between calls (one lock serialises every agent call),
posts, checks the transfer for a few hundred microseconds and releases it. An empty hop to
the thread and back costs 40-65 µs (measured here and on an H100), more than a device
copy of 16 MiB; a transfer still in flight after that wait is handed to the thread.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

PROGRESS_INTERVAL_S = 0.001
"""Longest the agent goes without progress. Each tick costs one short agent call."""
WATCH_INTERVAL_S = 0.00002
"""How often a transfer in flight is checked (only while one is: it keeps the thread busy)."""
TIMER_SLACK_NS = 1000
"""The thread's timer slack (Linux). By default the kernel may stretch a timed wait by 50 µs,
so a 20 µs watch took 81 µs here; with 1 µs it takes 30 µs. On a GPU, where a READ usually
ends just after its post, that wait is what a pull pays after the copy."""

LOCK_WAIT_S = 0.0001
"""How long :meth:`AgentThread.run_inline` waits for the agent (the thread's calls between
transfers, such as a progress tick, take microseconds; a longer one means the thread is
busy with something slow, and the transfer goes the threaded way behind it)."""

PR_SET_TIMERSLACK = 29
"""prctl option (linux/prctl.h)."""

_Job = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


@dataclass(frozen=True)
class Transfer:
    """One transfer run by :meth:`AgentThread.transfer`."""

    state: Future[str]
    """Its final state (``DONE``/``ERR``), set after its handle is released; cancel it to
    abandon the transfer."""
    released: Future[None]
    """Set once nothing of it can write local memory any more: its handle released, or
    never made."""


class AgentThread:
    def __init__(
        self,
        agent: Any,
        name: str,
        progress_interval_s: float = PROGRESS_INTERVAL_S,
        initializer: Callable[[], None] | None = None,
    ) -> None:
        """``initializer`` runs first on the thread (e.g. making a CUDA device current)."""
        self._agent = agent
        self._initializer = initializer
        self._interval = progress_interval_s
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._watched: list[tuple[Any, Transfer]] = []  # only touched on the thread
        self._stopped = False
        self._agent_lock = threading.Lock()
        """Held by whichever thread calls the agent: the agent's own thread, or a caller of
        :meth:`run_inline`. NIXL's agent is not called from two threads at once."""
        self._queue_lock = threading.Lock()
        """Makes "not stopped yet, so queue it" one step: a job queued after the stop
        sentinel would never run, and a caller waiting on it without a deadline hangs."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        # A worker that exits without close(): stop calling the agent before the
        # interpreter tears it down under this thread (which aborts the process).
        atexit.register(self.stop)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on the thread, after the calls submitted before it."""
        future: Future[T] = Future()
        with self._queue_lock:
            if self._stopped:
                raise RuntimeError("the NIXL agent thread has stopped")
            self._jobs.put((future, fn, args))
        return future

    def transfer(self, make_handle: Callable[[], Any]) -> Transfer:
        """Run one transfer on the thread: ``make_handle()`` builds its handle, the thread
        posts it, watches it and releases it. ``Transfer.state`` resolves, after the
        release, with the final state (``DONE`` or ``ERR``), or with the exception a NIXL
        call raised.

        Cancel ``state`` to abandon the transfer: one not yet made is never made, one in
        flight is released (NIXL aborts it) at the thread's next check; ``released`` says
        when, after which its local memory is no longer written.
        """
        transfer = Transfer(Future(), Future())
        self.submit(self._start, make_handle, transfer)
        return transfer

    def run_inline(self, make_handle: Callable[[], Any], wait_s: float) -> str | Transfer | None:
        """Run one transfer on the calling thread, as :meth:`transfer` would on the agent's:
        make its handle, post it, check it for up to ``wait_s``, release it.

        Returns the final state (``DONE``/``ERR``) once the handle is released; a
        :class:`Transfer` the agent thread watches from now on when it is still in flight
        after ``wait_s``; None, having done nothing, when the agent stays busy on its thread
        for ``LOCK_WAIT_S`` (call :meth:`transfer` then). A NIXL call's exception is
        raised, after the handle (if made) is released. Blocks the caller for about
        ``wait_s`` at most: for transfers whose post does not copy (device memory) or
        copies little.
        """
        if not self._agent_lock.acquire(timeout=LOCK_WAIT_S):
            return None
        try:
            if self._stopped:
                raise RuntimeError("the NIXL agent thread has stopped")
            handle = make_handle()
            try:
                state = self._agent.transfer(handle)
                deadline = time.perf_counter() + wait_s
                while state == "PROC" and time.perf_counter() < deadline:
                    state = self._agent.check_xfer_state(handle)
            except BaseException:
                self._release_handle(handle)
                raise
            if state != "PROC":
                self._release_handle(handle)
                return state
        finally:
            self._agent_lock.release()
        transfer = Transfer(Future(), Future())
        try:
            self.submit(self._watch, handle, transfer)
        except RuntimeError:  # stopped meanwhile: nobody will check it again
            with self._agent_lock:
                self._release(handle, transfer)
            raise
        return transfer

    def stop(self, timeout_s: float = 5.0) -> None:
        """Finish the calls already submitted, then end the thread (waits up to
        ``timeout_s``). Idempotent."""
        atexit.unregister(self.stop)
        with self._queue_lock:
            if not self._stopped:
                self._stopped = True
                self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        tighten_timer_slack(TIMER_SLACK_NS)
        if self._initializer is not None:
            try:
                self._initializer()
            except Exception as e:  # the agent still works, perhaps more slowly
                log.warning("the NIXL thread's initializer failed: %s", e)
        last_progress = time.monotonic()
        while True:
            try:
                wait = WATCH_INTERVAL_S if self._watched else self._interval
                job = self._jobs.get(timeout=wait)
            except queue.Empty:
                pass
            else:
                if job is None:
                    with self._agent_lock:
                        for handle, transfer in self._watched:
                            transfer.state.cancel()
                            self._release(handle, transfer)
                    return
                with self._agent_lock:
                    self._execute(*job)
                # The call itself progressed the agent: no tick right behind it, holding
                # the GIL while the loop wakes up to take the call's result.
                last_progress = time.monotonic()
            if self._watched:
                with self._agent_lock:
                    self._check_watched()
            if time.monotonic() - last_progress >= self._interval:
                with self._agent_lock:
                    self._progress()
                last_progress = time.monotonic()

    def _start(self, make_handle: Callable[[], Any], transfer: Transfer) -> None:
        if transfer.state.cancelled():  # abandoned before its turn came
            _settle(transfer.released, None)
            return
        try:
            handle = make_handle()
        except Exception as e:
            _settle(transfer.released, None)
            _settle(transfer.state, exception=e)
            return
        # Over shared memory (CMA) the copy happens inside the post: most host transfers
        # end here. On a GPU the post queues CUDA IPC copies that end a little later.
        if self._step(handle, transfer, self._agent.transfer):
            self._watched.append((handle, transfer))

    def _watch(self, handle: Any, transfer: Transfer) -> None:
        """Take over a transfer posted by :meth:`run_inline` that is still in flight."""
        if transfer.state.cancelled():
            self._release(handle, transfer)
        else:
            self._watched.append((handle, transfer))

    def _check_watched(self) -> None:
        check = self._agent.check_xfer_state
        self._watched = [(h, t) for h, t in self._watched if self._step(h, t, check)]

    def _step(self, handle: Any, transfer: Transfer, call: Callable[[Any], str]) -> bool:
        """Post or check the transfer with ``call``: True while it is in flight. Otherwise
        (ended, failed, or abandoned by its owner) its handle is released, then its state
        settled."""
        if transfer.state.cancelled():
            self._release(handle, transfer)
            return False
        try:
            state = call(handle)
        except Exception as e:
            self._release(handle, transfer)
            _settle(transfer.state, exception=e)
            return False
        if state == "PROC":
            return True
        self._release(handle, transfer)
        _settle(transfer.state, state)
        return False

    def _release(self, handle: Any, transfer: Transfer) -> None:
        self._release_handle(handle)
        _settle(transfer.released, None)

    def _release_handle(self, handle: Any) -> None:
        try:
            self._agent.release_xfer_handle(handle)
        except Exception as e:
            # NIXL could not cancel it: the local blocks may still change. Callers treat
            # them as garbage after a failed transfer anyway (they are freed, not read).
            log.error("releasing a NIXL transfer handle failed: %s", e)

    @staticmethod
    def _execute(future: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:
                future.set_exception(e)

    def _progress(self) -> None:
        try:
            # Tandem's READs carry no notification (a notified READ completes only when its
            # target progresses: +0.9 ms on a GPU); releases go over gRPC, so any message
            # here is not ours to act on.
            self._agent.get_new_notifs()
        except Exception as e:
            log.warning("NIXL progress failed: %s", e)


def tighten_timer_slack(slack_ns: int) -> bool:
    """Set the calling thread's timer slack (Linux ``prctl``); False where it cannot be."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(slack_ns), 0, 0, 0) == 0
    except (OSError, AttributeError) as e:
        log.debug("could not set the timer slack: %s", e)
        return False


def _settle(future: Future[Any], result: Any = None, exception: Exception | None = None) -> None:
    """Resolve ``future`` unless its owner cancelled it meanwhile."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled by the owner between the check and now
        pass
