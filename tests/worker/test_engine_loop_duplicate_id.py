"""EngineLoop.outputs with a request id that is already running: the newcomer is refused
and the running request is left alone (its stream is neither taken over nor aborted)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.engine.engine import EngineConfig, LLMEngine
from services.engine.errors import InvalidRequestError
from services.engine.outputs import FinishReason
from services.engine.sampling_params import SamplingParams
from services.worker.engine_loop import EngineLoop

NUM_BLOCKS = 32
PROMPT = list(range(1, 20))
PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    config = EngineConfig(
        dtype="float32", device="cpu", num_blocks=NUM_BLOCKS, enable_prefix_caching=False
    )
    return LLMEngine("tandem-tiny", config)


def _submit(rid: str, prompt: list[int], params: SamplingParams):
    return lambda engine: engine.add_request(rid, prompt, params)


def test_a_duplicate_id_is_refused_and_the_running_stream_completes(engine: LLMEngine) -> None:
    async def body() -> None:
        loop = EngineLoop(engine, tick_s=0.01)
        loop.start()
        try:
            undisturbed = [o async for o in loop.outputs("ref", _submit("ref", PROMPT, PARAMS))]
            expected = [t for o in undisturbed for t in o.token_ids]
            assert len(expected) == PARAMS.max_tokens

            original = loop.outputs("dup", _submit("dup", PROMPT, PARAMS))
            first = await anext(original)  # running, registered for its outputs
            duplicate = loop.outputs("dup", _submit("dup", list(range(50, 60)), PARAMS))
            with pytest.raises(InvalidRequestError, match="'dup' is already running") as info:
                await anext(duplicate)
            assert info.value.field == "request_id"

            async def rest() -> list:
                return [o async for o in original]

            outs = [first, *await asyncio.wait_for(rest(), 10)]  # hung until this fix
            assert [t for o in outs for t in o.token_ids] == expected
            assert outs[-1].finish_reason == FinishReason.LENGTH
            assert [o.finish_reason for o in outs[:-1]] == [None] * (len(outs) - 1)
            assert loop._queues == {}
            assert await loop.call(lambda e: (e.num_requests, e.pool.num_free_blocks)) == (
                0,
                NUM_BLOCKS,
            )
            # The id is free again once its final output is out.
            again = [o async for o in loop.outputs("dup", _submit("dup", PROMPT, PARAMS))]
            assert [t for o in again for t in o.token_ids] == expected
        finally:
            await loop.stop()

    asyncio.run(body())


def test_a_refused_submit_does_not_abort_the_request_already_running(engine: LLMEngine) -> None:
    """The request was added without ``outputs`` (nobody registered for it): a second
    ``outputs`` for its id fails in the engine's submit, and must not abort it."""

    async def body() -> None:
        loop = EngineLoop(engine, tick_s=0.01)
        loop.start()
        try:
            long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
            await loop.call(_submit("x", PROMPT, long))
            with pytest.raises(InvalidRequestError, match="'x' is already running"):
                await anext(loop.outputs("x", _submit("x", PROMPT, long)))
            assert loop._queues == {}
            cancelled = await loop.call(lambda e: e.abort("x"))  # queued after any abort
            assert cancelled is not None and cancelled.finish_reason == FinishReason.CANCELLED
            assert await loop.call(lambda e: e.pool.num_free_blocks) == NUM_BLOCKS
        finally:
            await loop.stop()

    asyncio.run(body())


def test_an_id_reused_right_after_a_cancel_never_receives_the_old_requests_outputs(
    engine: LLMEngine,
) -> None:
    """The stream is cancelled while a step that produces its next token runs: until the
    engine has aborted it, the id is refused (was: a new call under it got that token
    first); once aborted, the id serves the new request exactly."""

    async def body() -> None:
        loop = EngineLoop(engine, tick_s=0.01)
        loop.start()
        in_step, go_on = threading.Event(), threading.Event()
        step = engine.step

        def held_step():  # type: ignore[no-untyped-def]
            in_step.set()
            go_on.wait(10)
            return step()

        try:
            other = list(range(50, 60))
            alone = [o async for o in loop.outputs("ref", _submit("ref", other, PARAMS))]
            expected = [t for o in alone for t in o.token_ids]
            old = loop.outputs("x", _submit("x", PROMPT, PARAMS))
            await anext(old)
            engine.step = held_step  # the next step holds "x"'s next token
            await asyncio.to_thread(in_step.wait, 10)
            await old.aclose()  # the client cancels while that step runs
            reuse = loop.outputs("x", _submit("x", other, PARAMS))
            with pytest.raises(InvalidRequestError, match="still being cancelled"):
                await anext(reuse)
            engine.step = step
            go_on.set()  # the step hands its output over, then the abort runs
            await loop.call(lambda e: None)
            await asyncio.sleep(0.01)  # the id is freed by a callback after the abort
            again = [o async for o in loop.outputs("x", _submit("x", other, PARAMS))]
            assert [t for o in again for t in o.token_ids] == expected
            assert loop._queues == {}
            assert await loop.call(lambda e: (e.num_requests, e.pool.num_free_blocks)) == (
                0,
                NUM_BLOCKS,
            )
        finally:
            engine.step = step
            go_on.set()
            await loop.stop()

    asyncio.run(body())
