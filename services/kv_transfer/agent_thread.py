"""One thread that owns a NIXL agent: runs the calls handed to it and keeps the agent
progressing between them.

Why a thread of our own rather than NIXL's progress thread: the UCX backend's progress
thread polls without pausing (the Python wrapper fixes its delay at 0), so every worker
would burn a whole core doing nothing, which halves a 2-core host. Without it, a UCX worker
advances only when the agent is called; a READ also needs its *target* to advance (to
deliver the notification), so this thread calls ``get_new_notifs`` whenever it has been
idle for ``progress_interval_s``, which also collects the notifications. Measured here
(2 cores, 16 MiB between two processes): 9 GB/s with a 1 ms interval and both cores
idle, against 5 GB/s with NIXL's progress threads spinning both cores.

Every call to the agent goes through this thread, so the agent is never used from two
threads at once, and a slow call never blocks an event loop.

Transfers in flight are watched here too (:meth:`AgentThread.watch`): while any is, the
thread checks them every ``WATCH_INTERVAL_S`` and resolves each one's future the moment it
ends. Polling from the event loop instead cost a thread hop per check and, with a backoff,
up to its longest pause in detection latency: on a GPU, where CUDA IPC moves 16 MiB in well
under a millisecond, that latency was most of the transfer time.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

PROGRESS_INTERVAL_S = 0.001
"""Longest the agent goes without progress. Each tick costs one short agent call; a READ
from this worker waits up to about this long for it to acknowledge the notification."""
WATCH_INTERVAL_S = 0.00002
"""How often a transfer in flight is checked (only while one is: it keeps the thread busy)."""

_Job = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class AgentThread:
    def __init__(
        self, agent: Any, name: str, progress_interval_s: float = PROGRESS_INTERVAL_S
    ) -> None:
        self._agent = agent
        self._interval = progress_interval_s
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._notifications: list[bytes] = []
        self._watched: list[tuple[Any, Future[str]]] = []  # only touched on the thread
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        # A worker that exits without close(): stop calling the agent before the
        # interpreter tears it down under this thread (which aborts the process).
        atexit.register(self.stop)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on the thread, after the calls submitted before it."""
        if self._stopped:
            raise RuntimeError("the NIXL agent thread has stopped")
        future: Future[T] = Future()
        self._jobs.put((future, fn, args))
        return future

    def watch(self, handle: Any) -> Future[str]:
        """A future of the transfer's final state (``DONE`` or ``ERR``), set on the thread as
        soon as a check sees it. Cancel the future to stop watching (before releasing the
        handle: the thread never checks a cancelled watch again)."""
        done: Future[str] = Future()
        self.submit(self._watched.append, (handle, done))
        return done

    def take_notifications(self) -> list[bytes]:
        """Notification messages received since the last call (any peer). Never blocks long."""
        with self._lock:
            taken, self._notifications = self._notifications, []
        return taken

    def stop(self, timeout_s: float = 5.0) -> None:
        """Finish the calls already submitted, then end the thread (waits up to
        ``timeout_s``). Idempotent."""
        atexit.unregister(self.stop)
        if not self._stopped:
            self._stopped = True
            self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        last_progress = time.monotonic()
        while True:
            try:
                wait = WATCH_INTERVAL_S if self._watched else self._interval
                job = self._jobs.get(timeout=wait)
            except queue.Empty:
                pass
            else:
                if job is None:
                    for _, done in self._watched:
                        done.cancel()
                    return
                self._execute(*job)
                # The call itself progressed the agent: no tick right behind it, holding
                # the GIL while the loop wakes up to take the call's result.
                last_progress = time.monotonic()
            if self._watched:
                self._check_watched()
            if time.monotonic() - last_progress >= self._interval:
                self._progress()
                last_progress = time.monotonic()

    def _check_watched(self) -> None:
        still = []
        for handle, done in self._watched:
            if done.cancelled():
                continue
            try:
                state = self._agent.check_xfer_state(handle)
            except Exception as e:
                _settle(done, exception=e)
                continue
            if state == "PROC":
                still.append((handle, done))
            else:
                _settle(done, result=state)
        self._watched = still

    @staticmethod
    def _execute(future: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:
                future.set_exception(e)

    def _progress(self) -> None:
        try:
            notifs = self._agent.get_new_notifs()
        except Exception as e:
            log.warning("NIXL progress failed: %s", e)
            return
        if notifs:
            with self._lock:
                for messages in notifs.values():
                    self._notifications.extend(messages)


def _settle(
    done: Future[str], result: str | None = None, exception: Exception | None = None
) -> None:
    """Resolve a watch unless its owner cancelled it meanwhile."""
    try:
        if exception is not None:
            done.set_exception(exception)
        else:
            done.set_result(result or "ERR")
    except InvalidStateError:  # cancelled by the owner between the check and now
        pass
