"""A local prefill counts as in-flight prefill work on its decode worker.

The router counted the prefill pool's work in flight (``in_flight_prefill_tokens``) but a
decode worker's only from its heartbeat, so a burst of short prompts arriving within one
heartbeat all went local to one decode worker however much it had to prefill. Now a
Decode sent without KV counts its uncached prompt on that worker from the placement until
the stream's first token, and exactly once on every other way the stream can end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from services.router.config import RouterConfig
from services.router.registry import WorkerState
from services.stubs.tandem.v1 import worker_pb2
from tests.router.fakes import Behaviour, FakeWorker, expected_completion
from tests.router.harness import DECODE, PREFILL, Cluster, cluster, run

PROMPT = list(range(1, 101))  # 100 tokens, none cached anywhere: uncached 100 everywhere
CONFIG = RouterConfig(
    heartbeat_interval_s=0.1,
    heartbeat_timeout_s=2.0,
    prefill_timeout_s=5.0,
    local_prefill_max_tokens=256,  # the default, spelled out: the margin below
)


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _entry(c: Cluster, worker_id: str) -> WorkerState:
    entry = c.router.registry.get(worker_id)
    assert entry is not None, worker_id
    return entry


async def _cancel(task: asyncio.Task[object]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_a_burst_within_one_heartbeat_stops_going_local_past_the_margin() -> None:
    """8 requests placed one after another, no heartbeat between them, every prefill
    hanging (so each stays in flight). Before each pick, local needs d1's work
    100 × (1 + its local prefills) ≤ p1's 100 × (1 + its prefills) + 256:
    100, 200, 300 ≤ 356 local; 400 > 356 to p1; 400 ≤ 456 local; 500 > 456 to p1; ...
    Without the count d1's work stayed 100 and all 8 went local to it."""

    async def body() -> None:
        async with cluster(CONFIG) as c:
            p1 = await c.add("p1", PREFILL, Behaviour(hang_after=0), heartbeat=False)
            d1 = await c.add("d1", DECODE, Behaviour(hang_after=0), heartbeat=False)
            placed: list[str] = []
            tasks = []
            for _ in range(8):
                before = len(p1.calls) + len(d1.calls)
                before_p1 = len(p1.calls)
                tasks.append(asyncio.create_task(c.generate(prompt_token_ids=PROMPT, max_tokens=4)))
                await _until(lambda b=before: len(p1.calls) + len(d1.calls) > b, "a placement")
                placed.append("p1" if len(p1.calls) > before_p1 else "d1")
            assert placed == ["d1", "d1", "d1", "p1", "d1", "p1", "d1", "p1"]
            assert all(not call.HasField("kv") for call in d1.calls)  # local prefills
            assert _entry(c, "d1").in_flight_prefill_tokens == 5 * 100
            assert _entry(c, "p1").in_flight_prefill_tokens == 3 * 100
            for task in tasks:
                await _cancel(task)
            await _until(lambda: _entry(c, "d1").in_flight_prefill_tokens == 0, "d1 at 0")
            await _until(lambda: _entry(c, "p1").in_flight_prefill_tokens == 0, "p1 at 0")
            # Nothing left over: the next request goes local again.
            d1.behaviour.hang_after = None
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=2)
            assert result.final.serving.placement == "local-short-prompt"

    run(body())


def test_a_local_prefill_counts_until_its_first_token_not_the_streams_end() -> None:
    async def body() -> None:
        async with cluster(CONFIG) as c:
            await c.add("p1", PREFILL, heartbeat=False)
            d1 = await c.add("d1", DECODE, Behaviour(hang_after=0), heartbeat=False)
            entry = _entry(c, "d1")
            # Prefilling (no token yet): counted.
            task = asyncio.create_task(c.generate(prompt_token_ids=PROMPT, max_tokens=4))
            await d1.hanging.wait()
            assert entry.in_flight_prefill_tokens == 100
            await _cancel(task)  # the client cancels
            await _until(lambda: entry.in_flight_prefill_tokens == 0, "0 after a cancel")
            await _until(lambda: entry.in_flight == 0, "the Decode call ended")
            # Decoding after its first token: no longer prefill work, though still in flight.
            d1.hanging.clear()
            d1.behaviour.hang_after = 1
            task = asyncio.create_task(c.generate(prompt_token_ids=PROMPT, max_tokens=4))
            await d1.hanging.wait()  # its first token sent; the router may not have it yet
            await _until(lambda: entry.in_flight_prefill_tokens == 0, "the first token")
            assert entry.in_flight == 1  # the stream goes on
            await _cancel(task)
            await _until(lambda: entry.in_flight == 0, "the Decode call ended")
            assert entry.in_flight_prefill_tokens == 0
            # Served to the end.
            d1.behaviour.hang_after = None
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=3)
            assert result.tokens == expected_completion(len(PROMPT), 3)
            assert result.final.serving.placement == "local-short-prompt"
            assert entry.in_flight_prefill_tokens == 0

    run(body())


