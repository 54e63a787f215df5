"""WorkerHost.on_stop: what a servicer holds beyond its calls is closed at stop, once the
server runs no calls and before the engine loop and the KV transport go; one closer that
fails does not keep the others, or the transport, from closing."""

from __future__ import annotations

import grpc
import pytest

from services.rpc.server import client_channel
from services.stubs.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.worker.host import WorkerHost
from tests.router.harness import run
from tests.router.inprocess import generate_request, use_tiny_model, worker

DECODE = worker_pb2.WORKER_ROLE_DECODE


@pytest.fixture(autouse=True)
def _tiny(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    use_tiny_model(monkeypatch, tmp_path_factory)


async def _decode_code(address: str) -> grpc.StatusCode:
    request = worker_pb2.DecodeRequest(request=generate_request([1, 2, 3], 1, "late"))
    async with client_channel(address) as channel:
        try:
            async for _ in worker_pb2_grpc.DecodeWorkerStub(channel).Decode(request, timeout=2):
                pass
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_closers_run_between_the_server_stop_and_the_transport_close() -> None:
    events: list[str] = []

    async def body() -> None:
        async with worker(DECODE, "d0", kv_transport="grpc") as d:
            address = d.address
            transport_close = d.transport.close

            async def close_transport() -> None:
                events.append("transport")
                await transport_close()

            d.transport.close = close_transport  # type: ignore[method-assign]

            async def first(host: WorkerHost = d) -> None:
                # The server takes no call any more; the engine loop still answers.
                events.append(f"first: {(await _decode_code(address)).name}")
                events.append(f"engine: {await host.loop.call(lambda e: e.num_requests)}")

            async def failing() -> None:
                events.append("failing")
                raise RuntimeError("a closer that fails")

            d.on_stop(first)
            d.on_stop(failing)  # registered last: closes first
        assert events == ["failing", "first: UNAVAILABLE", "engine: 0", "transport"]

    run(body(), timeout=60)
