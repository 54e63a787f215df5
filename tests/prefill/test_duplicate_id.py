"""A Prefill reusing the id of a prefill whose KV is pinned is refused, and a refused or
cancelled duplicate leaves that pin alone. Before, a duplicate cancelled (its deadline
passed) while its submit waited for the engine thread released the original's blocks: the
decode worker's read then found nothing and prefilled again."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from services.rpc.server import client_channel
from services.stubs.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.worker.host import WorkerHost
from tests.router.harness import run
from tests.router.inprocess import generate_request, idle, use_tiny_model, worker

PREFILL = worker_pb2.WORKER_ROLE_PREFILL
PROMPT = list(range(1, 41))


@pytest.fixture(autouse=True)
def _tiny(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    use_tiny_model(monkeypatch, tmp_path_factory)


async def _prefill(host: WorkerHost, request_id: str, timeout: float) -> worker_pb2.KVHandle:
    request = worker_pb2.PrefillRequest(request=generate_request(PROMPT, 4, request_id))
    async with client_channel(host.address) as channel:
        stub = worker_pb2_grpc.PrefillWorkerStub(channel)
        return (await stub.Prefill(request, timeout=timeout)).kv


async def _pinned(host: WorkerHost, request_id: str) -> tuple[int, ...] | None:
    held = await host.loop.call(lambda e: e.held(request_id))
    return None if held is None else tuple(held.block_ids)


def test_a_duplicate_refused_or_cancelled_leaves_the_original_pin() -> None:
    async def body() -> None:
        async with worker(PREFILL, "p0", lease_s=30.0) as p:
            kv = await _prefill(p, "X", timeout=30)
            blocks = tuple(kv.block_ids)
            assert await _pinned(p, "X") == blocks

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _prefill(p, "X", timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "already holds KV" in refused.value.details()
            assert await _pinned(p, "X") == blocks

            # The engine thread is busy (held here), so the duplicate's submit waits in
            # the queue and its deadline passes first.
            gate = threading.Event()
            busy = asyncio.ensure_future(p.loop.call(lambda e: gate.wait(10)))
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await _prefill(p, "X", timeout=0.3)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            gate.set()
            await busy
            await asyncio.sleep(0.2)  # the handler's clean-up runs after its deadline
            assert await _pinned(p, "X") == blocks

            async with client_channel(p.address) as channel:
                await worker_pb2_grpc.PrefillWorkerStub(channel).ReleaseKV(
                    worker_pb2.ReleaseKVRequest(request_id="X"), timeout=5
                )
            assert (await idle(p)).held == 0

    run(body(), timeout=60)
