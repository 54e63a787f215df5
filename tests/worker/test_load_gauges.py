"""A worker's load gauges follow its engine, whether or not it heartbeats to a router.

They were set where the heartbeat read the load: a worker without --router reported 0
running and 0 free blocks for ever, and one that could not reach its router froze."""

from __future__ import annotations

import asyncio

import pytest

from services.rpc.server import client_channel
from services.stubs.tandem.v1 import worker_pb2, worker_pb2_grpc
from tests.router.harness import run
from tests.router.inprocess import ENGINE, generate_request, use_tiny_model, worker

DECODE = worker_pb2.WORKER_ROLE_DECODE


@pytest.fixture(autouse=True)
def _tiny(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    use_tiny_model(monkeypatch, tmp_path_factory)


def test_gauges_follow_the_engine_without_a_router() -> None:
    async def body() -> None:
        async with worker(DECODE, "d0") as d:  # no router: no heartbeat ever
            gauge = d.metrics.registry.get_sample_value
            assert gauge("tandem_kv_free_blocks") == ENGINE.num_blocks
            request = worker_pb2.DecodeRequest(
                request=generate_request(list(range(5, 45)), 64, "g1")
            )
            async with client_channel(d.address) as channel:
                call = worker_pb2_grpc.DecodeWorkerStub(channel).Decode(request, timeout=30)
                async for message in call:
                    if message.token_ids:  # decoding now: its 3 prompt blocks are taken
                        break
                assert gauge("tandem_running_requests") == 1
                assert gauge("tandem_kv_free_blocks") <= ENGINE.num_blocks - 3
                call.cancel()
            while gauge("tandem_running_requests") != 0:
                await asyncio.sleep(0.02)
            assert gauge("tandem_kv_free_blocks") == ENGINE.num_blocks

    run(body(), timeout=60)
