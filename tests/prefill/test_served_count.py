"""``tandem_prefill_requests`` counts Prefill calls answered with a first token, and no
call that ends in an error. Before, a call aborted because its lease had expired by the
time it was answered ("lease ... expired at once") was counted as served."""

from __future__ import annotations

import grpc
import pytest

from services.rpc.server import client_channel
from services.stubs.tandem.v1 import inference_pb2, worker_pb2, worker_pb2_grpc
from services.worker.host import WorkerHost
from tests.router.harness import run
from tests.router.inprocess import IDLE, generate_request, idle, use_tiny_model, worker

PREFILL = worker_pb2.WORKER_ROLE_PREFILL
PROMPT = list(range(1, 41))


@pytest.fixture(autouse=True)
def _tiny(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    use_tiny_model(monkeypatch, tmp_path_factory)


def _served(host: WorkerHost) -> float:
    return host.metrics.registry.get_sample_value("tandem_prefill_requests_total")


async def _prefill(
    host: WorkerHost, request_id: str, max_tokens: int
) -> worker_pb2.PrefillResponse:
    request = worker_pb2.PrefillRequest(request=generate_request(PROMPT, max_tokens, request_id))
    async with client_channel(host.address) as channel:
        return await worker_pb2_grpc.PrefillWorkerStub(channel).Prefill(request, timeout=30)


def test_a_prefill_whose_lease_expired_at_once_is_not_counted() -> None:
    """A lease of 0 s has always run out by the answer: UNAVAILABLE, uncounted. A prompt
    that finishes at its first token pins nothing and is answered: counted."""

    async def body() -> None:
        async with worker(PREFILL, "p0", lease_s=0.0) as p:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _prefill(p, "r", 4)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert info.value.details() == "lease of r expired at once"
            assert _served(p) == 0
            response = await _prefill(p, "one", 1)
            assert response.finish_reason == inference_pb2.FINISH_REASON_LENGTH
            assert not response.HasField("kv")
            assert _served(p) == 1
            await p.loop.call(lambda e: e.expire_held())
            assert await idle(p) == IDLE

    run(body(), timeout=60)
