"""EngineLoop.watch: figures read without waiting for the engine thread, kept fresh by it,
and refused once that thread has died (so a heartbeat stops instead of lying)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.engine.engine import EngineConfig, LLMEngine
from services.engine.sampling_params import SamplingParams
from services.worker.engine_loop import EngineLoop


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine("tandem-tiny", EngineConfig(dtype="float32", device="cpu", num_blocks=32))


def _free(engine: LLMEngine) -> int:
    return engine.pool.num_free_blocks


def test_a_watched_figure_is_read_without_waiting_for_a_long_step(engine: LLMEngine) -> None:
    """Read while the engine thread is held mid-request, then after the request: each read
    answers at once with the figure as of the engine's last step. (The engine refreshes a
    watched figure after each step, before it runs the next command, so a command that is
    running proves the refresh before it has happened.)"""

    async def body() -> None:
        loop = EngineLoop(engine, tick_s=0.01)
        free = loop.watch(_free)
        assert free() == 32  # computed at once, before the thread starts
        loop.start()
        gate, inside = threading.Event(), threading.Event()

        def long_step(engine: LLMEngine) -> None:  # holds the engine thread
            inside.set()
            gate.wait(10)

        params = SamplingParams(max_tokens=8, ignore_eos=True)
        outputs = loop.outputs("r1", lambda e: e.add_request("r1", list(range(5, 45)), params))
        await anext(outputs)  # the first token: the prompt's 3 blocks are taken
        held = asyncio.ensure_future(loop.call(long_step))
        await asyncio.to_thread(inside.wait, 10)
        assert free() == 32 - 3  # answered while the engine thread is held (else: a hang)
        gate.set()
        await held
        async for _ in outputs:
            pass
        await loop.call(lambda engine: None)  # a turn of the loop after the last step
        assert free() == 32
        await loop.stop()

    asyncio.run(body())


def test_a_watched_figure_is_refused_once_the_engine_thread_dies(engine: LLMEngine) -> None:
    class Dying(EngineLoop):
        def _run(self) -> None:
            return  # the thread ends, as an exception escaping a step would end it

    async def body() -> None:
        loop = Dying(engine)
        free = loop.watch(_free)
        loop.start()
        await asyncio.sleep(0.05)
        with pytest.raises(RuntimeError, match="the engine thread has died"):
            free()
        await loop.stop()
        assert free() == 32  # stopped on purpose: the last figure, no error

    asyncio.run(body())


def test_next_step_returns_after_the_engines_next_pass(engine: LLMEngine) -> None:
    """Idle, the engine thread passes at each command or tick; busy, at each step. A waiter
    registered while the thread is held returns only once it has passed again."""

    async def body() -> None:
        loop = EngineLoop(engine, tick_s=30)  # no tick within the test: commands wake it
        loop.start()
        gate, inside = threading.Event(), threading.Event()

        def hold(engine: LLMEngine) -> None:
            inside.set()
            gate.wait(10)

        held = asyncio.ensure_future(loop.call(hold))
        await asyncio.to_thread(inside.wait, 10)
        waiter = asyncio.ensure_future(loop.next_step())
        await asyncio.sleep(0.05)
        assert not waiter.done()  # the thread has not passed since
        gate.set()
        await held
        await asyncio.wait_for(waiter, 5)
        cancelled = asyncio.ensure_future(loop.next_step())
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert loop._step_waiters == []  # a cancelled waiter leaves nothing behind
        await loop.stop()
        with pytest.raises(RuntimeError, match="not running"):
            await loop.next_step()

    asyncio.run(body())


def test_a_prompt_waiting_for_blocks_leases_hold_does_not_spin_the_thread() -> None:
    """Two prefills hold 6 of 8 blocks under leases; a third prompt needs 4. Before, the
    engine thread stepped ~240,000 times a second finding nothing to do (a core and the
    GIL, taken from the event loop serving the releases that would make room). Now it
    waits for a command or a tick; the release that makes room wakes it at once."""
    engine = LLMEngine("tandem-tiny", EngineConfig(dtype="float32", device="cpu", num_blocks=8))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    steps = 0
    step = engine.step

    def counted() -> list:
        nonlocal steps
        steps += 1
        return step()

    engine.step = counted  # type: ignore[method-assign]

    async def body() -> None:
        loop = EngineLoop(engine, tick_s=0.1)
        loop.start()
        for i in range(2):
            submit = lambda e, i=i: e.add_request(  # noqa: E731
                f"h{i}", list(range(10 + i, 50 + i)), params, prefill_only=True, lease_s=60
            )
            async for _ in loop.outputs(f"h{i}", submit):
                pass
        waiting = loop.outputs("w", lambda e: e.add_request("w", list(range(100, 160)), params))
        first = asyncio.ensure_future(anext(waiting))
        await asyncio.sleep(0.5)
        assert not first.done() and await loop.call(lambda e: e.stalled)
        before = steps
        await asyncio.sleep(0.5)
        assert steps - before <= 10  # one pass per tick (5), give or take commands
        await loop.call(lambda e: e.release_held("h0"))
        out = await asyncio.wait_for(first, 5)  # admitted once the release made room
        assert out.token_ids
        async for _ in waiting:
            pass
        await loop.call(lambda e: e.release_held("h1"))
        assert await loop.call(lambda e: e.pool.num_free_blocks) == 8
        await loop.stop()

    asyncio.run(body())
