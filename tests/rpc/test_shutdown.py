"""first_of: a signal, a stop event and a drain racing each other."""

from __future__ import annotations

import asyncio

from services.rpc.shutdown import first_of
from tests.router.harness import run


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
