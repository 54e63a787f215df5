"""The router forwards what is left of a prefill's KV lease, never a stale one.

A KVHandle's lease_ms counts from when the prefill worker answered; the decode worker
counts it from its own arrival. When the router waits between the two (no decode worker
left, one restarting), it must take that wait off the lease, and send no handle once the
lease is (nearly) over: by then the prefill worker may have given the blocks to another
prompt, and a one-sided NIXL READ would copy that prompt's KV without an error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc
import pytest

from services.engine.engine import EngineConfig
from services.kv_transfer.nixl_transport import nixl_available
from services.router.config import RouterConfig
from services.router.orchestrator import KV_LEASE_MIN_LEFT_MS
from services.rpc.server import client_channel
from services.stubs.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.worker.host import WorkerHost
from tests.router import inprocess
from tests.router.fakes import MODEL, expected_completion
from tests.router.harness import DECODE, FAST, PREFILL, Cluster, Result, cluster, run
from tests.router.scripted_prefill import ScriptedPrefill, add_scripted_prefill
from tests.router.test_failover import _until

PROMPT = [11, 12, 13]
WAITING = RouterConfig(
    policy="round-robin",
    heartbeat_interval_s=0.1,
    heartbeat_timeout_s=1.0,
    prefill_timeout_s=10,
    decode_wait_s=10,
)
"""A decode worker that stops heartbeating is gone after 1 s; a stream that has sent its
first token then waits up to 10 s for another."""


async def _prefill_outliving_its_decoder(
    c: Cluster, lease_ms: int
) -> tuple[ScriptedPrefill, asyncio.Task[Result], asyncio.Future[float]]:
    """p1 answers with a lease of ``lease_ms`` once d0, the only decode worker, is gone, so
    the router waits for a decode worker with the lease running. Returns p1, the stream,
    and when p1 answered (time.monotonic)."""
    answered: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def edit(reply: worker_pb2.PrefillResponse) -> None:
        reply.kv.lease_ms = lease_ms
        await _until(lambda: not c.router.registry.candidates(MODEL, DECODE), timeout=5)
        answered.set_result(time.monotonic())

    prefill = await add_scripted_prefill(c, "p1", edit)
    await c.add("d0", DECODE, heartbeat=False)
    stream = asyncio.create_task(c.generate(prompt_token_ids=PROMPT, max_tokens=8, timeout=30))
    return prefill, stream, answered


def test_the_decode_worker_gets_the_lease_less_the_routers_wait() -> None:
    lease_ms, wait_s = 5000, 1.0

    async def body() -> None:
        async with cluster(WAITING) as c:
            _, stream, answered = await _prefill_outliving_its_decoder(c, lease_ms)
            await answered
            await asyncio.sleep(wait_s)
            decoder = await c.add("d1", DECODE)
            result = await stream

            assert result.code == grpc.StatusCode.OK, result.details
            assert result.tokens == expected_completion(len(PROMPT), 8)
            (call,) = decoder.calls
            assert call.HasField("kv")
            # The router got the answer after p1 sent it: at most a little less waited.
            assert KV_LEASE_MIN_LEFT_MS <= call.kv.lease_ms <= lease_ms - wait_s * 1000 + 100

    run(body())


def test_a_lease_run_out_during_the_wait_sends_no_handle_and_the_decoder_prefills() -> None:
    """The first token, already sent, becomes prompt: the decode worker prefills prompt +
    first token, every token reaches the client once, and p1's blocks are released."""
    lease_ms = 2 * KV_LEASE_MIN_LEFT_MS

    async def body() -> None:
        async with cluster(WAITING) as c:
            prefill, stream, answered = await _prefill_outliving_its_decoder(c, lease_ms)
            await answered
            await asyncio.sleep(0.6)  # less than KV_LEASE_MIN_LEFT_MS left
            decoder = await c.add("d1", DECODE)
            result = await stream

            expected = expected_completion(len(PROMPT), 8)
            assert result.code == grpc.StatusCode.OK, result.details
            assert result.tokens == expected
            assert result.final.usage.completion_tokens == 8
            assert result.final.serving.prefill_worker == ""  # its KV was not used
            (call,) = decoder.calls
            assert not call.HasField("kv") and not call.HasField("first_token_id")
            assert list(call.request.prompt_token_ids) == [*PROMPT, expected[0]]
            assert call.request.max_tokens == 7
            attempt = prefill.calls[0].request.request_id
            await _until(lambda: prefill.released == [attempt])

    run(body())


