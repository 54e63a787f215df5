"""A gateway sent SIGTERM (``Gateway.stop()``) drains: new calls are refused, the streams
in flight run to their end and are metered, and an idle gateway stops at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import aiohttp
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


async def _open_sse(
    session: aiohttp.ClientSession, port: int, credential: str
) -> tuple[aiohttp.ClientResponse, list[dict]]:
    """A streamed /v1/completions of 30 tokens through the HTTP API, its first chunk read."""
    response = await session.post(
        f"http://127.0.0.1:{port}/v1/completions",
        json={"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 30, "stream": True},
        headers={"authorization": f"Bearer {credential}"},
    )
    assert response.status == 200
    chunks: list[dict] = []
    await _read_sse(response, chunks, until=1)
    return response, chunks


async def _read_sse(response: aiohttp.ClientResponse, chunks: list[dict], until: int) -> bool:
    """Read SSE events into ``chunks`` until ``until`` are in or the stream ends; True
    when it ended with ``[DONE]``."""
    with contextlib.suppress(aiohttp.ClientError):
        async for line in response.content:
            data = line.decode().strip().removeprefix("data: ")
            if data == "[DONE]":
                return True
            if data:
                chunks.append(json.loads(data))
            if len(chunks) >= until:
                return False
    return False


def test_a_second_signal_cuts_the_drain_and_every_cut_call_is_metered(
    tmp_path: Path, issuer: Issuer
) -> None:
    """``stop(interrupt=...)``, as ``tandem gateway`` calls it: once the interrupt is set
    (a second SIGTERM) the gRPC and HTTP streams still running are cut at once instead of
    after the 25 s drain, each charged exactly the tokens its client received."""

    async def body() -> None:
        store = f"sqlite:{tmp_path / 'gw.db'}"
        async with stack(tmp_path, store, issuer.url, workers=SLOW, http=True) as s:
            credential = token(issuer)
            grpc_call = asyncio.create_task(
                s.generate(credential, prompt_token_ids=[5, 6, 7], max_tokens=30)
            )
            async with aiohttp.ClientSession() as session:
                response, chunks = await _open_sse(session, s.gateway.http_port, credential)
                await asyncio.sleep(0.3)  # a few tokens into both
                interrupt = asyncio.Event()
                stopping = asyncio.create_task(s.gateway.stop(interrupt=interrupt))
                await asyncio.sleep(0.2)
                assert not stopping.done() and not grpc_call.done()  # draining
                started = time.monotonic()
                interrupt.set()
                finished = await _read_sse(response, chunks, until=10_000)
                reply = await grpc_call
                await stopping
            assert time.monotonic() - started < 3
            assert not finished and len(chunks) < 30  # cut, and no [DONE] to say otherwise
            assert reply.code != grpc.StatusCode.OK and 0 < reply.tokens < 30
            http_id = response.headers["x-request-id"]
            with open_store(store) as reopened:  # stop() wrote the rows, then closed its store
                ledger = Ledger(reopened, metrics=None)
                grpc_row, http_row = ledger.get(reply.request_id), ledger.get(http_id)
            assert (grpc_row.completion_tokens, grpc_row.outcome) == (reply.tokens, "cancelled")
            sent = sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"])
            assert (http_row.completion_tokens, http_row.outcome) == (sent, "cancelled")

    run(body(), timeout=30)
