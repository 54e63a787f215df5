"""Prefilled requests waiting for room in a decode worker's KV pool to receive their KV.

Under load a decode worker's pool fills with running sequences. A request prefilled
elsewhere that arrives then used to be queued to be prefilled again here: the prefill
worker's work and the transfer were thrown away, and the decode worker took on the prefill
that disaggregation exists to keep off it (on an H100 at 10 req/s, 151 of 200 requests went
that way: bench/disagg/gpu-h100-overload/). Now it waits, first come first served, for
blocks to free up, its KV pinned on the prefill worker meanwhile, and is read in as soon as
it fits; only past its deadline is it prefilled here.

One task admits for every waiting request: after each engine pass it asks the engine once
to reserve blocks for the head of the queue while they fit, and to give up on requests past
their deadline. So the engine thread sees one call per step, however many wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from services.engine.engine import LLMEngine, TransferTarget
from services.worker.engine_loop import EngineLoop


class RoomWaiter:
    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop
        self._waiting: dict[str, tuple[asyncio.Future[TransferTarget | None], float]] = {}
        self._task: asyncio.Task[None] | None = None

    async def wait(self, request_id: str, deadline: float) -> TransferTarget | None:
        """The blocks reserved for ``request_id`` (queued by ``add_transferred_request`` with
        ``wait_for_room``) once it fits, or None once ``deadline`` (time.monotonic) passed:
        the engine has then queued it to be prefilled here."""
        future: asyncio.Future[TransferTarget | None] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = (future, deadline)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._admit_loop())
        try:
            return await future
        finally:
            self._waiting.pop(request_id, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _admit_loop(self) -> None:
        try:
            while self._waiting:
                await self._next_pass()
                now = time.monotonic()
                expired = [rid for rid, (_, deadline) in self._waiting.items() if deadline <= now]

                def admit(engine: LLMEngine, expired: list[str] = expired) -> dict:
                    return engine.admit_awaiting(expired)

                for rid, target in (await self.loop.call(admit)).items():
                    self._settle(rid, target)
                for rid in expired:
                    self._settle(rid, None)
        except Exception as e:  # the engine loop stopped: nobody will make room
            for future, _ in list(self._waiting.values()):
                if not future.done():
                    future.set_exception(e)

    async def _next_pass(self) -> None:
        """Until the engine's next pass, or the earliest deadline."""
        earliest = min(deadline for _, deadline in self._waiting.values())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, earliest - time.monotonic())):
                await self.loop.next_step()

    def _settle(self, request_id: str, target: TransferTarget | None) -> None:
        entry = self._waiting.pop(request_id, None)  # now: the loop's next check counts it out
        if entry is not None and not entry[0].done():
            entry[0].set_result(target)
