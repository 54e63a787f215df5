"""When the router picks the decode worker of a disaggregated request: after its prefill.

The kv-aware policy looks at the decode pool before the prefill, to decide whether the
decode worker should prefill the prompt itself. That early pick used to be kept through
the prefill, uncounted as load until Decode was sent: every request arriving within one
prefill time went to the same decode worker, and to one that began draining meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter

import grpc

from services.router.config import RouterConfig
from services.stubs.tandem.v1 import worker_pb2
from tests.router.fakes import Behaviour
from tests.router.harness import DECODE, PREFILL, cluster, run
from tests.router.scripted_prefill import add_scripted_prefill

PROMPT = list(range(1, 41))
CONFIG = RouterConfig(
    heartbeat_interval_s=0.1,
    heartbeat_timeout_s=2.0,
    prefill_timeout_s=5.0,
    local_prefill_max_tokens=0,  # every prompt goes through the prefill pool
)


def test_a_burst_spreads_over_the_decode_pool() -> None:
    """8 requests 50 ms apart, each prefill 0.5 s, each decode ~1 s: all 8 decode at once.
    d2 is a little fuller, so before the prefills every pick said d1."""

    async def slow(reply: worker_pb2.PrefillResponse) -> None:
        await asyncio.sleep(0.5)

    async def body() -> Counter[str]:
        async with cluster(CONFIG) as c:
            await add_scripted_prefill(c, "p1", slow)
            await add_scripted_prefill(c, "p2", slow)
            d1 = await c.add("d1", DECODE, Behaviour(token_interval_s=0.05))
            d2 = await c.add("d2", DECODE, Behaviour(token_interval_s=0.05))
            d1.load = worker_pb2.WorkerLoad(free_blocks=100, total_blocks=100)
            d2.load = worker_pb2.WorkerLoad(free_blocks=95, total_blocks=100)
            await asyncio.sleep(0.3)  # their heartbeats carry those loads
            tasks = []
            for _ in range(8):
                tasks.append(
                    asyncio.create_task(c.generate(prompt_token_ids=PROMPT, max_tokens=20))
                )
                await asyncio.sleep(0.05)
            results = await asyncio.gather(*tasks)
            return Counter(r.final.serving.decode_worker for r in results)

    counts = run(body(), 60)
    assert set(counts) == {"d1", "d2"} and min(counts.values()) >= 3, counts  # was {"d1": 8}


def test_a_decode_worker_that_starts_draining_during_the_prefill_is_not_sent_the_decode() -> None:
    async def body() -> None:
        async with cluster(CONFIG) as c:
            prefilling = asyncio.Event()

            async def slow(reply: worker_pb2.PrefillResponse) -> None:
                prefilling.set()
                await asyncio.sleep(0.5)

            p1 = await add_scripted_prefill(c, "p1", slow)
            d1 = await c.add("d1", DECODE, heartbeat=False)
            d2 = await c.add("d2", DECODE, heartbeat=False)
            registry = c.router.registry
            registry.get("d1").load.CopyFrom(
                worker_pb2.WorkerLoad(free_blocks=100, total_blocks=100)
            )
            registry.get("d2").load.CopyFrom(
                worker_pb2.WorkerLoad(free_blocks=90, total_blocks=100)
            )
            task = asyncio.create_task(c.generate(prompt_token_ids=PROMPT, max_tokens=4))
            await prefilling.wait()  # d1, the emptier, was the pick before the prefill
            # d1 begins a graceful shutdown: it tells the router, and refuses new calls.
            registry.heartbeat("d1", registry.get("d1").load, draining=True)
            d1.behaviour.fail_code = grpc.StatusCode.UNAVAILABLE
            result = await task
            serving = result.final.serving
            assert (serving.decode_worker, serving.retries) == ("d2", 0)
            assert (len(p1.calls), len(d1.calls), len(d2.calls)) == (1, 0, 1)  # one prefill

    run(body(), 30)


OLD, NEW = "layer-kv-slot-head-dim", "slot-layer-kv-head-dim"  # the two --kv-layout orders


def test_a_prefill_hands_off_to_a_decode_worker_its_kv_can_reach() -> None:
    """Mid rolling upgrade, old and new --kv-layout side by side: round-robin alone would
    pair p-old with d-new2 (KV that cannot move, so a prefill thrown away). The decode pick
    after a prefill keeps to the workers its KV can reach."""

    async def body() -> list[tuple[str, str]]:
        async with cluster(dataclasses.replace(CONFIG, policy="round-robin")) as c:
            await c.add("p-new", PREFILL, kv_layout=NEW)
            await c.add("p-old", PREFILL, kv_layout=OLD)
            for name, layout in (("d-new", NEW), ("d-new2", NEW), ("d-old", OLD)):
                await c.add(name, DECODE, kv_layout=layout)
            pairs = []
            for _ in range(6):
                final = (await c.generate(prompt_token_ids=PROMPT, max_tokens=2)).final
                pairs.append((final.serving.prefill_worker, final.serving.decode_worker))
            return pairs

    pairs = run(body(), 60)
    assert {p for p, _ in pairs} == {"p-new", "p-old"}
    assert all(p.split("-")[1] == d.split("-")[1].rstrip("2") for p, d in pairs), pairs
    assert {d for p, d in pairs if p == "p-old"} == {"d-old"}


def test_with_no_reachable_decode_worker_the_request_is_still_served() -> None:
    async def body() -> str:
        async with cluster(CONFIG) as c:
            await c.add("p-old", PREFILL, kv_layout=OLD)
            await c.add("d-new", DECODE, kv_layout=NEW)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=2)
            assert result.code == grpc.StatusCode.OK and len(result.tokens) == 2
            return result.final.serving.decode_worker

    assert run(body(), 30) == "d-new"
