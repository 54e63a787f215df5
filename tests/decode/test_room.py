"""RoomWaiter against a real engine on its thread: a prefilled request waits for room in a
full pool and gets its blocks when a running request finishes, first come first served; one
past its deadline is prefilled here; a cancelled wait leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from services.decode.room import RoomWaiter
from services.engine.engine import EngineConfig, LLMEngine, TransferTarget
from services.engine.sampling_params import SamplingParams
from services.worker.engine_loop import EngineLoop

PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
BUSY = list(range(300, 350))  # 50 tokens: 4 blocks, 5 once it has decoded 8
PROMPT = list(range(100, 150))  # 4 blocks


def _engine() -> LLMEngine:
    return LLMEngine("tandem-tiny", EngineConfig(dtype="float32", device="cpu", num_blocks=8))


async def _with_busy(loop: EngineLoop, params: SamplingParams = PARAMS) -> asyncio.Task[list[int]]:
    """A running request filling the pool until it finishes; the task returns its tokens."""

    async def run() -> list[int]:
        outputs = loop.outputs("busy", lambda e: e.add_request("busy", BUSY, params))
        return [t async for out in outputs for t in out.token_ids]

    task = asyncio.create_task(run())
    while (await loop.call(lambda e: e.pool.num_free_blocks)) != 4:
        await asyncio.sleep(0.001)
    return task


@contextlib.asynccontextmanager
async def _full_pool(
    busy: SamplingParams = PARAMS,
) -> AsyncIterator[tuple[EngineLoop, RoomWaiter, asyncio.Task[list[int]]]]:
    """An engine loop, its RoomWaiter, and the busy request holding 4 of its 8 blocks."""
    loop = EngineLoop(_engine(), tick_s=0.01)
    loop.start()
    rooms = RoomWaiter(loop)
    try:
        yield loop, rooms, await _with_busy(loop, busy)
    finally:
        await rooms.close()
        await loop.stop()


def _queue(rid: str, first: int = 7):
    return lambda e: e.add_transferred_request(rid, PROMPT, first, PARAMS, wait_for_room=True)


def test_waiters_get_room_when_the_running_request_finishes() -> None:
    async def body() -> None:
        async with _full_pool() as (loop, rooms, busy):
            assert await loop.call(_queue("a")) is None
            assert await loop.call(_queue("b")) is None
            deadline = time.monotonic() + 30
            a = asyncio.ensure_future(rooms.wait("a", deadline))
            b = asyncio.ensure_future(rooms.wait("b", deadline))
            assert len(await busy) == 8  # a and b waited while it ran
            # First come first served: a takes busy's partial block 3 and three never used.
            assert await asyncio.wait_for(a, 10) == TransferTarget((3, 4, 5, 6), 0)
            # 4 blocks are free, but b must leave one for a, which will run and grow.
            await asyncio.sleep(0.05)
            assert not b.done()
            await loop.call(lambda e: e.abort("a"))  # its blocks come back, uncached
            assert await asyncio.wait_for(b, 10) == TransferTarget((3, 4, 5, 6), 0)
            await loop.call(lambda e: e.abort("b"))
            assert await loop.call(_idle) == (8, 0)

    asyncio.run(body())


def test_a_waiter_past_its_deadline_is_prefilled_here() -> None:
    """Deterministic: the reference runs on an engine of its own (no prompt blocks cached
    in the loop's, which once let the waiter fit in one free block before busy grew), and
    busy runs 30 tokens, growing past the room the waiter needs, well past its deadline."""

    async def body() -> None:
        (whole,) = _engine().generate([PROMPT], PARAMS)
        first = whole.token_ids[0]
        long_busy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
        async with _full_pool(long_busy) as (loop, rooms, busy):
            started = time.monotonic()

            async def wait_in_vain() -> None:  # as DecodeService does, once it is queued
                assert await rooms.wait("late", started + 0.05) is None
                assert time.monotonic() - started < 5
                assert await loop.call(lambda e: e.num_awaiting_room) == 0

            outputs = loop.outputs("late", _queue("late", first), wait_in_vain)
            tokens = [t async for out in outputs for t in out.token_ids]
            assert [first, *tokens] == list(whole.token_ids)  # prefilled here, same tokens
            await busy
            assert await loop.call(_idle) == (8, 0)

    asyncio.run(body())


def test_a_cancelled_wait_leaves_nothing_behind() -> None:
    async def body() -> None:
        async with _full_pool() as (loop, rooms, busy):
            await loop.call(_queue("gone"))
            waiting = asyncio.ensure_future(rooms.wait("gone", time.monotonic() + 30))
            await asyncio.sleep(0.02)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await loop.call(lambda e: e.abort("gone"))  # what EngineLoop.outputs does on cancel
            await busy
            assert rooms._waiting == {}
            assert await loop.call(_idle) == (8, 0)

    asyncio.run(body())


def _idle(engine: LLMEngine) -> tuple[int, int]:
    return engine.pool.num_free_blocks, engine.num_awaiting_room
