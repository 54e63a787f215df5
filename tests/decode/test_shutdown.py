"""A decode worker frees what outlives its calls when it stops: its channels to prefill
workers are closed and the KV releases it sent in the background are finished, or, past a
short wait, cancelled (the prefill's lease then frees the blocks). Before, WorkerHost.stop
closed only the KV transport: the channels stayed open and a release in flight was left
pending, to be torn down with the event loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from services.decode import server as decode_server
from services.decode import service as decode_service
from services.decode.service import DecodeService
from services.worker.host import WorkerHost
from tests.decode.helpers import DECODE, PREFILL, decode, prefill, slow_release
from tests.router.harness import run
from tests.router.inprocess import IDLE, idle, worker

KV_TIMEOUT_MS = 200
"""The read gives up on the release's answer after this: the release goes on unanswered."""


def _record_services(monkeypatch: pytest.MonkeyPatch) -> list[DecodeService]:
    """The DecodeService of every decode worker started from now on."""
    services: list[DecodeService] = []

    class Recorded(DecodeService):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            services.append(self)

    monkeypatch.setattr(decode_server, "DecodeService", Recorded)
    return services


async def _decode_leaving_a_release(
    p: WorkerHost, d: WorkerHost, services: list[DecodeService]
) -> tuple[DecodeService, set[asyncio.Task[Any]], list[grpc.aio.Channel]]:
    """One disaggregated request on ``d`` that ends before its release is answered; then
    ``d``'s service, its releases still in flight and its channels to prefill workers."""
    stream = await decode(d, "d", await prefill(p, "p"), kv_timeout_ms=KV_TIMEOUT_MS)
    assert stream.code == grpc.StatusCode.OK, stream.details
    (service,) = services
    return service, set(service._background), list(service._channels.values())


def _assert_closed(service: DecodeService, channels: list[grpc.aio.Channel]) -> None:
    assert service._channels == {}
    assert [c.get_state() for c in channels] == [grpc.ChannelConnectivity.SHUTDOWN]
    assert service._background == set()
    assert service.rooms._task is None or service.rooms._task.done()


def test_stop_lets_a_release_in_flight_finish_and_closes_the_channels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The release answers within the shutdown's wait: stop returns with it done (OK),
    the prefill's blocks unpinned, and the channel to the prefill worker closed."""
    slow_release(monkeypatch, 0.5)
    services = _record_services(monkeypatch)

    async def body() -> None:
        async with worker(PREFILL, "p0", kv_transport="grpc") as p:
            async with worker(DECODE, "d0", kv_transport="grpc") as d:
                service, releases, channels = await _decode_leaving_a_release(p, d, services)
                assert [task.done() for task in releases] == [False]
            (release,) = releases
            assert release.done() and not release.cancelled()
            assert release.result() == grpc.StatusCode.OK
            assert await idle(p) == IDLE  # released now, not at lease end
            _assert_closed(service, channels)

    run(body(), timeout=60)


def test_stop_cancels_a_release_that_outlasts_its_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """The release is still unanswered when the shutdown's wait ends: it is cancelled (not
    left pending), stop does not wait for it, and the prefill still holds the blocks,
    which its lease will free."""
    slow_release(monkeypatch, 5.0)
    monkeypatch.setattr(decode_service, "CLOSE_WAIT_S", 0.2)
    services = _record_services(monkeypatch)

    async def body() -> None:
        async with worker(PREFILL, "p0", kv_transport="grpc") as p:
            async with worker(DECODE, "d0", kv_transport="grpc") as d:
                service, releases, channels = await _decode_leaving_a_release(p, d, services)
                start = time.monotonic()
            took = time.monotonic() - start
            (release,) = releases
            assert release.cancelled()
            assert took < 2.0, took
            assert (await idle(p)).held == 1
            _assert_closed(service, channels)
            await p.loop.call(lambda e: e.release_held("p"))

    run(body(), timeout=60)
