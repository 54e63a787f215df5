"""A prefill worker pins a prompt's KV for at most its own lease (``--lease-s``): a
PrefillRequest asking for longer (lease_ms allows some 49 days) is cut to it, so a caller
cannot hold a worker's pool past what its operator set. Before, the lease asked for was
granted whatever its length."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.rpc.server import client_channel
from services.stubs.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.worker.host import WorkerHost
from tests.router.harness import run
from tests.router.inprocess import generate_request, idle, use_tiny_model, worker

PREFILL = worker_pb2.WORKER_ROLE_PREFILL
PROMPT = list(range(1, 41))
LEASE_S = 0.5
"""The worker's lease, and so the longest it grants."""
DAY_MS = 24 * 3600 * 1000


@pytest.fixture(autouse=True)
def _tiny(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    use_tiny_model(monkeypatch, tmp_path_factory)


async def _prefill(host: WorkerHost, request_id: str, lease_ms: int) -> worker_pb2.KVHandle:
    request = worker_pb2.PrefillRequest(
        request=generate_request(PROMPT, 4, request_id), lease_ms=lease_ms
    )
    async with client_channel(host.address) as channel:
        response = await worker_pb2_grpc.PrefillWorkerStub(channel).Prefill(request, timeout=30)
    return response.kv


async def _held(host: WorkerHost, request_id: str) -> float | None:
    """Seconds left on ``request_id``'s lease; None once it is released."""
    held = await host.loop.call(lambda e: e.held(request_id))
    return None if held is None else held.expires_at - time.monotonic()


def test_a_lease_longer_than_the_workers_is_cut_to_it_and_expires_then() -> None:
    async def body() -> None:
        async with worker(PREFILL, "p0", lease_s=LEASE_S) as p:
            kv = await _prefill(p, "long", 30 * DAY_MS)
            start = time.monotonic()
            assert 0 < kv.lease_ms <= LEASE_S * 1000
            left = await _held(p, "long")
            assert left is not None and 0 < left <= LEASE_S
            while await _held(p, "long") is not None:  # released by the lease-expiry tick
                assert time.monotonic() - start < LEASE_S + 1.0, "the lease did not expire"
                await asyncio.sleep(0.02)
            assert p.metrics.lease_expiries._value.get() == 1
            assert (await idle(p)).held == 0

    run(body(), timeout=60)


def test_a_lease_shorter_than_the_workers_is_kept() -> None:
    async def body() -> None:
        async with worker(PREFILL, "p0", lease_s=LEASE_S) as p:
            kv = await _prefill(p, "short", 200)
            assert 0 < kv.lease_ms <= 200
            left = await _held(p, "short")
            assert left is not None and 0 < left <= 0.2
            kv = await _prefill(p, "default", 0)  # none asked for: the worker's own
            assert LEASE_S * 1000 / 2 < kv.lease_ms <= LEASE_S * 1000

    run(body(), timeout=60)
