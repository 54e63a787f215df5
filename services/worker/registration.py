"""Join the router and keep telling it this worker's load.

Registration is retried until the router answers (workers may start first);
heartbeats follow at the interval the router asks for. A NOT_FOUND heartbeat
means the router dropped this worker (it restarted, or we were too slow):
register again. Every call has a deadline, so a hung router never hangs us.

A FAILED_PRECONDITION heartbeat means another process registered under this worker's
id and replaced it (RegisterRequest.instance): this process stops rather than register
again and take the id back, which would leave two processes evicting each other.

Once the worker begins to drain (``draining`` set), a heartbeat goes out at once
with the flag so the router stops placing requests here; from then on the
worker never registers again (the router forgetting it is what it wants).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

from services.rpc.server import client_channel
from services.rpc.shutdown import first_of
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
    draining: asyncio.Event | None = None,
) -> None:
    """Run until ``stop`` is set, or until the router forgets a draining worker. A refusal
    (FAILED_PRECONDITION) is raised: the worker cannot serve with the others and must not
    keep trying. ``tls``: dial the router with this identity and CA (None: plaintext).
    ``draining``: set when the worker begins to shut down gracefully."""
    draining = draining if draining is not None else asyncio.Event()
    async with client_channel(router, tls=tls) as channel:
        stub = worker_pb2_grpc.RegistryStub(channel)
        beats = _Heartbeats(stub, registration, load, stop, draining)
        while not stop.is_set() and not draining.is_set():
            interval = await _register(stub, registration, stop)
            if interval is None:
                return
            await beats.until_dropped(interval)


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
            await sleep_or_stop(stop, RETRY_S)
            continue
        log.info("registered with the router as %s", registration.worker_id)
        return max(reply.heartbeat_interval_ms, 50) / 1000
    return None


class _Heartbeats:
    def __init__(
        self,
        stub: worker_pb2_grpc.RegistryStub,
        registration: wpb.RegisterRequest,
        load: Callable[[], Awaitable[wpb.WorkerLoad]],
        stop: asyncio.Event,
        draining: asyncio.Event,
    ) -> None:
        self.stub = stub
        self.worker_id = registration.worker_id
        self.instance = registration.instance
        self.load = load
        self.stop = stop
        self.draining = draining
        self.told_draining = False

    async def until_dropped(self, interval: float) -> None:
        """Heartbeat every ``interval`` s (at once when draining begins) until the router
        forgets this worker or ``stop`` is set. Raises the router's FAILED_PRECONDITION:
        another process took this worker's id."""
        while not await self._wait(interval):
            try:
                await self._beat()
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    if not self.draining.is_set():
                        log.warning("the router forgot this worker; registering again")
                    return
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                log.warning("heartbeat failed (%s); will retry", e.code().name)

    async def _beat(self) -> None:
        draining = self.draining.is_set()
        beat = wpb.HeartbeatRequest(
            worker_id=self.worker_id,
            load=await self.load(),
            draining=draining,
            instance=self.instance,
        )
        await self.stub.Heartbeat(beat, timeout=CALL_TIMEOUT_S)
        if draining and not self.told_draining:
            self.told_draining = True
            log.info("draining: the router sends no new requests here")

    async def _wait(self, interval: float) -> bool:
        """Sleep ``interval`` s, waking early on stop and when draining begins (the router
        must hear of it at once); True when stopping."""
        events = [self.stop] if self.draining.is_set() else [self.stop, self.draining]
        await first_of(*(event.wait() for event in events), timeout=interval)
        return self.stop.is_set()


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep, waking early on stop; True when stopping."""
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        return False
    return True
