"""The gateway relays at most ``max_streams`` Generate streams at once, gRPC and HTTP
together: one more is refused UNAVAILABLE with RetryInfo (HTTP 503 + Retry-After) and
audited, and every way a stream ends gives its slot back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.gateway.metrics import METRICS
from services.gateway.pipeline import AT_CAPACITY
from services.stubs.tandem.v1 import inference_pb2
from tests.gateway.harness import PAUSE, stack, token, until
from tests.gateway.issuer import Issuer
from tests.router.fakes import MODEL
from tests.router.harness import run


def _streams() -> float:
    return METRICS.value("tandem_gateway_streams")


def test_a_stream_past_the_cap_is_unavailable_with_retry_info_and_audited(
    tmp_path: Path, issuer: Issuer
) -> None:
    async def body() -> None:
        async with stack(tmp_path, f"sqlite:{tmp_path / 'gw.db'}", issuer.url, http=True) as s:
            pipeline = s.gateway.service.pipeline
            pipeline.max_streams = 2
            base = _streams()
            held = [
                asyncio.ensure_future(s.generate(token(issuer), prompt_token_ids=[PAUSE + 1]))
                for _ in range(2)
            ]  # each streams two tokens, then waits until cancelled
            await until(lambda: pipeline.streams == 2)
            assert _streams() == base + 2

            call = s.stubs[0].Generate(
                _request(), metadata=(("authorization", f"Bearer {token(issuer)}"),), timeout=5
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # a call ending OK fails
                async for _ in call:
                    raise AssertionError("a stream past the cap was relayed")
            error = refused.value
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "maximum of 2 streams" in (error.details() or "")
            status = rpc_status.from_call(error)
            assert status is not None
            retry = error_details_pb2.RetryInfo()
            assert any(d.Unpack(retry) for d in status.details)
            assert retry.retry_delay.seconds == 1

            url = f"http://127.0.0.1:{s.gateway.http_port}/v1/completions"
            headers = {"Authorization": f"Bearer {token(issuer)}"}
            payload = {"model": MODEL, "prompt": [1, 2], "max_tokens": 2}
            async with (
                aiohttp.ClientSession() as session,
                session.post(url, json=payload, headers=headers) as answer,
            ):
                assert (answer.status, answer.headers["Retry-After"]) == (503, "1")
                assert (await answer.json())["error"]["code"] == "service_unavailable"

            for waiting in held:
                waiting.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            await until(lambda: pipeline.streams == 0)
            assert _streams() == base

            reply = await s.generate(token(issuer), prompt_token_ids=[1, 2], max_tokens=2)
            assert reply.code == grpc.StatusCode.OK  # the slots came back
            s.settled()
            refusals = [e for e in s.audit() if e.reason == AT_CAPACITY]
            assert [(e.decision, e.principal) for e in refusals] == [("deny", "ann")] * 2
            assert (
                METRICS.value(
                    "tandem_gateway_decisions_total",
                    team="ml",
                    model="-",
                    decision="deny",
                    reason="at_capacity",
                )
                >= 2
            )

    run(body())


def test_refused_and_failed_streams_give_their_slot_back(tmp_path: Path, issuer: Issuer) -> None:
    async def body() -> None:
        async with stack(tmp_path, f"sqlite:{tmp_path / 'gw.db'}", issuer.url) as s:
            pipeline = s.gateway.service.pipeline
            pipeline.max_streams = 1
            refused = await s.generate(token(issuer), model="not-allowed", prompt_token_ids=[1])
            assert refused.code == grpc.StatusCode.PERMISSION_DENIED
            cancelled = await s.generate(
                token(issuer), prompt_token_ids=[PAUSE + 3], cancel_after=2
            )
            assert cancelled.code == grpc.StatusCode.CANCELLED
            await until(lambda: pipeline.streams == 0)
            served = await s.generate(token(issuer), prompt_token_ids=[1, 2], max_tokens=2)
            assert served.code == grpc.StatusCode.OK

    run(body())


def _request() -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(model=MODEL, prompt_token_ids=[1, 2], max_tokens=2)
