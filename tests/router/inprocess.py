"""Real tandem-tiny workers (CPU, float32) in the test's own process and event loop.

For tests that need the real engine's blocks and tokens behind a prefill or decode worker:
``tiny_home()`` builds the model once per test session, ``start_worker()`` starts a
WorkerHost on port 0 (registered with a router when one is given), ``idle()`` reads the
figures that must be back to their idle values once a test's requests are done.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from services.decode import server as decode_server
from services.engine.engine import EngineConfig, LLMEngine
from services.engine.sampling_params import SamplingParams
from services.engine.tiny import ensure_tiny_model
from services.prefill import server as prefill_server
from services.stubs.tandem.v1 import inference_pb2, worker_pb2
from services.worker.host import WorkerConfig, WorkerHost

MODEL = "tandem-tiny"
BLOCK_SIZE = 16
ENGINE = EngineConfig(dtype="float32", device="cpu", num_blocks=64, block_size=BLOCK_SIZE)
"""float32: greedy tokens must equal the offline reference's exactly."""


def use_tiny_model(monkeypatch: pytest.MonkeyPatch, factory: pytest.TempPathFactory) -> None:
    """Point TANDEM_HOME at a private cache holding tandem-tiny (built once per session)."""
    home = factory.getbasetemp() / "tandem-home"
    ensure_tiny_model(home / "models")
    monkeypatch.setenv("TANDEM_HOME", str(home))


def reference_tokens(prompt: Sequence[int], max_tokens: int) -> list[int]:
    """What an offline engine generates greedily for ``prompt`` (the exact expectation)."""
    return list(_reference(tuple(prompt), max_tokens))


@functools.cache
def _reference(prompt: tuple[int, ...], max_tokens: int) -> tuple[int, ...]:
    engine = LLMEngine(MODEL, ENGINE)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return engine.generate([list(prompt)], params)[0].token_ids


@asynccontextmanager
async def worker(
    role: int, worker_id: str, engine: EngineConfig = ENGINE, **config: Any
) -> AsyncIterator[WorkerHost]:
    """A started worker of ``role`` (``config``: WorkerConfig fields), stopped on exit."""
    host = WorkerHost(WorkerConfig(model=MODEL, worker_id=worker_id, engine=engine, **config), role)
    servicers = (
        prefill_server._servicers
        if role == worker_pb2.WORKER_ROLE_PREFILL
        else decode_server._servicers
    )
    await host.start(servicers)
    try:
        yield host
    finally:
        await host.stop()


@dataclass(frozen=True)
class Idle:
    """A worker's figures that every finished request must leave as they were."""

    free_blocks: int
    held: int
    requests: int


async def idle(host: WorkerHost) -> Idle:
    return await host.loop.call(lambda e: Idle(e.pool.num_free_blocks, e.num_held, e.num_requests))


IDLE = Idle(free_blocks=ENGINE.num_blocks, held=0, requests=0)
"""A worker with ENGINE's pool and nothing running or pinned (nothing cached counts as free)."""


def generate_request(
    prompt: list[int], max_tokens: int, request_id: str
) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=MODEL,
        prompt_token_ids=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
        request_id=request_id,
    )


@dataclass
class Stream:
    """Everything one Decode call returned."""

    messages: list[inference_pb2.GenerateResponse]
    code: grpc.StatusCode
    details: str

    @property
    def tokens(self) -> list[int]:
        return [t for m in self.messages for t in m.token_ids]


async def read_stream(call: grpc.aio.UnaryStreamCall) -> Stream:
    messages: list[inference_pb2.GenerateResponse] = []
    try:
        async for message in call:
            messages.append(message)
    except grpc.aio.AioRpcError as err:
        return Stream(messages, err.code(), err.details() or "")
    return Stream(messages, grpc.StatusCode.OK, "")
