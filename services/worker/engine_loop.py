"""Runs an LLMEngine on its own thread and connects it to asyncio.

The engine is single-threaded by design: only this thread touches it. asyncio
code hands it functions to run between steps (``call``) and receives each
request's outputs on an asyncio queue (``outputs``). A step runs whenever there
is schedulable work; otherwise (and while the engine is ``stalled``: work it cannot
schedule yet) the thread sleeps on its command queue, waking every ``tick_s`` to run
periodic duties (lease expiry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from typing import TypeVar

from services.engine.engine import LLMEngine
from services.engine.errors import InvalidRequestError
from services.engine.outputs import RequestOutput

log = logging.getLogger(__name__)
T = TypeVar("T")

Command = Callable[[LLMEngine], None]


class EngineLoop:
    def __init__(self, engine: LLMEngine, tick_s: float = 0.25) -> None:
        self.engine = engine
        self.tick_s = tick_s
        self._commands: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._ticks: list[Callable[[LLMEngine], None]] = []
        self._watched: list[tuple[Callable[[LLMEngine], object], list[object]]] = []
        self._step_waiters: list[asyncio.Future[None]] = []  # touched on the event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def on_tick(self, duty: Callable[[LLMEngine], None]) -> None:
        """Run ``duty(engine)`` on the engine thread about every tick_s (before start)."""
        self._ticks.append(duty)

    def watch(self, fn: Callable[[LLMEngine], T]) -> Callable[[], T]:
        """Keep ``fn(engine)`` fresh (call before start): it runs now and then on the engine
        thread after every step and every wake-up. The function returned gives the latest
        result at once, without waiting for the engine: a heartbeat must not wait behind a
        long step (one prefill chunk of a 3,840-token prompt took 13 s on a CPU without
        bfloat16 kernels, and the router dropped the busy worker as dead). It raises once
        the engine thread has died, so what reads it stops too."""
        slot: list[object] = [fn(self.engine)]
        self._watched.append((fn, slot))

        def latest() -> T:
            thread = self._thread
            if thread is not None and not thread.is_alive() and not self._stopped.is_set():
                raise RuntimeError("the engine thread has died")
            return slot[0]  # type: ignore[return-value]

        return latest

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopped.set()
        self._commands.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread; its result or exception comes back here."""
        if self._loop is None or self._stopped.is_set():
            raise RuntimeError("the engine loop is not running")
        future: asyncio.Future[T] = self._loop.create_future()

        def command(engine: LLMEngine) -> None:
            try:
                result = fn(engine)
            except BaseException as e:  # handed to the awaiting coroutine
                self._resolve(future, None, e)
            else:
                self._resolve(future, result, None)

        self._commands.put(command)
        return await future

    def keep_blocks(self, block_ids: list[int], until: Future[None]) -> None:
        """Keep ``block_ids`` out of the free pool until ``until`` resolves, whoever lets go
        of them meanwhile: a KV transfer may still write them. Queued at once, so it runs
        before any command queued after it (the abort of the request that owns them)."""

        def keep(engine: LLMEngine) -> None:
            kept = engine.keep_blocks(block_ids)
            until.add_done_callback(lambda _: self._commands.put(lambda e: e.unkeep_blocks(kept)))

        self._commands.put(keep)

    async def next_step(self) -> None:
        """Return after the engine thread's next pass: a step when there is work, else its
        next wake-up (a command, or at most ``tick_s``)."""
        if self._loop is None or self._stopped.is_set():
            raise RuntimeError("the engine loop is not running")
        future: asyncio.Future[None] = self._loop.create_future()
        self._step_waiters.append(future)
        try:
            await future
        finally:
            if future in self._step_waiters:
                self._step_waiters.remove(future)

    async def outputs(
        self,
        request_id: str,
        submit: Callable[[LLMEngine], object],
        after_submit: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Register for ``request_id``'s outputs, run ``submit`` (which adds the request)
        and then ``after_submit`` (e.g. a KV transfer), and yield the outputs until
        the final one. If the consumer stops early (client cancelled) or
        ``after_submit`` fails, the request is aborted and its blocks freed.

        An id whose outputs another call is still receiving, or whose cancelled request
        the engine has not yet aborted, is refused with InvalidRequestError before anything
        is registered: the running request keeps its stream, and a new one never receives
        an old one's outputs. A refused or failed ``submit`` aborts nothing (it added no
        request)."""
        if request_id in self._queues:
            raise InvalidRequestError(
                "request_id", f"{request_id!r} is already running (or still being cancelled)"
            )
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request_id] = q
        finished = False
        added = False  # set on the engine thread once ``submit`` returned: this call's request
        refused = False  # set there when ``submit`` raised: no request of this call's exists

        def add(engine: LLMEngine) -> None:
            nonlocal added, refused
            try:
                submit(engine)
            except BaseException:
                refused = True
                raise
            added = True

        try:
            await self.call(add)
            if after_submit is not None:
                await after_submit()
            while not finished:
                out = await q.get()
                finished = out.finished or out.held is not None  # held: a prefill's last
                if finished:  # the id is free for reuse once its final output is out
                    self._unregister(request_id, q)
                yield out
        finally:
            if finished or refused:
                self._unregister(request_id, q)
            else:
                self._abort(request_id, q, lambda: added)

    def _abort(
        self, request_id: str, q: asyncio.Queue[RequestOutput], added: Callable[[], bool]
    ) -> None:
        """Abort a request whose stream ended early, then free its id. The abort is decided
        on the engine thread, after ``add`` (commands run in order): a submit refused, or one
        cancelled before it ran, must not abort another request under the same id (a
        prefill's pinned KV, say). The id stays registered to ``q`` until then, because the
        step running meanwhile may still hand over outputs of this request: delivered after
        the queue was dropped they would reach a new call that reused the id."""
        loop = self._loop
        if loop is None or self._stopped.is_set():
            self._unregister(request_id, q)
            return

        def abort(engine: LLMEngine) -> None:
            try:
                if added():
                    engine.abort(request_id)
            finally:  # after every output dispatched so far: the loop runs callbacks in order
                with contextlib.suppress(RuntimeError):  # the event loop already closed
                    loop.call_soon_threadsafe(self._unregister, request_id, q)

        self._commands.put(abort)

    def _unregister(self, request_id: str, q: asyncio.Queue[RequestOutput]) -> None:
        """Drop ``request_id``'s queue if it is still ``q`` (this call's own)."""
        if self._queues.get(request_id) is q:
            del self._queues[request_id]

    # ----------------------------------------------------------- engine thread
    def _run(self) -> None:
        import time

        next_tick = time.monotonic()
        while not self._stopped.is_set():
            # A stalled engine (work it cannot schedule: a prompt waiting for blocks leases
            # hold) waits like an idle one: every change reaches it as a command or a tick.
            busy = self.engine.has_schedulable() and not self.engine.stalled
            if not self._drain_commands(block=not busy):
                return
            if time.monotonic() >= next_tick:
                for duty in self._ticks:
                    self._guard(duty)
                next_tick = time.monotonic() + self.tick_s
            if self.engine.has_schedulable():
                self._dispatch(self._step())
            self._refresh()
            if self._step_waiters and self._loop is not None:  # a racy read: a late waiter
                self._loop.call_soon_threadsafe(self._wake_step_waiters)  # waits one more pass

    def _step(self) -> list[RequestOutput]:
        """One engine step. The engine contains the failures it can attribute; anything
        else that escapes it fails the requests then running with an ERROR output (their
        streams end, their blocks are freed) and the thread goes on serving the rest."""
        try:
            return self.engine.step()
        except Exception:
            log.exception("engine step failed; failing the requests it was running")
        try:
            return self.engine.fail_running()
        except Exception as e:  # already logged above; do not log the same failure twice
            log.error("could not fail the running requests cleanly either: %r", e)
            return []

    def _drain_commands(self, block: bool) -> bool:
        """Run queued commands; wait up to tick_s for one when idle. False on stop."""
        try:
            cmd = self._commands.get(timeout=self.tick_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd is None:
                return False
            self._guard(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _refresh(self) -> None:
        for fn, slot in self._watched:
            try:
                slot[0] = fn(self.engine)
            except Exception:
                log.exception("refreshing a watched engine figure failed")

    def _guard(self, fn: Command) -> None:
        try:
            fn(self.engine)
        except Exception:
            log.exception("engine command failed")

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        if outputs and self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _wake_step_waiters(self) -> None:
        waiters, self._step_waiters = self._step_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def _resolve(self, future: asyncio.Future, result: object, error: BaseException | None) -> None:
        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        if self._loop is not None:
            self._loop.call_soon_threadsafe(settle)
