"""The kv-aware policy: exact costs, seeded tie-breaking, and the router's in-flight count."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from services.engine.block_hash import hash_prefix_blocks
from services.engine.kv_events import BlockStored
from services.router.config import RouterConfig
from services.router.kv_index import KVIndex
from services.router.policies import KVAware, RoutingRequest, make_policy
from services.router.registry import DECODE, PREFILL, WorkerState
from services.stubs.tandem.v1 import worker_pb2
from tests.router.fakes import BLOCK_SIZE, MODEL, MODEL_ID, Behaviour
from tests.router.harness import cluster, run


def worker(
    worker_id: str,
    role: int = PREFILL,
    *,
    queued: int = 0,
    in_flight_tokens: int = 0,
    in_flight: int = 0,
    running: int = 0,
    free_blocks: int = 0,
    total_blocks: int = 0,
) -> WorkerState:
    return WorkerState(
        worker_id=worker_id,
        role=role,
        address="127.0.0.1:1",
        model="m",
        layout=worker_pb2.KVLayout(block_size=16, model_id="m"),
        max_context_length=4096,
        vocab_size=4096,
        last_heartbeat=0.0,
        load=worker_pb2.WorkerLoad(
            queued_prefill_tokens=queued,
            running=running,
            free_blocks=free_blocks,
            total_blocks=total_blocks,
        ),
        in_flight=in_flight,
        in_flight_prefill_tokens=in_flight_tokens,
    )


def routing(role: int, cached: dict[str, int], prompt_len: int = 200) -> RoutingRequest:
    return RoutingRequest(
        request_id="r",
        model="m",
        role=role,
        prompt_token_ids=tuple(range(prompt_len)),
        cached_blocks=cached,
        block_size=16,
    )


def test_kv_aware_is_the_default_everywhere() -> None:
    assert RouterConfig().policy == "kv-aware"
    assert isinstance(make_policy("kv-aware"), KVAware)


def test_prefill_prefers_the_longest_prefix_unless_its_queue_costs_more() -> None:
    policy = KVAware()
    request = routing(PREFILL, {"a": 10, "b": 2})  # a holds 160 tokens, b 32, c none
    a, b, c = worker("a", queued=100), worker("b"), worker("c")
    # cost = uncached + queued + in flight: a 40 + 100 = 140, b 168, c 200.
    assert [policy.prefill_cost(w, request) for w in (a, b, c)] == [140, 168, 200]
    assert policy.pick([a, b, c], request) is a
    a.in_flight_prefill_tokens = 29  # 169: b (168) is now cheaper
    assert policy.prefill_cost(a, request) == 169
    assert policy.pick([a, b, c], request) is b
    a.in_flight_prefill_tokens = 61
    b.load.queued_prefill_tokens = 33  # a 201, b 201: c (200) wins on an empty queue
    assert policy.pick([a, b, c], request) is c


def test_a_held_prefix_counts_up_to_the_block_before_the_last_token() -> None:
    """The engine always computes the prompt's last token (it needs its logits), so a block
    holding it is computed again: a prompt of whole blocks is never free on its holder."""
    cases = {  # (prompt tokens, blocks held) -> tokens to compute
        (10, 1): 10,  # a block longer than the prompt: nothing usable
        (64, 4): 16,  # four whole blocks held: the fourth is computed again
        (64, 3): 16,
        (65, 5): 1,  # the last token starts a block of its own
    }
    for (prompt_len, held), uncached in cases.items():
        request = routing(PREFILL, {"a": held}, prompt_len=prompt_len)
        assert KVAware().prefill_cost(worker("a"), request) == uncached, (prompt_len, held)
    assert routing(PREFILL, {"a": 4}, prompt_len=64).cached_fraction("a") == 0.75


def test_equal_costs_are_shared_at_random_reproducibly() -> None:
    pool = [worker("a"), worker("b"), worker("c", queued=1)]
    request = routing(PREFILL, {})
    picks_1 = [KVAware(seed=5).pick(pool, request).worker_id for _ in range(1)]
    policy_a, policy_b = KVAware(seed=5), KVAware(seed=5)
    seq_a = [policy_a.pick(pool, request).worker_id for _ in range(200)]
    seq_b = [policy_b.pick(pool, request).worker_id for _ in range(200)]
    assert seq_a == seq_b and seq_a[:1] == picks_1
    counts = Counter(seq_a)
    assert set(counts) == {"a", "b"} and min(counts.values()) > 60


def test_decode_weighs_load_fullness_and_the_held_prefix() -> None:
    policy = KVAware()
    # cost = in_flight + running + waiting + 1.0 × used share − 1.0 × cached share
    request = routing(DECODE, {"holder": 10}, prompt_len=200)  # holds 160/200 = 0.8
    holder = worker("holder", DECODE, running=1, free_blocks=50, total_blocks=100)
    idle = worker("idle", DECODE, free_blocks=100, total_blocks=100)
    full = worker("full", DECODE, free_blocks=0, total_blocks=100)
    assert policy.decode_cost(holder, request) == 1 + 0.5 - 0.8
    assert policy.decode_cost(idle, request) == 0
    assert policy.decode_cost(full, request) == 1
    assert policy.pick([holder, idle, full], request) is idle
    holder.load.running = 0  # 0.5 − 0.8 < 0: the prefix now wins over the empty worker
    assert policy.pick([holder, idle, full], request) is holder
    idle.in_flight = 1
    full.load.free_blocks = 100  # used 0: cost 0, but it holds nothing
    assert policy.pick([idle, full], request) is full


def _index_holding(worker_id: str, token_ids: list[int]) -> KVIndex:
    index = KVIndex(block_size=BLOCK_SIZE)
    hashes = tuple(hash_prefix_blocks(token_ids, BLOCK_SIZE, MODEL_ID))
    index.apply(worker_id, BlockStored(0, None, hashes, BLOCK_SIZE))
    return index


class _KVState:
    def __init__(self, index: KVIndex) -> None:
        self._index = index

    def index(self, model: str) -> KVIndex | None:
        return self._index if model == MODEL else None


@pytest.mark.parametrize("held_blocks", [3, 4])
def test_in_flight_prefill_tokens_spread_a_burst_before_any_heartbeat(held_blocks: int) -> None:
    """p1 holds 3 (or all 4: the last is computed again) of the prompt's 4 blocks; 8
    requests arrive while every prefill hangs. Costs before each pick: p1 = 16 + 16 × (its
    in-flight requests), p2 = 64 + 64 × its. So p1 takes the first three (16, 32, 48 < 64),
    then p2 must get some. Holding all 4 once cost p1 nothing: all 8 went there."""
    prompt = list(range(1, 65))
    config = RouterConfig(
        heartbeat_interval_s=5.0, prefill_timeout_s=10.0, local_prefill_max_tokens=0
    )

    async def body() -> None:
        async with cluster(config) as c:
            held = prompt[: 16 * held_blocks]
            c.router.orchestrator.kv_state = _KVState(_index_holding("p1", held))
            p1 = await c.add("p1", PREFILL, Behaviour(hang_after=0), heartbeat=False)
            p2 = await c.add("p2", PREFILL, Behaviour(hang_after=0), heartbeat=False)
            await c.add("d1", DECODE, heartbeat=False)
            tasks = [
                asyncio.create_task(c.generate(prompt_token_ids=prompt, max_tokens=2))
                for _ in range(8)
            ]
            for _ in range(500):
                if len(p1.calls) + len(p2.calls) == 8:
                    break
                await asyncio.sleep(0.01)
            assert len(p1.calls) + len(p2.calls) == 8
            assert len(p1.calls) >= 3 and len(p2.calls) >= 1
            workers = {w.worker_id: w for w in c.router.registry.workers()}
            n1, n2 = len(p1.calls), len(p2.calls)
            assert workers["p1"].in_flight_prefill_tokens == 16 * n1
            assert workers["p2"].in_flight_prefill_tokens == 64 * n2
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for _ in range(200):
                if workers["p1"].in_flight_prefill_tokens == 0:
                    break
                await asyncio.sleep(0.01)
            assert workers["p1"].in_flight_prefill_tokens == 0

    run(body())
