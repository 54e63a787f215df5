"""An exception escaping LLMEngine.step must not kill the engine thread: the requests it
was running end with an ERROR output (their streams end, their blocks come back), the
exception is logged once, and the loop goes on serving new requests."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.engine.engine import EngineConfig, LLMEngine
from services.engine.outputs import FinishReason, RequestOutput
from services.engine.sampling_params import SamplingParams
from services.worker.engine_loop import EngineLoop

NUM_BLOCKS = 32
PARAMS = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    config = EngineConfig(dtype="float32", device="cpu", num_blocks=NUM_BLOCKS)
    return LLMEngine("tandem-tiny", config)


def _break_next_step(engine: LLMEngine) -> bool:
    """Once "a" and "b" both run, make the next schedule() raise once (a bug nothing in the
    engine can attribute); True when done."""
    if len(engine.scheduler.running) < 2:
        return False
    schedule = engine.scheduler.schedule

    def broken():
        engine.scheduler.schedule = schedule  # type: ignore[method-assign]
        raise RuntimeError("scheduler bug")

    engine.scheduler.schedule = broken  # type: ignore[method-assign]
    return True


def test_a_failing_step_fails_its_requests_and_the_loop_serves_on(
    engine: LLMEngine, caplog: pytest.LogCaptureFixture
) -> None:
    async def collect(loop: EngineLoop, rid: str, prompt: list[int]) -> list[RequestOutput]:
        outs, broken = [], rid != "a"
        async for out in loop.outputs(rid, lambda e: e.add_request(rid, prompt, PARAMS)):
            outs.append(out)
            if not broken:
                broken = await loop.call(_break_next_step)
        return outs

    async def body() -> None:
        loop = EngineLoop(engine, tick_s=0.01)
        free = loop.watch(lambda e: e.pool.num_free_blocks)
        loop.start()
        a = asyncio.ensure_future(collect(loop, "a", list(range(5, 25))))
        b = asyncio.ensure_future(collect(loop, "b", list(range(30, 40))))
        outs_a, outs_b = await asyncio.wait_for(asyncio.gather(a, b), 20)
        for outs in (outs_a, outs_b):
            assert outs[-1].finish_reason == FinishReason.ERROR
            assert outs[-1].token_ids == () and outs[-1].usage is not None
            assert all(o.finish_reason is None for o in outs[:-1])
        after = await asyncio.wait_for(collect(loop, "after", list(range(50, 60))), 20)
        assert after[-1].finish_reason == FinishReason.LENGTH
        assert sum(len(o.token_ids) for o in after) == PARAMS.max_tokens
        assert loop._thread is not None and loop._thread.is_alive()
        await loop.call(lambda e: None)  # a pass after the last step refreshes the figure
        assert free() == NUM_BLOCKS and not engine.has_unfinished()
        await loop.stop()

    with caplog.at_level(logging.ERROR, logger="services.worker.engine_loop"):
        asyncio.run(body())
    logged = [r for r in caplog.records if r.name == "services.worker.engine_loop"]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "scheduler bug" in str(logged[0].exc_info[1])
