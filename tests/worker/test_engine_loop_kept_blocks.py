"""EngineLoop.keep_blocks: blocks a KV read may still write stay out of the free pool after
their request lets go of them, until the read is released, and only until then."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

from services.engine.engine import EngineConfig, LLMEngine
from services.engine.sampling_params import SamplingParams
from services.worker.engine_loop import EngineLoop


def test_blocks_kept_for_a_late_read_return_only_when_it_is_released() -> None:
    engine = LLMEngine("tandem-tiny", EngineConfig(dtype="float32", device="cpu", num_blocks=16))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompt = list(range(10, 58))  # 3 blocks of 16

    async def body() -> None:
        loop = EngineLoop(engine, tick_s=0.05)
        loop.start()
        target = await loop.call(lambda e: e.add_transferred_request("r", prompt, 7, params))
        assert target is not None and target.block_ids == (0, 1, 2)
        released: Future[None] = Future()
        loop.keep_blocks([1, 2], released)  # the read into blocks 1 and 2 is stuck
        await loop.call(lambda e: e.abort("r"))  # the request lets go, as after a failed read
        assert await loop.call(lambda e: (e.pool.num_free_blocks, e.num_kept_blocks)) == (14, 2)
        # the next request does not get them
        other = await loop.call(lambda e: e.add_transferred_request("s", prompt, 7, params))
        assert other is not None and not {1, 2} & set(other.block_ids)
        await loop.call(lambda e: e.abort("s"))
        released.set_result(None)  # NIXL released the READ: now they may go
        await loop.call(lambda e: None)  # the unkeep was queued before this
        assert await loop.call(lambda e: (e.pool.num_free_blocks, e.num_kept_blocks)) == (16, 0)
        await loop.stop()

    asyncio.run(body())


def test_a_block_already_free_is_not_kept() -> None:
    """Too late to guard a free block; taking a reference on it would corrupt the pool."""
    engine = LLMEngine("tandem-tiny", EngineConfig(dtype="float32", device="cpu", num_blocks=8))
    assert engine.keep_blocks([3]) == [] and engine.pool.num_free_blocks == 8
