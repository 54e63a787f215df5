"""Join the router and keep telling it this worker's load.

Registration is retried until the router answers (workers may start first);
heartbeats follow at the interval the router asks for. A NOT_FOUND heartbeat
means the router dropped this worker (it restarted, or we were too slow):
register again. Every call has a deadline, so a hung router never hangs us.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

from services.rpc.server import client_channel
from services.rpc.tls import TlsConfig
from services.stubs.tandem.v1 import worker_pb2 as wpb
from services.stubs.tandem.v1 import worker_pb2_grpc

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 5.0
RETRY_S = 0.5


async def register_and_heartbeat(
    router: str,
    registration: wpb.RegisterRequest,
    load: Callable[[], Awaitable[wpb.WorkerLoad]],
    stop: asyncio.Event,
    tls: TlsConfig | None = None,
) -> None:
    """Run until ``stop`` is set. A refusal (FAILED_PRECONDITION) is raised: the
    worker cannot serve with the others and must not keep trying. ``tls``: dial the
    router with this identity and CA (None: plaintext)."""
    async with client_channel(router, tls=tls) as channel:
        stub = worker_pb2_grpc.RegistryStub(channel)
        while not stop.is_set():
            interval = await _register(stub, registration, stop)
            if interval is None:
                return
            await _heartbeat_until_dropped(stub, registration.worker_id, load, interval, stop)


async def _register(
    stub: worker_pb2_grpc.RegistryStub, registration: wpb.RegisterRequest, stop: asyncio.Event
) -> float | None:
    while not stop.is_set():
        try:
            reply = await stub.Register(registration, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise
            log.info("router not reachable yet (%s); retrying", e.code().name)
            await _sleep(stop, RETRY_S)
            continue
        log.info("registered with the router as %s", registration.worker_id)
        return max(reply.heartbeat_interval_ms, 50) / 1000
    return None


async def _heartbeat_until_dropped(
    stub: worker_pb2_grpc.RegistryStub,
    worker_id: str,
    load: Callable[[], Awaitable[wpb.WorkerLoad]],
    interval: float,
    stop: asyncio.Event,
) -> None:
    while not await _sleep(stop, interval):
        try:
            beat = wpb.HeartbeatRequest(worker_id=worker_id, load=await load())
            await stub.Heartbeat(beat, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                log.warning("the router forgot this worker; registering again")
                return
            log.warning("heartbeat failed (%s); will retry", e.code().name)


async def _sleep(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep, waking early on stop; True when stopping."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
