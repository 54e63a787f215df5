"""A real router on port 0 with fake workers registered over its Registry RPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from services.router.admission import TokenizerCache
from services.router.config import RouterConfig
from services.router.server import Router, start_router
from services.rpc.server import client_channel
from services.stubs.tandem.v1 import inference_pb2, inference_pb2_grpc, worker_pb2
from tests.router.fakes import MODEL, Behaviour, FakeWorker

PREFILL = worker_pb2.WORKER_ROLE_PREFILL
DECODE = worker_pb2.WORKER_ROLE_DECODE

FAST = RouterConfig(
    heartbeat_interval_s=0.1,
    heartbeat_timeout_s=2.0,
    prefill_timeout_s=5.0,
    local_prefill_max_tokens=0,
)
"""Quick heartbeats, but a timeout no loaded test machine misses by accident. The tests'
prompts are short: local_prefill_max_tokens=0 keeps them disaggregated under kv-aware."""

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run one async test body with a hard limit, so a hang fails instead of blocking."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


@dataclass
class Result:
    """Everything one Generate call returned."""

    messages: list[inference_pb2.GenerateResponse] = field(default_factory=list)
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""

    @property
    def tokens(self) -> list[int]:
        return [t for m in self.messages for t in m.token_ids]

    @property
    def text(self) -> str:
        return "".join(m.text for m in self.messages)

    @property
    def finals(self) -> list[inference_pb2.GenerateResponse]:
        return [m for m in self.messages if m.finish_reason]

    @property
    def final(self) -> inference_pb2.GenerateResponse:
        assert len(self.finals) == 1 and self.messages[-1] is self.finals[0], self.messages
        return self.finals[0]


class Cluster:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.workers: dict[str, FakeWorker] = {}
        self.channel = client_channel(router.address)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)

    async def add(
        self,
        worker_id: str,
        role: int,
        behaviour: Behaviour | None = None,
        heartbeat: bool = True,
        **kwargs: Any,
    ) -> FakeWorker:
        worker = await FakeWorker(worker_id, role, behaviour, **kwargs).start()
        self.workers[worker_id] = worker
        await worker.register(self.router.address, heartbeat=heartbeat)
        return worker

    async def generate(self, timeout: float = 10.0, **fields: Any) -> Result:
        fields.setdefault("model", MODEL)
        result = Result()
        call = self.stub.Generate(inference_pb2.GenerateRequest(**fields), timeout=timeout)
        try:
            async for message in call:
                result.messages.append(message)
        except grpc.aio.AioRpcError as err:
            result.code, result.details = err.code(), err.details() or ""
        return result

    async def close(self) -> None:
        await self.channel.close()
        for worker in self.workers.values():
            await worker.stop()
        await self.router.stop(grace=0)


@asynccontextmanager
async def cluster(
    config: RouterConfig = FAST, tokenizers: TokenizerCache | None = None
) -> AsyncIterator[Cluster]:
    c = Cluster(await start_router(config, tokenizers))
    try:
        yield c
    finally:
        await c.close()
