"""A prefill whose model step fails ends with a status, never with a made-up first token.

PrefillResponse has no room for an error: answering OK with FINISH_REASON_ERROR gave the
router a first token of 0, which it sent to the client (and metered) as a finished request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import pytest

from services.rpc.server import client_channel
from services.stubs.tandem.v1 import worker_pb2, worker_pb2_grpc
from tests.router.harness import FAST, cluster, run
from tests.router.inprocess import IDLE, MODEL, generate_request, idle, use_tiny_model, worker

PREFILL = worker_pb2.WORKER_ROLE_PREFILL
DECODE = worker_pb2.WORKER_ROLE_DECODE
PROMPT = list(range(1, 41))


@pytest.fixture(autouse=True)
def _tiny(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    use_tiny_model(monkeypatch, tmp_path_factory)


def _failing_step(chunks: Sequence[object]) -> None:
    raise RuntimeError("simulated device error in the prefill step")


def test_a_failed_model_step_ends_prefill_with_internal_and_frees_the_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def body() -> None:
        async with worker(PREFILL, "p0", kv_transport="grpc") as p:
            monkeypatch.setattr(p.engine.runner, "execute", _failing_step)
            request = worker_pb2.PrefillRequest(request=generate_request(PROMPT, 4, "r"))
            async with client_channel(p.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await worker_pb2_grpc.PrefillWorkerStub(channel).Prefill(request, timeout=30)
            assert failed.value.code() == grpc.StatusCode.INTERNAL
            assert failed.value.details() == "prefill of r failed: the model step failed"
            assert await idle(p) == IDLE

    run(body(), timeout=60)


def test_the_client_gets_internal_and_no_token_when_the_prefill_step_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through a router: the request fails before any message (nothing metered), with the
    prefill worker's INTERNAL; neither worker keeps a block."""

    async def body() -> None:
        async with cluster(FAST) as c:
            address = c.router.address
            async with (
                worker(PREFILL, "p0", kv_transport="grpc", router=address) as p,
                worker(DECODE, "d0", kv_transport="grpc", router=address) as d,
            ):
                while len(c.router.registry.workers()) < 2:
                    await asyncio.sleep(0.02)
                monkeypatch.setattr(p.engine.runner, "execute", _failing_step)
                result = await c.generate(
                    model=MODEL,
                    prompt_token_ids=PROMPT,
                    max_tokens=4,
                    temperature=0.0,
                    ignore_eos=True,
                    timeout=30,
                )
                assert result.code == grpc.StatusCode.INTERNAL
                assert "p0" in result.details and "the model step failed" in result.details
                assert result.messages == []
                assert [await idle(p), await idle(d)] == [IDLE, IDLE]

    run(body(), timeout=60)
