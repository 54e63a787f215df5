"""A gateway sent SIGTERM (``Gateway.stop()``) drains: new calls are refused, the streams
in flight run to their end and are metered, and an idle gateway stops at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from services.gateway.ledger import Ledger
from services.gateway.store import open_store
from services.stubs.tandem.v1 import inference_pb2
from tests.gateway.harness import DECODE, MODEL, PREFILL, Spec, stack, token
from tests.gateway.issuer import Issuer
from tests.router.fakes import Behaviour
from tests.router.harness import run

SLOW = (
    Spec("p1", PREFILL),
    Spec("d1", DECODE, behaviour=Behaviour(token_interval_s=0.05)),
)
"""A decode worker streaming 20 tokens a second: a 30-token stream runs ~1.5 s."""


def test_a_draining_gateway_finishes_its_streams_and_refuses_new_calls(
    tmp_path: Path, issuer: Issuer
) -> None:
    async def body() -> None:
        store = f"sqlite:{tmp_path / 'gw.db'}"
        async with stack(tmp_path, store, issuer.url, workers=SLOW) as s:
            credential = token(issuer)
            running = asyncio.create_task(
                s.generate(credential, prompt_token_ids=[5, 6, 7], max_tokens=30)
            )
            await asyncio.sleep(0.3)  # a few tokens in
            assert not running.done()
            started = time.monotonic()
            stopping = asyncio.create_task(s.gateway.stop())  # the drain timeout: 25 s
            await asyncio.sleep(0.1)
            # Refused by the server before any gateway code runs: no id, nothing metered.
            late = s.stubs[0].Generate(
                inference_pb2.GenerateRequest(model=MODEL, prompt_token_ids=[1, 2]),
                metadata=(("authorization", f"Bearer {credential}"),),
                timeout=5,
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await late.read()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            reply = await running
            assert reply.code == grpc.StatusCode.OK and reply.tokens == 30
            assert reply.final is not None and reply.final.usage.completion_tokens == 30
            await stopping
            assert time.monotonic() - started < 5  # it waited for the stream, not the timeout
            with open_store(store) as reopened:  # stop() wrote the row, then closed its store
                row = Ledger(reopened, metrics=None).get(reply.request_id)
            assert (row.completion_tokens, row.outcome) == (30, "ok")

    run(body(), timeout=30)


def test_an_idle_gateway_stops_at_once(tmp_path: Path, issuer: Issuer) -> None:
    async def body() -> None:
        async with stack(tmp_path, f"sqlite:{tmp_path / 'gw.db'}", issuer.url) as s:
            done = await s.generate(token(issuer), prompt_token_ids=[5, 6], max_tokens=2)
            assert done.code == grpc.StatusCode.OK
            started = time.monotonic()
            await s.gateway.stop()
            assert time.monotonic() - started < 2

    run(body(), timeout=30)
