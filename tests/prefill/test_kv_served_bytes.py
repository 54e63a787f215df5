"""A prefill worker counts the KV bytes it serves over ReadBlocks
(``tandem_kv_transfer_served_bytes``), once per read served in full; before this the
counter existed and was never incremented (0 after any number of reads)."""

from __future__ import annotations

import grpc
import pytest

from services.kv_transfer import layout as kv_layout
from services.rpc.server import client_channel
from services.stubs.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.worker.host import WorkerHost
from tests.router.harness import run
from tests.router.inprocess import generate_request, read_stream, use_tiny_model, worker

PREFILL = worker_pb2.WORKER_ROLE_PREFILL
DECODE = worker_pb2.WORKER_ROLE_DECODE
PROMPT = list(range(1, 41))
"""40 tokens: 3 blocks of 16 to read."""


@pytest.fixture(autouse=True)
def _tiny(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    use_tiny_model(monkeypatch, tmp_path_factory)


def _counter(host: WorkerHost, name: str) -> float:
    return host.metrics.registry.get_sample_value(f"{name}_total") or 0.0


def _block_bytes(host: WorkerHost) -> int:
    engine = host.engine
    return kv_layout.block_bytes(kv_layout.describe(engine.runner.kv_cache, engine.model_id))


def test_bytes_served_over_read_blocks_equal_the_bytes_the_decode_worker_received() -> None:
    async def body() -> None:
        async with (
            worker(PREFILL, "p0", kv_transport="grpc") as p,
            worker(DECODE, "d0", kv_transport="grpc") as d,
        ):
            async with client_channel(p.address) as channel:
                first = await worker_pb2_grpc.PrefillWorkerStub(channel).Prefill(
                    worker_pb2.PrefillRequest(request=generate_request(PROMPT, 3, "r")),
                    timeout=30,
                )
                # A read of a block the request does not hold is refused: nothing served.
                stub = worker_pb2_grpc.KVTransferStub(channel)
                bad = worker_pb2.ReadBlocksRequest(request_id="r", block_ids=[63])
                with pytest.raises(grpc.aio.AioRpcError):
                    async for _ in stub.ReadBlocks(bad, timeout=5):
                        pass
            async with client_channel(d.address) as channel:
                request = worker_pb2.DecodeRequest(
                    request=generate_request(PROMPT, 3, "r"),
                    first_token_id=first.first_token_id,
                    kv=first.kv,
                )
                stream = await read_stream(
                    worker_pb2_grpc.DecodeWorkerStub(channel).Decode(request, timeout=30)
                )
            assert stream.code == grpc.StatusCode.OK, stream.details
            assert stream.messages[-1].serving.kv_transfer_bytes == 3 * _block_bytes(p)
            received = _counter(d, "tandem_kv_transfer_received_bytes")
            assert received == 3 * _block_bytes(p)
            assert _counter(p, "tandem_kv_transfer_served_bytes") == received

    run(body(), timeout=60)
