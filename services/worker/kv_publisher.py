"""Stream this worker's prefix-cache changes to the router (Registry.PublishKVEvents).

Each connection starts with a snapshot taken on the engine thread
(``LLMEngine.kv_snapshot``: every cached hash and the next event's seq, with the
event log drained in the same step, so nothing is lost or counted twice). Then,
every ``interval_s``, the events the engine logged since are drained and sent
as one message; an interval without events sends nothing.

When the stream fails for any reason (the router ends it with
FAILED_PRECONDITION on a gap or while this worker is not registered, the router
restarts or is unreachable), the publisher waits briefly (doubling from
``RETRY_S`` up to ``MAX_RETRY_S``) and reconnects with a fresh snapshot. Events
drained into a stream that then failed are covered by that snapshot. It starts
alongside registration: until the router knows the worker it refuses the
stream, and the retry picks it up once registered.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from services.engine.engine import LLMEngine
from services.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from services.rpc.server import client_channel
from services.rpc.tls import TlsConfig
from services.stubs.tandem.v1 import worker_pb2 as wpb
from services.stubs.tandem.v1 import worker_pb2_grpc
from services.worker.engine_loop import EngineLoop
from services.worker.registration import sleep_or_stop

log = logging.getLogger(__name__)

RETRY_S = 0.1
MAX_RETRY_S = 2.0
HEALTHY_S = 5.0
"""A stream that lived this long resets the backoff."""


async def publish_kv_events(
    router: str,
    worker_id: str,
    loop: EngineLoop,
    stop: asyncio.Event,
    interval_s: float = 0.05,
    tls: TlsConfig | None = None,
    instance: str = "",
) -> None:
    """Publish until ``stop`` is set (or the task is cancelled); never raises otherwise.
    ``tls``: dial the router with this identity and CA (None: plaintext). ``instance``:
    this process's RegisterRequest.instance, sent with each stream's snapshot."""
    async with client_channel(router, tls=tls) as channel:
        stub = worker_pb2_grpc.RegistryStub(channel)
        delay = RETRY_S
        while not stop.is_set():
            began = time.monotonic()
            try:
                why = await _publish_once(stub, worker_id, loop, stop, interval_s, instance)
            except RuntimeError:  # the engine loop stopped: the worker is shutting down
                return
            if why is None:
                return
            if time.monotonic() - began >= HEALTHY_S:
                delay = RETRY_S
            log.log(
                logging.DEBUG if "not registered" in why else logging.INFO,
                "KV event stream ended (%s); reconnecting with a snapshot in %.1f s",
                why,
                delay,
            )
            if await sleep_or_stop(stop, delay):
                return
            delay = min(delay * 2, MAX_RETRY_S)


async def _publish_once(
    stub: worker_pb2_grpc.RegistryStub,
    worker_id: str,
    loop: EngineLoop,
    stop: asyncio.Event,
    interval_s: float,
    instance: str,
) -> str | None:
    """One stream: snapshot, then batches. None when stopping, else why it ended."""
    call = stub.PublishKVEvents()
    try:
        snapshot = await loop.call(_snapshot)
        first = wpb.KVEventBatch(worker_id=worker_id, snapshot=snapshot, instance=instance)
        await call.write(first)
        while not await sleep_or_stop(stop, interval_s):
            if call.done():
                break
            events = await loop.call(lambda engine: engine.events.drain())
            if events:
                batch = wpb.KVEventBatch(
                    worker_id=worker_id, events=[event_to_proto(e) for e in events]
                )
                await call.write(batch)
        if stop.is_set():
            return None
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass  # the status below says why
    finally:
        if stop.is_set():
            call.cancel()
    try:
        async with asyncio.timeout(1.0):
            await call
        return "closed by the router"
    except grpc.aio.AioRpcError as e:
        return f"{e.code().name}: {e.details()}"
    except (TimeoutError, asyncio.CancelledError):
        call.cancel()
        return "no answer from the router"


def _snapshot(engine: LLMEngine) -> wpb.KVSnapshot:
    hashes, next_seq = engine.kv_snapshot()
    return wpb.KVSnapshot(
        block_hashes=hashes, next_seq=next_seq, block_size=engine.config.block_size
    )


def event_to_proto(event: KVEvent) -> wpb.KVEvent:
    """The ``KVEvent`` message for one engine event."""
    if isinstance(event, BlockStored):
        return wpb.KVEvent(
            seq=event.seq,
            stored=wpb.KVBlocksStored(
                parent=event.parent or b"",
                block_hashes=event.hashes,
                block_size=event.block_size,
            ),
        )
    if isinstance(event, BlockRemoved):
        return wpb.KVEvent(seq=event.seq, removed=wpb.KVBlocksRemoved(block_hashes=event.hashes))
    if isinstance(event, AllBlocksCleared):
        return wpb.KVEvent(seq=event.seq, cleared=wpb.KVAllCleared())
    raise TypeError(f"not a KV event: {event!r}")
