"""Conditional disaggregation: the decode worker prefills locally when that is cheaper,
and the final message says where the prompt was prefilled and why."""

from __future__ import annotations

import grpc

from services.router.config import RouterConfig
from services.router.placement_metrics import PLACEMENTS
from services.stubs.tandem.v1 import inference_pb2
from tests.router.fakes import Behaviour, expected_completion
from tests.router.harness import DECODE, PREFILL, cluster, run
from tests.router.test_policies_kv import _index_holding, _KVState

SHORT = [5, 6, 7, 8, 9]
LONG = list(range(1, 321))  # 20 blocks of 16
QUICK = dict(heartbeat_interval_s=0.1, heartbeat_timeout_s=2.0, prefill_timeout_s=5.0)


def _count(placement: str) -> float:
    return PLACEMENTS.labels(placement)._value.get()


def test_a_short_prompt_is_prefilled_by_the_decode_worker() -> None:
    async def body() -> None:
        async with cluster(RouterConfig(**QUICK)) as c:
            prefill = await c.add("p1", PREFILL, Behaviour(cached_tokens=4))
            decode = await c.add("d1", DECODE, Behaviour(cached_tokens=2))
            before = _count("local-short-prompt")
            result = await c.generate(prompt_token_ids=SHORT, max_tokens=3)
            assert result.tokens == expected_completion(len(SHORT), 3)
            assert prefill.calls == []  # the prefill pool was skipped
            (call,) = decode.calls
            assert not call.HasField("kv") and not call.HasField("first_token_id")
            serving = result.final.serving
            assert (serving.placement, serving.policy) == ("local-short-prompt", "kv-aware")
            assert (serving.prefill_worker, serving.decode_worker) == ("", "d1")
            assert result.final.usage.cached_tokens == 2  # the decode worker's own reuse
            assert _count("local-short-prompt") == before + 1

    run(body())


def test_a_decode_worker_with_a_long_prefill_queue_sends_even_a_short_prompt_to_the_pool() -> None:
    """Local only while the decode worker's queued prefill keeps the first token within a
    short prompt's worth (256 tokens) of the least busy prefill worker's."""

    async def body() -> None:
        async with cluster(RouterConfig(**QUICK)) as c:
            prefill = await c.add("p1", PREFILL, heartbeat=False)
            decode = await c.add("d1", DECODE, heartbeat=False)
            d1 = c.router.registry.get("d1")
            placements = []
            for queued in (0, 256, 257, 20_000):
                d1.load.queued_prefill_tokens = queued
                result = await c.generate(prompt_token_ids=SHORT, max_tokens=2)
                placements.append(result.final.serving.placement)
            assert placements == [
                "local-short-prompt",
                "local-short-prompt",  # 256 + 5 here <= 5 on the idle p1 + 256
                "disaggregated",
                "disaggregated",
            ]
            assert (len(prefill.calls), len(decode.calls)) == (2, 4)

    run(body())


def _long_prompt_config() -> RouterConfig:
    return RouterConfig(**QUICK, local_prefill_max_tokens=8)


def test_a_decode_worker_holding_most_of_the_prompt_prefills_the_rest_itself() -> None:
    async def body() -> None:
        async with cluster(_long_prompt_config()) as c:
            # d1 holds 18 of 20 blocks: 288/320 = 0.9 ≥ 0.9, though 32 tokens > 8 remain.
            c.router.orchestrator.kv_state = _KVState(_index_holding("d1", LONG[:288]))
            prefill = await c.add("p1", PREFILL)
            decode = await c.add("d1", DECODE)
            result = await c.generate(prompt_token_ids=LONG, max_tokens=2)
            assert result.tokens == expected_completion(len(LONG), 2)
            assert prefill.calls == [] and not decode.calls[0].HasField("kv")
            assert result.final.serving.placement == "local-cached-prefix"
            assert result.final.serving.prefill_worker == ""

    run(body())


def test_below_the_cached_share_the_prompt_goes_to_the_prefill_pool() -> None:
    async def body() -> None:
        async with cluster(_long_prompt_config()) as c:
            # 17 of 20 blocks: 0.85 < 0.9 and 48 tokens > 8: disaggregate.
            c.router.orchestrator.kv_state = _KVState(_index_holding("d1", LONG[:272]))
            prefill = await c.add("p1", PREFILL, Behaviour(cached_tokens=16))
            decode = await c.add("d1", DECODE)
            result = await c.generate(prompt_token_ids=LONG, max_tokens=2)
            assert result.tokens == expected_completion(len(LONG), 2)
            assert len(prefill.calls) == 1 and decode.calls[0].HasField("kv")
            serving = result.final.serving
            assert (serving.placement, serving.prefill_worker) == ("disaggregated", "p1")
            assert result.final.usage.cached_tokens == 16  # the prefill worker's reuse

    run(body())


def test_the_decode_worker_holding_the_prefix_is_chosen() -> None:
    async def body() -> None:
        async with cluster(_long_prompt_config()) as c:
            c.router.orchestrator.kv_state = _KVState(_index_holding("d2", LONG[:160]))
            await c.add("p1", PREFILL)
            d1 = await c.add("d1", DECODE)
            d2 = await c.add("d2", DECODE)
            for _ in range(4):
                result = await c.generate(prompt_token_ids=LONG, max_tokens=2)
                assert result.final.serving.decode_worker == "d2"
                assert result.final.serving.placement == "disaggregated"  # 0.5 < 0.9
            assert d1.calls == [] and len(d2.calls) == 4

    run(body())


def test_without_a_usable_prefill_worker_the_placement_says_why() -> None:
    async def body() -> None:
        async with cluster(_long_prompt_config()) as c:
            await c.add("d1", DECODE)
            result = await c.generate(prompt_token_ids=LONG, max_tokens=2)
            assert result.final.serving.placement == "local-no-prefill-worker"
            await c.add("p1", PREFILL, Behaviour(fail_code=grpc.StatusCode.UNAVAILABLE))
            result = await c.generate(prompt_token_ids=LONG, max_tokens=2)
            assert result.tokens == expected_completion(len(LONG), 2)
            assert result.final.serving.placement == "local-prefill-failed"
            assert result.final.serving.retries == 1

    run(body())


def test_round_robin_and_least_loaded_always_disaggregate() -> None:
    for policy in ("round-robin", "least-loaded"):

        async def body(policy: str = policy) -> None:
            async with cluster(RouterConfig(**QUICK, policy=policy)) as c:
                prefill = await c.add("p1", PREFILL)
                await c.add("d1", DECODE)
                result = await c.generate(prompt_token_ids=SHORT, max_tokens=2)
                assert len(prefill.calls) == 1
                serving = result.final.serving
                assert (serving.placement, serving.policy) == ("disaggregated", policy)
                assert serving.prefill_worker == "p1"

        run(body())


def test_serving_info_fields_are_pinned() -> None:
    fields = inference_pb2.ServingInfo.DESCRIPTOR.fields_by_name
    assert (fields["placement"].number, fields["policy"].number) == (7, 8)
