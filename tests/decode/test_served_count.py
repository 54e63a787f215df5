"""``tandem_decode_requests`` counts the Decode calls whose request the engine took. Before,
a call was counted before its request id was checked, so one refused because another call
was still running that id counted as served too."""

from __future__ import annotations

import grpc

from services.rpc.server import client_channel
from services.stubs.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.worker.host import WorkerHost
from tests.decode.helpers import DECODE, PROMPT
from tests.router.harness import run
from tests.router.inprocess import IDLE, generate_request, idle, read_stream, worker

MAX_TOKENS = 40
"""Long enough for the first call to be still running when the second arrives."""


def _served(host: WorkerHost, mode: str) -> float | None:
    return host.metrics.registry.get_sample_value("tandem_decode_requests_total", {"mode": mode})


def test_a_decode_refused_for_a_duplicate_request_id_is_not_counted() -> None:
    async def body() -> None:
        async with worker(DECODE, "d0") as d, client_channel(d.address) as channel:
            stub = worker_pb2_grpc.DecodeWorkerStub(channel)
            request = worker_pb2.DecodeRequest(request=generate_request(PROMPT, MAX_TOKENS, "x"))
            running = stub.Decode(request, timeout=30)
            first = await running.read()  # "x" is running, its stream registered
            duplicate = await read_stream(stub.Decode(request, timeout=30))
            assert (duplicate.code, duplicate.details) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "request_id: 'x' is already running (or still being cancelled)",
            )
            assert duplicate.messages == []
            tokens = list(first.token_ids)
            while (message := await running.read()) is not grpc.aio.EOF:
                tokens += message.token_ids
            assert await running.code() == grpc.StatusCode.OK
            assert len(tokens) == MAX_TOKENS  # undisturbed by the duplicate
            assert _served(d, "aggregated") == 1
            assert _served(d, "disaggregated") is None  # never labelled: none served
            assert await idle(d) == IDLE

    run(body(), timeout=60)
