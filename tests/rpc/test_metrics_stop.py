"""A service's /metrics stops with it: the router and a worker (a Ray actor runs one in a
process that outlives it) left the port bound and answering after stop, so the same
process could not start another on it."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

import pytest

from services.launcher.local import free_port
from services.router.config import RouterConfig
from services.router.server import start_router
from services.stubs.tandem.v1 import worker_pb2
from tests.router.inprocess import worker


def _scrape(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
        return reply.status


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _assert_closed(port: int) -> None:
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        _scrape(port)
    assert _bindable(port)


def test_the_routers_metrics_stop_with_it() -> None:
    port = free_port()

    async def body() -> None:
        router = await start_router(RouterConfig(metrics_port=port))
        assert await asyncio.to_thread(_scrape, port) == 200
        await router.stop(grace=0)

    asyncio.run(body())
    _assert_closed(port)


def test_a_workers_metrics_stop_with_it() -> None:
    port = free_port()

    async def body() -> None:
        async with worker(worker_pb2.WORKER_ROLE_DECODE, "d0", metrics_port=port):
            assert await asyncio.to_thread(_scrape, port) == 200

    asyncio.run(body())
    _assert_closed(port)