def test_a_failed_local_prefill_leaves_no_count() -> None:
    async def body() -> None:
        async with cluster(CONFIG) as c:
            await c.add("p1", PREFILL, heartbeat=False)
            d1 = await c.add("d1", DECODE, Behaviour(error_after=0), heartbeat=False)
            entry = _entry(c, "d1")
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=3)
            assert result.code == grpc.StatusCode.INTERNAL  # its engine failed the request
            assert entry.in_flight_prefill_tokens == 0
            d1.behaviour = Behaviour(fail_code=grpc.StatusCode.INVALID_ARGUMENT)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=3)
            assert result.code == grpc.StatusCode.INVALID_ARGUMENT
            assert entry.in_flight_prefill_tokens == 0
            assert len(d1.calls) == 2

    run(body())


async def _two_decoders(c: Cluster, d1_behaviour: Behaviour) -> tuple[FakeWorker, FakeWorker]:
    """d1 and d2, no heartbeats; d2 a little fuller, so every first pick is d1."""
    await c.add("p1", PREFILL, heartbeat=False)
    d1 = await c.add("d1", DECODE, d1_behaviour, heartbeat=False)
    d2 = await c.add("d2", DECODE, heartbeat=False)
    _entry(c, "d2").load.CopyFrom(worker_pb2.WorkerLoad(free_blocks=90, total_blocks=100))
    return d1, d2


def test_a_local_prefill_failing_over_to_another_decode_worker_leaves_no_count() -> None:
    for die_after in (0, 2):  # before its first token; after two (a resume of 102 tokens)

        async def body(die_after: int = die_after) -> None:
            async with cluster(CONFIG) as c:
                d1, d2 = await _two_decoders(c, Behaviour(die_after=die_after))
                entries = [_entry(c, "d1"), _entry(c, "d2")]
                result = await c.generate(prompt_token_ids=PROMPT, max_tokens=4)
                assert result.tokens == expected_completion(len(PROMPT), 4)
                serving = result.final.serving
                assert (serving.decode_worker, serving.retries) == ("d2", 1)
                assert serving.placement == "local-short-prompt"
                assert (len(d1.calls), len(d2.calls)) == (1, 1)
                assert len(d2.calls[0].request.prompt_token_ids) == len(PROMPT) + die_after
                assert [e.in_flight_prefill_tokens for e in entries] == [0, 0]

        run(body())


def test_a_decode_worker_removed_mid_prefill_is_uncounted() -> None:
    """d1 re-registers (restarted) while prefilling locally: the old entry's call is
    cancelled, the request resumes elsewhere, and the old entry's count is back to 0."""

    async def body() -> None:
        async with cluster(CONFIG) as c:
            d1, _ = await _two_decoders(c, Behaviour(hang_after=0))
            old = _entry(c, "d1")
            task = asyncio.create_task(c.generate(prompt_token_ids=PROMPT, max_tokens=4))
            await d1.hanging.wait()
            assert old.in_flight_prefill_tokens == 100
            d1.behaviour.hang_after = None
            await d1.register(c.router.address, heartbeat=False)  # a new entry
            result = await task
            assert result.tokens == expected_completion(len(PROMPT), 4)
            assert result.final.serving.retries == 1
            assert old.gone.is_set() and old.in_flight_prefill_tokens == 0
            served = _entry(c, result.final.serving.decode_worker)
            assert served is not old and served.in_flight_prefill_tokens == 0

    run(body())
