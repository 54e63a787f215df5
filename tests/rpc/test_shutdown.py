"""first_of: a signal, a stop event and a drain racing each other; serve_until_signalled:
a second signal during a drain."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest

from services.rpc.shutdown import first_of, serve_until_signalled
from tests.router.harness import run

log = logging.getLogger(__name__)


def test_first_of_returns_on_the_first_and_cancels_the_rest() -> None:
    async def body() -> None:
        slow = asyncio.ensure_future(asyncio.sleep(10))
        await first_of(asyncio.sleep(0.01), slow)
        await asyncio.sleep(0)
        assert slow.cancelled()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await first_of(asyncio.Event().wait(), timeout=0.05)  # nothing done: the timeout
        assert 0.04 <= loop.time() - start < 1

    run(body(), timeout=5)


def test_a_second_signal_interrupts_the_stop_instead_of_killing_the_process(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Real SIGTERMs to this process: the first starts ``stop``, the second (sent while it
    drains) sets its interrupt; the default action (death mid-drain) never runs."""

    async def body() -> None:
        logged: list[str] = []
        given: list[asyncio.Event | None] = []

        async def stop(interrupt: asyncio.Event | None) -> None:
            given.append(interrupt)
            assert interrupt is not None and not interrupt.is_set()  # the first was cleared
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(interrupt.wait(), 5)
            logged.append("cut short")

        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        await serve_until_signalled(stop, log, "draining", 5)
        assert logged == ["cut short"] and len(given) == 1

    with caplog.at_level(logging.INFO, logger=log.name):
        run(body(), timeout=10)
    assert "draining (at most 5 s; signal again to stop now)" in caplog.text


def test_a_serve_ended_without_a_signal_still_stops() -> None:
    async def body() -> None:
        given: list[asyncio.Event | None] = []

        async def stop(interrupt: asyncio.Event | None) -> None:
            given.append(interrupt)

        serving = asyncio.ensure_future(serve_until_signalled(stop, log, "draining", 5))
        await asyncio.sleep(0.02)
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        assert given == [None]

    run(body(), timeout=10)
