"""A decode worker does not wait past its KV timeout for the prefill's answer to the
release after a read (a prefill worker answers ReleaseKV between engine steps, so late
when a step is long). Before, it waited the release's own 5 s: with kv_timeout_ms=500 a
request started decoding 5.07 s after it arrived. Unanswered by the deadline, the read is
not trusted (the blocks may have been reused): the prompt is prefilled locally."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from services.prefill.service import PrefillService
from services.rpc.server import client_channel
from services.stubs.tandem.v1 import worker_pb2, worker_pb2_grpc
from tests.decode.test_bad_kv_handle import MAX_TOKENS, PROMPT, _prefill, _until_idle
from tests.router.harness import run
from tests.router.inprocess import (
    generate_request,
    read_stream,
    reference_tokens,
    use_tiny_model,
    worker,
)

PREFILL = worker_pb2.WORKER_ROLE_PREFILL
DECODE = worker_pb2.WORKER_ROLE_DECODE
KV_TIMEOUT_MS = 300
RELEASE_DELAY_S = 1.5


@pytest.fixture(autouse=True)
def _tiny(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    use_tiny_model(monkeypatch, tmp_path_factory)


def slow_release(monkeypatch: pytest.MonkeyPatch, delay_s: float) -> None:
    """ReleaseKV answers ``delay_s`` late, as behind a long engine step (call before the
    workers start: the server binds its handlers when it mounts a servicer)."""
    release = PrefillService.ReleaseKV

    async def slow(self: PrefillService, request: object, context: object) -> object:
        await asyncio.sleep(delay_s)
        return await release(self, request, context)

    monkeypatch.setattr(PrefillService, "ReleaseKV", slow)


def test_a_slow_release_answer_does_not_hold_the_request_past_its_kv_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The read is dropped for a local prefill (the reference's tokens, no transfer
    reported), the stream ends well before the release answers, and the release still
    lands: both pools idle."""
    expected = reference_tokens(PROMPT, MAX_TOKENS)
    slow_release(monkeypatch, RELEASE_DELAY_S)

    async def body() -> None:
        async with (
            worker(PREFILL, "p0", kv_transport="grpc") as p,
            worker(DECODE, "d0", kv_transport="grpc") as d,
        ):
            first = await _prefill(p, "p")
            request = worker_pb2.DecodeRequest(
                request=generate_request(PROMPT, MAX_TOKENS, "d"),
                first_token_id=first.first_token_id,
                kv=first.kv,
                kv_timeout_ms=KV_TIMEOUT_MS,
            )
            start = time.monotonic()
            async with client_channel(d.address) as channel:
                stream = await read_stream(
                    worker_pb2_grpc.DecodeWorkerStub(channel).Decode(request, timeout=30)
                )
            took = time.monotonic() - start
            assert stream.code == grpc.StatusCode.OK, stream.details
            assert [first.first_token_id, *stream.tokens] == expected
            serving = stream.messages[-1].serving
            assert (serving.kv_transfer_bytes, serving.kv_transport) == (0, "")  # not trusted
            assert took < RELEASE_DELAY_S - 0.5, took
            await asyncio.sleep(RELEASE_DELAY_S - took)
            await _until_idle(p, d)

    run(body(), timeout=60)
