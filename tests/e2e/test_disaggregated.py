"""1 prefill + 1 decode worker over NIXL: same tokens as offline, KV really moved."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.engine.engine import LLMEngine
from services.engine.sampling_params import SamplingParams
from services.launcher.local import LocalCluster
from services.stubs.tandem.v1 import inference_pb2_grpc
from tests.e2e.client import Completion, channel, eventually, generate, metric, request
from tests.e2e.conftest import KV_LAYOUT, WORKER_ARGS, start_cluster

BLOCK_BYTES = 16 * 8 * 2 * 4 * 64 * 4  # tokens × layers × K/V × kv heads × dim × fp32


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tandem_home: Path) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("disagg"), prefill=1, decode=1, kv_transport="nixl")
    yield c
    c.stop()


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 4096) for _ in range(rng.choice((5, 16, 40, 130)))] for _ in range(n)]


def _offline(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [list(c.token_ids) for c in engine.generate(prompts, params)]


async def _serve_all(address: str, prompts: list[list[int]], max_tokens: int) -> list:
    async with channel(address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        return await asyncio.gather(*(generate(stub, request(p, max_tokens)) for p in prompts))


def test_tokens_equal_offline_one_at_a_time(cluster: LocalCluster, reference_engine) -> None:
    prompts = [[7, 8, 9], list(range(100, 116)), list(range(200, 245)), list(range(300, 500))]
    expected = _offline(reference_engine, prompts, 20)
    for prompt, want in zip(prompts, expected, strict=True):
        (got,) = asyncio.run(_serve_all(cluster.address, [prompt], 20))
        assert got.tokens == want
        final = got.final
        assert final.usage.prompt_tokens == len(prompt)
        assert final.usage.completion_tokens == 20
        assert final.serving.prefill_worker == "prefill-0"
        assert final.serving.decode_worker == "decode-0"


def test_32_concurrent_requests_equal_offline(cluster: LocalCluster, reference_engine) -> None:
    prompts = _prompts(32, seed=5)
    expected = _offline(reference_engine, prompts, 16)
    results = asyncio.run(_serve_all(cluster.address, prompts, 16))
    assert [r.tokens for r in results] == expected
    assert all(r.final.usage.completion_tokens == 16 for r in results)


def test_kv_crossed_processes_and_was_counted_on_both_sides(cluster: LocalCluster) -> None:
    prefill, decode = cluster.child("prefill-0"), cluster.child("decode-0")
    released = metric(prefill.metrics_port, "tandem_kv_released_total")
    received = metric(decode.metrics_port, "tandem_kv_transfer_received_bytes_total")
    prompt = list(range(1000, 1050))  # 50 tokens: 4 blocks, never seen before
    (got,) = asyncio.run(_serve_all(cluster.address, [prompt], 4))
    serving = got.final.serving
    assert serving.kv_transport == "nixl"
    assert serving.kv_blocks_reused == 0
    assert serving.kv_transfer_bytes == 4 * BLOCK_BYTES
    assert metric(decode.metrics_port, "tandem_kv_transfer_received_bytes_total") == (
        received + 4 * BLOCK_BYTES
    )
    eventually(lambda: metric(prefill.metrics_port, "tandem_kv_released_total") == released + 1)
    # The decode worker now caches the prompt's 3 full blocks: the same prompt
    # reads only the partial last block.
    (again,) = asyncio.run(_serve_all(cluster.address, [prompt], 4))
    assert again.final.serving.kv_blocks_reused == 3
    assert again.final.serving.kv_transfer_bytes == BLOCK_BYTES


def test_workers_with_the_other_pool_order_give_the_same_tokens(
    tmp_path: Path, tandem_home: Path, reference_engine
) -> None:
    """Workers whose pools have the other order (layer-major, unless TANDEM_E2E_KV_LAYOUT
    picked it for the others) give the offline tokens, and the KV crosses processes rather
    than being recomputed."""
    other = "layer-major" if KV_LAYOUT == "slot-major" else "slot-major"
    worker_args = (*WORKER_ARGS[:-1], other)
    c = start_cluster(tmp_path, prefill=1, decode=1, kv_transport="nixl", worker_args=worker_args)
    try:
        prompts = [list(range(2000, 2050)), list(range(3000, 3130))]  # 4 and 9 blocks
        expected = _offline(reference_engine, prompts, 12)
        results = asyncio.run(_serve_all(c.address, prompts, 12))
        assert [r.tokens for r in results] == expected
        moved = sorted(r.final.serving.kv_transfer_bytes for r in results)
        assert moved == [4 * BLOCK_BYTES, 9 * BLOCK_BYTES]  # the last, partial block too
        decode = c.child("decode-0")
        received = metric(decode.metrics_port, "tandem_kv_transfer_received_bytes_total")
        assert received == 13 * BLOCK_BYTES
    finally:
        c.stop()


def test_client_cancel_returns_every_block(cluster: LocalCluster) -> None:
    async def cancel_midway() -> None:
        async with channel(cluster.address) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            call = stub.Generate(request(list(range(10, 90)), 3000))
            seen = 0
            async for msg in call:
                seen += len(msg.token_ids)
                if seen >= 5:
                    call.cancel()
                    break

    asyncio.run(cancel_midway())
    total = 0.25 * 2**30 // BLOCK_BYTES
    for name in ("prefill-0", "decode-0"):
        port = cluster.child(name).metrics_port
        eventually(lambda p=port: metric(p, "tandem_running_requests") == 0)
        # every block free (cached ones count as free): the pool is back to idle
        eventually(lambda p=port: metric(p, "tandem_kv_free_blocks") == total, timeout=15)


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"top_p": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"prompt_token_ids": [99999]}, grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
        ({"prompt_token_ids": [5] * 5000}, grpc.StatusCode.INVALID_ARGUMENT, "context"),
        ({"model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "no-such-model"),
    ],
)
def test_bad_requests_get_precise_statuses(
    cluster: LocalCluster, fields: dict, code: grpc.StatusCode, words: str
) -> None:
    req = request([1, 2, 3], 4)
    for name, value in fields.items():
        if name == "prompt_token_ids":
            del req.prompt_token_ids[:]
            req.prompt_token_ids.extend(value)
        else:
            setattr(req, name, value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(_serve_all_raw(cluster.address, req))
    assert err.value.code() == code
    assert words in err.value.details()


async def _serve_all_raw(address: str, req) -> None:
    async with channel(address) as ch:
        await generate(inference_pb2_grpc.InferenceStub(ch), req)


@pytest.fixture(scope="module")
def small_pool(
    tmp_path_factory: pytest.TempPathFactory, tandem_home: Path
) -> Iterator[LocalCluster]:
    """1 prefill + 1 decode worker whose pool holds 8 blocks of fp32 tandem-tiny."""
    pool_gib = str(8.5 * BLOCK_BYTES / 2**30)
    c = start_cluster(
        tmp_path_factory.mktemp("room"),
        prefill=1,
        decode=1,
        decode_args=("--kv-cache-gib", pool_gib),
    )
    yield c
    c.stop()


R1_PROMPT = list(range(2000, 2066))  # 5 blocks
R2_PROMPT = list(range(3000, 3050))  # 4 blocks


async def _r1_filling_the_pool(stub: inference_pb2_grpc.InferenceStub) -> asyncio.Future:
    """r1 runs on the decode worker, 66 + 60 tokens: 5 of its 8 blocks from the start,
    all 8 by its last. Returns once it holds 5; the future gives its Completion."""
    r1 = Completion()
    running = asyncio.ensure_future(generate(stub, request(R1_PROMPT, 60), into=r1))
    while len(r1.tokens) < 2:  # the second token came from the decode worker
        await asyncio.sleep(0.005)
    return running


async def _r2_behind_r1(address: str) -> tuple[Completion, Completion]:
    """r2 (8 tokens) sent once r1 fills the decode pool; both completions."""
    async with channel(address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        r1 = await _r1_filling_the_pool(stub)
        second = await generate(stub, request(R2_PROMPT, 8))
        return await r1, second


def _decodes(decode_port: int) -> float:
    """Decode calls the worker has taken (a labelled counter: absent until the first)."""
    try:
        return metric(decode_port, "tandem_decode_requests_total")
    except AssertionError:
        return 0.0


def _room_figures(decode_port: int) -> tuple[float, float, float]:
    return tuple(  # type: ignore[return-value]
        metric(decode_port, name)
        for name in (
            "tandem_kv_room_wait_seconds_count",
            "tandem_kv_room_give_ups_total",
            "tandem_kv_transfer_failures_total",
        )
    )


def test_a_full_decode_pool_waits_for_room_rather_than_prefilling_again(
    small_pool: LocalCluster, reference_engine
) -> None:
    """r2's prompt, prefilled while r1 holds 5 of the decode worker's 8 blocks, needs 4 and
    finds 3 free: it waits for r1 to finish, then its KV is read in. Before, it was queued
    to be prefilled again on the decode worker (bench/disagg/gpu-h100-overload: under load
    151 of 200 requests went that way); with --kv-room-wait-s 0 this test fails so."""
    decode = small_pool.child("decode-0")
    eventually(lambda: metric(decode.metrics_port, "tandem_kv_free_blocks") == 8)
    (want1,), (want2,) = (
        _offline(reference_engine, [p], n) for p, n in ((R1_PROMPT, 60), (R2_PROMPT, 8))
    )
    waits, give_ups, failures = _room_figures(decode.metrics_port)

    got1, got2 = asyncio.run(_r2_behind_r1(small_pool.address))
    assert got1.tokens == want1 and got2.tokens == want2
    serving = got2.final.serving
    assert serving.prefill_worker == "prefill-0" and serving.kv_transport
    assert serving.kv_transfer_bytes == 4 * BLOCK_BYTES
    assert _room_figures(decode.metrics_port) == (waits + 1, give_ups, failures)
    eventually(lambda: metric(decode.metrics_port, "tandem_kv_free_blocks") == 8)


def test_cancelled_while_waiting_for_room_returns_every_block(small_pool: LocalCluster) -> None:
    """r2 gets its first token (from the prefill worker), then waits for room on the decode
    worker; the client cancels it there. Both pools go back to idle, and r2 is neither
    admitted nor prefilled on the decode worker."""
    decode, prefill = small_pool.child("decode-0"), small_pool.child("prefill-0")
    prefill_total = 0.25 * 2**30 // BLOCK_BYTES
    eventually(lambda: metric(decode.metrics_port, "tandem_kv_free_blocks") == 8)
    waits, give_ups, failures = _room_figures(decode.metrics_port)

    async def cancel_while_waiting() -> None:
        async with channel(small_pool.address) as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            r1 = await _r1_filling_the_pool(stub)
            decoded = await asyncio.to_thread(_decodes, decode.metrics_port)  # r1 counted
            call = stub.Generate(request(R2_PROMPT, 8))
            assert len((await call.read()).token_ids) == 1  # the prefill worker's token
            # The decode worker has r2 (a counter, not the heartbeat's gauges, which lag)
            await asyncio.to_thread(
                eventually, lambda: _decodes(decode.metrics_port) == decoded + 1, 5
            )
            call.cancel()
            assert not r1.done()  # r2 was cancelled while r1 still held the pool
            await r1

    asyncio.run(cancel_while_waiting())
    eventually(lambda: metric(decode.metrics_port, "tandem_kv_free_blocks") == 8)
    eventually(lambda: metric(prefill.metrics_port, "tandem_kv_free_blocks") == prefill_total)
    eventually(lambda: metric(decode.metrics_port, "tandem_queue_depth") == 0)
    assert _room_figures(decode.metrics_port) == (waits, give_ups, failures)


def test_waiting_for_room_ends_before_the_prefills_lease(
    tmp_path_factory: pytest.TempPathFactory, reference_engine
) -> None:
    """With a 0.2 s lease on the prefill worker, r2 stops waiting for room after 0.15 s
    (its lease less the margin, a quarter of it), well before r1's 60 steps free the room,
    and is prefilled on the decode worker: same tokens, its KV never read (its blocks there
    may already hold another prompt's KV), no failed read. Without the bound it waited and
    read them after the lease."""
    pool_gib = str(8.5 * BLOCK_BYTES / 2**30)
    c = start_cluster(
        tmp_path_factory.mktemp("lease"),
        prefill=1,
        decode=1,
        prefill_args=("--lease-s", "0.2"),
        decode_args=("--kv-cache-gib", pool_gib),
    )
    try:
        decode = c.child("decode-0")
        (want2,) = _offline(reference_engine, [R2_PROMPT], 8)
        waits, give_ups, failures = _room_figures(decode.metrics_port)

        _, got2 = asyncio.run(_r2_behind_r1(c.address))
        assert got2.tokens == want2
        assert got2.final.serving.prefill_worker == "" and got2.final.serving.kv_transfer_bytes == 0
        assert _room_figures(decode.metrics_port) == (waits, give_ups + 1, failures)
    finally:
        c.stop()
