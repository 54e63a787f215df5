"""tandem_router_retries_total counts each retry when it is made: a request that gives up
after retrying, or that the client cancels after a retry, keeps its retries counted (they
were read from the final message, which such a request never gets)."""

from __future__ import annotations

import asyncio

import grpc

from services.router.config import RouterConfig
from services.router.placement_metrics import RETRIES
from tests.router.fakes import Behaviour
from tests.router.harness import DECODE, PREFILL, cluster, run

PROMPT = [11, 12, 13]
CONFIG = RouterConfig(
    policy="round-robin",
    heartbeat_interval_s=0.1,
    heartbeat_timeout_s=2,
    prefill_timeout_s=5,
    decode_wait_s=0.0,
    max_retries=1,
)


def _retries() -> float:
    return RETRIES._value.get()  # process-wide: the tests read differences


def test_a_request_that_gives_up_keeps_its_retry_counted() -> None:
    async def body() -> None:
        async with cluster(CONFIG) as c:
            unavailable = Behaviour(fail_code=grpc.StatusCode.UNAVAILABLE)
            for name in ("p1", "p2", "p3"):
                await c.add(name, PREFILL, unavailable)
            await c.add("d1", DECODE)
            before = _retries()
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=4)
            assert result.code == grpc.StatusCode.UNAVAILABLE
            assert "gave up after 1 retries" in result.details
            assert _retries() - before == 1  # p1 → p2 retried; p2's failure ended it

    run(body())


def test_a_request_cancelled_after_a_retry_keeps_it_counted() -> None:
    async def body() -> None:
        async with cluster(CONFIG) as c:
            await c.add("p1", PREFILL, Behaviour(fail_code=grpc.StatusCode.UNAVAILABLE))
            p2 = await c.add("p2", PREFILL, Behaviour(hang_after=0))
            await c.add("d1", DECODE)
            before = _retries()
            task = asyncio.create_task(c.generate(prompt_token_ids=PROMPT, max_tokens=4))
            while not p2.calls:
                await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert _retries() - before == 1

    run(body())


def test_a_served_request_counts_its_retry_once() -> None:
    async def body() -> None:
        async with cluster(CONFIG) as c:
            await c.add("p1", PREFILL, Behaviour(fail_code=grpc.StatusCode.UNAVAILABLE))
            await c.add("p2", PREFILL)
            await c.add("d1", DECODE)
            before = _retries()
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=4)
            assert result.code == grpc.StatusCode.OK and result.final.serving.retries == 1
            assert _retries() - before == 1

    run(body())
