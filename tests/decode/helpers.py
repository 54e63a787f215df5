"""Shared by the decode tests: one prompt, a prefill on a real worker, the Decode call that
hands its KV over, a slow ReleaseKV, and the wait for both pools to be idle."""

from __future__ import annotations

import asyncio

import pytest

from services.prefill.service import PrefillService
from services.rpc.server import client_channel
from services.stubs.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.worker.host import WorkerHost
from tests.router.inprocess import IDLE, Stream, generate_request, idle, read_stream

PREFILL = worker_pb2.WORKER_ROLE_PREFILL
DECODE = worker_pb2.WORKER_ROLE_DECODE
PROMPT = list(range(1, 41))
"""40 tokens: 2 full blocks of 16 and a partial one, so a handle needs 3 blocks."""
MAX_TOKENS = 6


async def prefill(host: WorkerHost, request_id: str) -> worker_pb2.PrefillResponse:
    async with client_channel(host.address) as channel:
        request = worker_pb2.PrefillRequest(
            request=generate_request(PROMPT, MAX_TOKENS, request_id)
        )
        return await worker_pb2_grpc.PrefillWorkerStub(channel).Prefill(request, timeout=30)


async def decode(
    host: WorkerHost,
    request_id: str,
    first: worker_pb2.PrefillResponse,
    kv: worker_pb2.KVHandle | None = None,
    kv_timeout_ms: int = 0,
) -> Stream:
    """Decode ``request_id`` on ``host`` from ``first``'s prefill, with its KV handle or
    ``kv``, to the end of the stream."""
    request = worker_pb2.DecodeRequest(
        request=generate_request(PROMPT, MAX_TOKENS, request_id),
        first_token_id=first.first_token_id,
        kv=first.kv if kv is None else kv,
        kv_timeout_ms=kv_timeout_ms,
    )
    async with client_channel(host.address) as channel:
        return await read_stream(
            worker_pb2_grpc.DecodeWorkerStub(channel).Decode(request, timeout=30)
        )


async def until_idle(*hosts: WorkerHost) -> None:
    """Wait (briefly) for releases sent without waiting to land, then check every host."""
    for _ in range(100):
        if all([await idle(h) == IDLE for h in hosts]):
            return
        await asyncio.sleep(0.02)
    assert [await idle(h) for h in hosts] == [IDLE] * len(hosts)


def slow_release(monkeypatch: pytest.MonkeyPatch, delay_s: float) -> None:
    """ReleaseKV answers ``delay_s`` late, as behind a long engine step (call before the
    workers start: the server binds its handlers when it mounts a servicer)."""
    release = PrefillService.ReleaseKV

    async def slow(self: PrefillService, request: object, context: object) -> object:
        await asyncio.sleep(delay_s)
        return await release(self, request, context)

    monkeypatch.setattr(PrefillService, "ReleaseKV", slow)
