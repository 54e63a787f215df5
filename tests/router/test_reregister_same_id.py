"""A worker that registers again under the id of one that failed a request may serve it.

The registry replaces the entry of a re-registered id (a process restarted under the same
id: compose, a Kubernetes container restart). The request excludes the entry that failed
it, not the id: the new process is not the one that failed.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from tests.router.fakes import Behaviour, expected_completion
from tests.router.harness import DECODE, PREFILL, cluster, run
from tests.router.test_failover import WAITING, _until

PROMPT = [11, 12, 13]


def test_a_stream_resumes_on_its_hung_decode_worker_restarted_under_the_same_id() -> None:
    """d1 hangs mid-stream with its connection open (no heartbeats, no reset); a new d1
    registers: the old entry is removed, its call cancelled, and the request resumes on the
    new d1 at once, rather than wait decode_wait_s for a worker of another id."""

    async def body() -> None:
        async with cluster(WAITING) as c:
            await c.add("p1", PREFILL)
            old = await c.add("d1", DECODE, Behaviour(hang_after=2))
            stream = asyncio.create_task(
                c.generate(prompt_token_ids=PROMPT, max_tokens=8, timeout=30)
            )
            await _until(lambda: old.hanging.is_set())
            await old.stop_heartbeats()
            started = time.monotonic()
            new = await c.add("d1", DECODE)
            result = await stream

            assert result.code == grpc.StatusCode.OK, result.details
            assert result.tokens == expected_completion(len(PROMPT), 8)
            assert result.final.serving.decode_worker == "d1"
            assert result.final.serving.retries == 1
            assert len(new.calls) == 1
            assert old.cancelled.is_set()
            assert time.monotonic() - started < WAITING.decode_wait_s / 2
            await old.stop()  # the cluster stops the new d1 only

    run(body(), timeout=30)


def test_a_fresh_request_takes_its_only_decode_worker_restarted_under_the_same_id() -> None:
    """Nothing sent yet (aggregated: no prefill worker): the request, whose only decode
    worker hung and was replaced under its id, runs on the new process."""

    async def body() -> None:
        async with cluster(WAITING) as c:
            old = await c.add("d1", DECODE, Behaviour(hang_after=0))
            stream = asyncio.create_task(
                c.generate(prompt_token_ids=PROMPT, max_tokens=4, timeout=30)
            )
            await _until(lambda: old.hanging.is_set())
            await old.stop_heartbeats()
            new = await c.add("d1", DECODE)
            result = await stream

            assert result.code == grpc.StatusCode.OK, result.details
            assert result.tokens == expected_completion(len(PROMPT), 4)
            assert len(new.calls) == 1
            await old.stop()  # the cluster stops the new d1 only

    run(body(), timeout=30)
