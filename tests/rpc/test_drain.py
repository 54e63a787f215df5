"""CallGate: a draining worker refuses new calls with UNAVAILABLE and waits for the rest."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.rpc.drain import CallGate
from tests.router.harness import run


class _Aborted(Exception):
    pass


class _Context:
    """What ``abort_with`` needs of a ServicerContext: abort raises, as grpc's does."""

    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise _Aborted


def test_a_closed_gate_refuses_new_calls_with_unavailable_naming_the_worker() -> None:
    async def body() -> None:
        gate = CallGate("worker decode-0")
        async with gate.admit(_Context()):
            assert gate.active == 1
            gate.close()
            assert gate.active == 1  # the call running goes on
        context = _Context()
        with pytest.raises(_Aborted):
            async with gate.admit(context):
                raise AssertionError("a closed gate ran a call")
        code, details = context.status
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "worker decode-0 is draining" in details and "retry" in details
        assert gate.active == 0

    run(body(), timeout=5)


def test_wait_idle_returns_when_the_last_call_ends_and_the_engine_is_done() -> None:
    async def body() -> None:
        gate = CallGate("w")
        release = asyncio.Event()
        held = [2]  # prefills still pinned for a reader; one goes per poll

        async def call() -> None:
            async with gate.admit(_Context()):
                await release.wait()

        async def busy() -> bool:
            if held[0]:
                held[0] -= 1
                return True
            return False

        running = [asyncio.create_task(call()) for _ in range(3)]
        await asyncio.sleep(0)
        gate.close()
        waiting = asyncio.create_task(gate.wait_idle(5.0, busy))
        await asyncio.sleep(0.2)
        assert not waiting.done() and gate.active == 3
        release.set()
        assert await waiting is True
        assert gate.active == 0 and held == [0]
        await asyncio.gather(*running)

    run(body(), timeout=10)


def test_wait_idle_gives_up_after_its_timeout() -> None:
    async def body() -> None:
        gate = CallGate("w")
        stuck = asyncio.Event()

        async def call() -> None:
            async with gate.admit(_Context()):
                await stuck.wait()

        task = asyncio.create_task(call())
        await asyncio.sleep(0)
        gate.close()
        assert await gate.wait_idle(0.3) is False
        assert gate.active == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert gate.active == 0
        assert await gate.wait_idle(0.3) is True

    run(body(), timeout=10)


def test_a_zero_timeout_asks_about_held_work_too() -> None:
    """``--drain-timeout-s 0``: no call runs, but a prefill is still pinned for a reader;
    the worker is not idle (was: "drained: every request finished" logged over it)."""

    async def body() -> None:
        gate = CallGate("w")
        gate.close()
        held = [True]

        async def busy() -> bool:
            return held[0]

        assert await gate.wait_idle(0, busy) is False
        held[0] = False
        assert await gate.wait_idle(0, busy) is True

    run(body(), timeout=5)


def test_a_gated_stream_closes_its_source_when_the_call_ends_early() -> None:
    """A cancelled call's source runs its cleanup (the gateway's settle) at once, not when
    the garbage collector gets to it."""

    async def body() -> None:
        cleaned: list[str] = []

        async def source():  # type: ignore[no-untyped-def]
            try:
                yield 1
                yield 2
            finally:
                cleaned.append("settled")

        gate = CallGate("the gateway")
        relay = gate.stream(_Context(), source())
        assert await anext(relay) == 1
        await relay.aclose()  # what grpc does to a cancelled call's response stream
        assert cleaned == ["settled"]
        assert gate.active == 0

    run(body(), timeout=5)
