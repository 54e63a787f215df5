"""A scripted tandem.v1.Inference server on a real port, and checks that it keeps its script.

`tandem bench serve` and `tandem generate --target` are tested against it
(tests/bench/test_serve_run.py, tests/cli/test_generate_target.py): it streams a
known number of token messages with known sleeps, ends with usage and ServingInfo,
and fails the requests it is told to, so the clients' figures have exact answers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import pytest

from services.rpc.server import Servicer, client_channel, start_server
from services.rpc.tls import TlsConfig
from services.stubs.tandem.v1 import inference_pb2 as pb
from services.stubs.tandem.v1 import inference_pb2_grpc as pb_grpc

MODEL = "tandem-tiny"
VOCAB_SIZE = 1000
MAX_CONTEXT = 256


@dataclass(frozen=True)
class Failure:
    """How a scripted request fails: with ``code`` after ``after_tokens`` token messages."""

    code: grpc.StatusCode
    after_tokens: int = 0


@dataclass
class ScriptedInference(pb_grpc.InferenceServicer):
    """Streams max_tokens messages of one token each: the first after ``first_token_s``,
    the rest ``token_gap_s`` apart, then a final message (no tokens) with usage and
    ServingInfo. Requests whose id is in ``failures`` fail as scripted there."""

    first_token_s: float = 0.05
    token_gap_s: float = 0.01
    cached_tokens: int = 2
    decode_workers: tuple[str, ...] = ("decode-a", "decode-b")
    failures: dict[str, Failure] = field(default_factory=dict)
    """Keyed by request_id, or by prompt text for requests without one."""
    send_final: bool = True
    """False: end the stream OK without a final message (breaking the contract)."""
    served: dict[str, str] = field(default_factory=dict)
    """request_id → decode worker of every request that started streaming."""
    requests: list[pb.GenerateRequest] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        card = pb.ModelCard(id=MODEL, max_context_length=MAX_CONTEXT, vocab_size=VOCAB_SIZE)
        return pb.ListModelsResponse(models=[card])

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.requests.append(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            async for message in self._stream(request, context):
                yield message
        finally:
            self.in_flight -= 1

    async def _stream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        if request.model != MODEL:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not served")
        if bool(request.prompt) == bool(request.prompt_token_ids):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "exactly one of prompt, prompt_token_ids"
            )
        prompt_tokens = len(request.prompt_token_ids) or len(request.prompt.split())
        failure = self.failures.get(request.request_id or request.prompt)
        if failure and failure.after_tokens == 0:
            await context.abort(failure.code, f"scripted {failure.code.name}")
        worker = self.decode_workers[len(self.served) % len(self.decode_workers)]
        self.served[request.request_id] = worker
        count = request.max_tokens if request.HasField("max_tokens") else 16
        await asyncio.sleep(self.first_token_s)
        for i in range(count):
            if i:
                await asyncio.sleep(self.token_gap_s)
            yield pb.GenerateResponse(
                request_id=request.request_id, token_ids=[100 + i], text=f"t{i} "
            )
            if failure and i + 1 == failure.after_tokens:
                usage = pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=i + 1)
                yield pb.GenerateResponse(
                    request_id=request.request_id,
                    finish_reason=pb.FINISH_REASON_ERROR,
                    usage=usage,
                )
                await context.abort(failure.code, f"scripted {failure.code.name} mid-stream")
        if not self.send_final:
            return
        yield pb.GenerateResponse(
            request_id=request.request_id,
            finish_reason=pb.FINISH_REASON_LENGTH,
            usage=pb.Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=count,
                cached_tokens=self.cached_tokens,
            ),
            serving=pb.ServingInfo(
                prefill_worker="prefill-0",
                decode_worker=worker,
                kv_transfer_bytes=2**40,
                kv_transport="nixl",
            ),
        )


@contextmanager
def serving(servicer: ScriptedInference, tls: TlsConfig | None = None) -> Iterator[str]:
    """Serve ``servicer`` on a free port from a thread with its own event loop; yield HOST:PORT.

    A thread, so the code under test can run its own ``asyncio.run`` in the test's thread.
    ``tls``: serve TLS (mTLS with ``require_client_auth``).
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    mount = Servicer(servicer, pb_grpc.add_InferenceServicer_to_server, "tandem.v1.Inference")
    server = asyncio.run_coroutine_threadsafe(start_server([mount], tls=tls), loop).result(10)
    try:
        yield server.address
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def scripted() -> ScriptedInference:
    return ScriptedInference()


async def _collect(address: str, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    async with client_channel(address) as channel:
        return [m async for m in pb_grpc.InferenceStub(channel).Generate(request, timeout=10)]


def test_the_fake_streams_its_script(scripted: ScriptedInference) -> None:
    request = pb.GenerateRequest(model=MODEL, prompt_token_ids=[5, 6, 7], max_tokens=3)
    with serving(scripted) as address:
        messages = asyncio.run(_collect(address, request))
    assert [list(m.token_ids) for m in messages] == [[100], [101], [102], []]
    final = messages[-1]
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert final.usage == pb.Usage(prompt_tokens=3, completion_tokens=3, cached_tokens=2)
    assert final.serving.decode_worker == "decode-a"


def test_the_fake_fails_mid_stream_with_a_final_error_message() -> None:
    failing = ScriptedInference(failures={"x": Failure(grpc.StatusCode.INTERNAL, after_tokens=2)})
    request = pb.GenerateRequest(model=MODEL, prompt="a b", max_tokens=5, request_id="x")
    received: list[pb.GenerateResponse] = []

    async def collect(address: str) -> None:
        async with client_channel(address) as channel:
            async for m in pb_grpc.InferenceStub(channel).Generate(request, timeout=10):
                received.append(m)

    with serving(failing) as address, pytest.raises(grpc.aio.AioRpcError) as caught:
        asyncio.run(collect(address))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert [m.finish_reason for m in received][-1] == pb.FINISH_REASON_ERROR
    assert received[-1].usage.completion_tokens == 2
