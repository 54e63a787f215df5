"""register_and_heartbeat against a real router that goes away and comes back."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from services.launcher.local import free_port
from services.router.config import RouterConfig
from services.router.server import Router, start_router
from services.stubs.tandem.v1 import worker_pb2
from services.worker.registration import register_and_heartbeat
from tests.router.harness import run
from tests.router.test_registry import DECODE, MODEL, registration

OUTAGE_S = 6.0


async def _load() -> worker_pb2.WorkerLoad:
    return worker_pb2.WorkerLoad()


async def _registered(router: Router, worker_id: str, within_s: float) -> float:
    """Seconds until the router lists ``worker_id`` (AssertionError after ``within_s``)."""
    start = time.monotonic()
    while router.registry.get(worker_id) is None:
        assert time.monotonic() - start < within_s, f"{worker_id} not registered in {within_s} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def _count_connections(port: int, seconds: float) -> int:
    """Hold ``port`` for ``seconds`` as a peer that is down (accept, close) and count the
    connection attempts that reached it."""
    attempts = 0

    def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.close()

    listener = await asyncio.start_server(refuse, "127.0.0.1", port)
    await asyncio.sleep(seconds)
    listener.close()
    await listener.wait_closed()
    return attempts


def test_a_worker_is_back_within_seconds_of_its_routers_return() -> None:
    """gRPC's default reconnect backoff (1 s x 1.6 up to 120 s) would find the router up to
    minutes late; Tandem's channels retry at least once a second (RECONNECT_OPTIONS)."""

    async def body() -> None:
        config = RouterConfig(port=free_port(), heartbeat_interval_s=0.2)
        router = await start_router(config)
        stop = asyncio.Event()
        worker = asyncio.create_task(
            register_and_heartbeat(router.address, registration("d1"), _load, stop)
        )
        try:
            await _registered(router, "d1", within_s=5.0)
            await router.stop(grace=0)
            attempts = await _count_connections(config.port, OUTAGE_S)
            # 1 s apart at most: >= 6 in 6 s; gRPC's defaults make ~3 (at 1, 2.6, 5.2 s)
            assert attempts >= 6, attempts
            router = await start_router(config)
            assert await _registered(router, "d1", within_s=2.5) < 2.5
        finally:
            stop.set()
            await worker
            await router.stop(grace=0)

    run(body(), timeout=30)


def test_draining_reaches_the_router_at_once_and_the_worker_never_re_registers() -> None:
    """Heartbeats come every 2 s here: the draining one must not wait for the next."""

    async def body() -> None:
        config = RouterConfig(port=free_port(), heartbeat_interval_s=2.0)
        router = await start_router(config)
        stop, draining = asyncio.Event(), asyncio.Event()
        worker = asyncio.create_task(
            register_and_heartbeat(
                router.address, registration("d1"), _load, stop, draining=draining
            )
        )
        try:
            await _registered(router, "d1", within_s=5.0)
            entry = router.registry.get("d1")
            draining.set()
            start = time.monotonic()
            while not entry.draining:
                assert time.monotonic() - start < 1.0, "the draining heartbeat waited"
                await asyncio.sleep(0.01)
            assert router.registry.candidates(MODEL, DECODE) == []
            # A restarted router does not know it: a serving worker would register again,
            # a draining one takes NOT_FOUND as the end of its registration.
            await router.stop(grace=0)
            router = await start_router(config)
            await asyncio.wait_for(worker, 10.0)
            assert router.registry.get("d1") is None and not stop.is_set()
        finally:
            stop.set()
            await asyncio.gather(worker, return_exceptions=True)
            await router.stop(grace=0)

    run(body(), timeout=30)


def test_a_process_replaced_under_its_worker_id_stops_instead_of_taking_it_back() -> None:
    """Two live processes under one --worker-id: the later registration holds the entry;
    the earlier one's heartbeat is refused and its registration ends with the error (the
    worker stops, naming the cause) rather than registering again, which would leave the
    two evicting each other for as long as both live."""

    async def body() -> None:
        router = await start_router(RouterConfig(port=free_port(), heartbeat_interval_s=0.1))
        stop = asyncio.Event()
        first, second = registration("d1", address="127.0.0.1:1"), registration("d1")
        first.instance, second.instance = "a" * 32, "b" * 32
        second.address = "127.0.0.1:2"
        old = asyncio.create_task(register_and_heartbeat(router.address, first, _load, stop))
        new = None
        try:
            await _registered(router, "d1", within_s=5.0)
            new = asyncio.create_task(register_and_heartbeat(router.address, second, _load, stop))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await asyncio.wait_for(old, 5.0)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--worker-id" in refused.value.details()
            await asyncio.sleep(0.5)  # five of its heartbeat intervals: nothing flips back
            entry = router.registry.get("d1")
            assert (entry.address, entry.instance, new.done()) == ("127.0.0.1:2", "b" * 32, False)
        finally:
            stop.set()
            await asyncio.gather(old, *([new] if new else []), return_exceptions=True)
            await router.stop(grace=0)

    run(body(), timeout=30)