def test_a_short_lease_goes_with_the_handle_when_there_is_no_wait() -> None:
    """A lease configured under twice KV_LEASE_MIN_LEFT_MS is not dropped for being short:
    half of it is the floor, and the decode worker bounds its read by what is left."""
    lease_ms = 2 * KV_LEASE_MIN_LEFT_MS - 100  # its floor: half of it

    async def edit(reply: worker_pb2.PrefillResponse) -> None:
        reply.kv.lease_ms = lease_ms

    async def body() -> None:
        async with cluster(WAITING) as c:
            await add_scripted_prefill(c, "p1", edit)
            decoder = await c.add("d1", DECODE)
            result = await c.generate(prompt_token_ids=PROMPT, max_tokens=4)

            assert result.code == grpc.StatusCode.OK, result.details
            assert result.tokens == expected_completion(len(PROMPT), 4)
            (call,) = decoder.calls
            assert lease_ms // 2 <= call.kv.lease_ms < lease_ms

    run(body())


# ------------------------------------------------------------ real workers over NIXL
REAL_PROMPT = list(range(1, 41))
"""40 tokens: 3 blocks of 16."""
SMALL_POOL = EngineConfig(dtype="float32", device="cpu", num_blocks=8, block_size=16)
"""8 blocks: a 7-block prompt after REAL_PROMPT's lease ran out must take its blocks."""


def _held_back(host: WorkerHost) -> tuple[threading.Event, threading.Event]:
    """Hold ``host``'s next model step until the returned ``go`` is set; ``entered`` is set
    once the step is waiting (the engine thread blocks: a slow step)."""
    entered, go = threading.Event(), threading.Event()
    execute = host.engine.runner.execute

    def held(chunks: Sequence[object]) -> object:
        if not go.is_set():
            entered.set()
            go.wait(timeout=20)
        return execute(chunks)

    host.engine.runner.execute = held
    return entered, go


async def _held(host: WorkerHost) -> int:
    return await host.loop.call(lambda e: e.num_held)


async def _take_the_pool(host: WorkerHost) -> None:
    """Prefill a 7-block prompt on ``host`` (and release it): its blocks now hold that
    prompt's KV, among them blocks REAL_PROMPT's handle names."""
    other = inprocess.generate_request([2000 + i for i in range(112)], 4, "other")
    async with client_channel(host.address) as channel:
        stub = worker_pb2_grpc.PrefillWorkerStub(channel)
        await stub.Prefill(worker_pb2.PrefillRequest(request=other), timeout=30)
        await stub.ReleaseKV(worker_pb2.ReleaseKVRequest(request_id="other"), timeout=5)


@pytest.mark.skipif(not nixl_available(), reason="NIXL with UCX does not work on this host")
def test_blocks_reused_after_the_lease_are_not_read_by_the_decode_worker(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The whole failure, on real workers: p0's lease (1 s) runs out while the router waits
    for a decode worker, and another prompt takes the blocks. The decode worker that then
    joins must produce the offline reference's tokens, not decode on that prompt's KV."""
    inprocess.use_tiny_model(monkeypatch, tmp_path_factory)
    expected = inprocess.reference_tokens(REAL_PROMPT, 8)
    config = dataclasses.replace(FAST, heartbeat_timeout_s=1.0, decode_wait_s=30)

    async def body() -> None:
        async with cluster(config) as c:
            router = c.router.address
            async with inprocess.worker(
                PREFILL, "p0", SMALL_POOL, kv_transport="nixl", lease_s=1.0, router=router
            ) as p:
                entered, go = _held_back(p)
                # d0 stops heartbeating at once: gone 1 s from now, while p0's step is held.
                model_id = p.engine.model_id
                await c.add("d0", DECODE, heartbeat=False, model=inprocess.MODEL, model_id=model_id)
                await _until(lambda: c.router.registry.candidates(inprocess.MODEL, PREFILL))
                stream = asyncio.create_task(
                    c.generate(
                        model=inprocess.MODEL,
                        prompt_token_ids=REAL_PROMPT,
                        max_tokens=8,
                        temperature=0.0,
                        ignore_eos=True,
                        timeout=60,
                    )
                )
                assert await asyncio.to_thread(entered.wait, 10)
                await _until(lambda: not c.router.registry.candidates(inprocess.MODEL, DECODE))
                go.set()
                await _until_async(lambda: _held(p), 1)
                await _until_async(lambda: _held(p), 0)  # the lease ran out: blocks are free
                await _take_the_pool(p)
                async with inprocess.worker(DECODE, "d1", kv_transport="nixl", router=router):
                    result = await stream

                assert result.code == grpc.StatusCode.OK, result.details
                assert result.tokens == expected

    run(body(), timeout=60)


async def _until_async(read: Callable[[], Awaitable[int]], value: int) -> None:
    """Poll ``read()`` until it returns ``value``; fail the test after 10 s."""
    end = time.monotonic() + 10
    while await read() != value:
        assert time.monotonic() < end, f"never {value}"
        await asyncio.sleep(0.02)
