"""Registry.PublishKVEvents: workers' KV events keep the router's prefix index exact."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import grpc

from services.engine.block_hash import BlockHash, hash_prefix_blocks
from services.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventLog
from services.router.config import RouterConfig
from services.router.kv_state import event_from_proto
from services.router.registry import DECODE, PREFILL
from services.router.server import Router, start_router
from services.rpc.server import client_channel
from services.stubs.tandem.v1 import worker_pb2 as wpb
from services.stubs.tandem.v1 import worker_pb2_grpc
from services.worker.kv_publisher import event_to_proto, publish_kv_events
from tests.router.fakes import MODEL, MODEL_ID
from tests.router.harness import run

BLOCK = 16
CONFIG = RouterConfig(heartbeat_interval_s=0.1, heartbeat_timeout_s=2.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def chain(seed: int, blocks: int) -> list[BlockHash]:
    return hash_prefix_blocks([seed * 1000 + i for i in range(blocks * BLOCK)], BLOCK, MODEL_ID)


def registration(worker_id: str, role: int = PREFILL) -> wpb.RegisterRequest:
    return wpb.RegisterRequest(
        worker_id=worker_id,
        role=role,
        address="127.0.0.1:1",
        model=MODEL,
        layout=wpb.KVLayout(model_id=MODEL_ID, block_size=BLOCK),
        max_context_length=512,
        vocab_size=4096,
    )


def snapshot(worker_id: str, hashes: list[BlockHash], next_seq: int) -> wpb.KVEventBatch:
    return wpb.KVEventBatch(
        worker_id=worker_id,
        snapshot=wpb.KVSnapshot(block_hashes=hashes, next_seq=next_seq, block_size=BLOCK),
    )


def stored(worker_id: str, seq: int, hashes: list[BlockHash]) -> wpb.KVEventBatch:
    event = BlockStored(seq, None, tuple(hashes), BLOCK)
    return wpb.KVEventBatch(worker_id=worker_id, events=[event_to_proto(event)])


def prefix(router: Router, hashes: list[BlockHash]) -> dict[str, int]:
    index = router.kv_state.index(MODEL)
    return {} if index is None else index.longest_prefix(hashes)


def gauge(router: Router, worker_id: str) -> float | None:
    """tandem_router_indexed_blocks{worker=worker_id}; None when the label is absent."""
    samples = [s for m in router.kv_state._gauge.collect() for s in m.samples]
    return next((s.value for s in samples if s.labels.get("worker") == worker_id), None)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def ended_with(call: grpc.aio.StreamUnaryCall) -> tuple[grpc.StatusCode, str]:
    try:
        await asyncio.wait_for(call, 5.0)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def test_events_round_trip_through_protos() -> None:
    a, b = chain(1, 2)
    for event in (
        BlockStored(0, None, (a, b), BLOCK),
        BlockStored(1, a, (b,), BLOCK),
        BlockRemoved(2, (a, b)),
        AllBlocksCleared(3),
    ):
        assert event_from_proto(event_to_proto(event)) == event


def test_snapshot_then_events_make_the_index_exact() -> None:
    async def body() -> None:
        router = await start_router(CONFIG)
        try:
            async with client_channel(router.address) as channel:
                stub = worker_pb2_grpc.RegistryStub(channel)
                await stub.Register(registration("p0"))
                await stub.Register(registration("d0", DECODE))
                shared, other = chain(1, 6), chain(2, 3)

                p0 = stub.PublishKVEvents()
                await p0.write(snapshot("p0", shared[:2], next_seq=7))
                await p0.write(stored("p0", 7, shared[2:5]))
                await p0.write(stored("p0", 8, other))
                d0 = stub.PublishKVEvents()
                await d0.write(snapshot("d0", shared[:3], next_seq=0))
                await until(lambda: prefix(router, other) == {"p0": 3})
                await until(lambda: "d0" in prefix(router, shared))
                assert prefix(router, shared) == {"p0": 5, "d0": 3}

                removed = BlockRemoved(9, (shared[3],))
                await p0.write(wpb.KVEventBatch(worker_id="p0", events=[event_to_proto(removed)]))
                await until(lambda: prefix(router, shared) == {"p0": 3, "d0": 3})
                assert gauge(router, "p0") == 2 + 3 + 3 - 1 and gauge(router, "d0") == 3

                cleared = AllBlocksCleared(10)
                await p0.write(wpb.KVEventBatch(worker_id="p0", events=[event_to_proto(cleared)]))
                await until(lambda: prefix(router, shared) == {"d0": 3})
                assert prefix(router, other) == {} and gauge(router, "p0") == 0
                for call in (p0, d0):
                    await call.done_writing()
                    assert await ended_with(call) == (grpc.StatusCode.OK, "")
        finally:
            await router.stop(grace=0)

    run(body())


def test_a_gap_ends_the_stream_and_a_snapshot_recovers() -> None:
    async def body() -> None:
        router = await start_router(CONFIG)
        try:
            async with client_channel(router.address) as channel:
                stub = worker_pb2_grpc.RegistryStub(channel)
                await stub.Register(registration("p0"))
                hashes = chain(1, 4)
                call = stub.PublishKVEvents()
                await call.write(snapshot("p0", hashes[:1], next_seq=1))
                await call.write(stored("p0", 3, hashes[1:3]))  # seq 1 and 2 lost
                code, details = await ended_with(call)
                assert code == grpc.StatusCode.FAILED_PRECONDITION
                assert "gap: expected seq 1, got 3" in details
                assert prefix(router, hashes) == {"p0": 1}  # old entries stay until resync

                again = stub.PublishKVEvents()
                await again.write(snapshot("p0", hashes, next_seq=5))
                await again.write(stored("p0", 5, chain(2, 1)))
                await until(lambda: prefix(router, chain(2, 1)) == {"p0": 1})
                assert prefix(router, hashes) == {"p0": 4}
                again.cancel()
        finally:
            await router.stop(grace=0)

    run(body())


def test_streams_of_unknown_workers_or_without_a_snapshot_are_refused() -> None:
    async def body() -> None:
        router = await start_router(CONFIG)
        try:
            async with client_channel(router.address) as channel:
                stub = worker_pb2_grpc.RegistryStub(channel)
                call = stub.PublishKVEvents()
                await call.write(snapshot("ghost", chain(1, 2), next_seq=0))
                code, details = await ended_with(call)
                assert code == grpc.StatusCode.FAILED_PRECONDITION
                assert "not registered" in details

                await stub.Register(registration("p0"))
                call = stub.PublishKVEvents()
                await call.write(stored("p0", 0, chain(1, 2)))
                code, details = await ended_with(call)
                assert code == grpc.StatusCode.FAILED_PRECONDITION
                assert "snapshot" in details
                assert prefix(router, chain(1, 2)) == {}
        finally:
            await router.stop(grace=0)

    run(body())


def test_a_stream_from_the_replaced_process_is_refused() -> None:
    """Another process registered under p0's id: the old one's snapshot stands for blocks
    the new one does not hold, so it must not reach the index."""

    async def body() -> None:
        router = await start_router(CONFIG)
        try:
            async with client_channel(router.address) as channel:
                stub = worker_pb2_grpc.RegistryStub(channel)
                old, new = registration("p0"), registration("p0")
                old.instance, new.instance = "a" * 32, "b" * 32
                await stub.Register(old)
                await stub.Register(new)
                call = stub.PublishKVEvents()
                stale = snapshot("p0", chain(1, 2), next_seq=0)
                stale.instance = old.instance
                await call.write(stale)
                code, details = await ended_with(call)
                assert code == grpc.StatusCode.FAILED_PRECONDITION
                assert "registered again by another process" in details
                assert prefix(router, chain(1, 2)) == {}

                current = stub.PublishKVEvents()
                fresh = snapshot("p0", chain(1, 2), next_seq=0)
                fresh.instance = new.instance
                await current.write(fresh)
                await until(lambda: prefix(router, chain(1, 2)) == {"p0": 2})
                current.cancel()
        finally:
            await router.stop(grace=0)

    run(body())


def test_re_registration_drops_the_workers_blocks_at_once() -> None:
    async def body() -> None:
        router = await start_router(CONFIG)
        try:
            async with client_channel(router.address) as channel:
                stub = worker_pb2_grpc.RegistryStub(channel)
                await stub.Register(registration("p0"))
                await stub.Register(registration("p1"))
                hashes = chain(1, 4)
                old = stub.PublishKVEvents()
                await old.write(snapshot("p0", hashes, next_seq=0))
                other = stub.PublishKVEvents()
                await other.write(snapshot("p1", hashes[:2], next_seq=0))
                await until(lambda: prefix(router, hashes) == {"p0": 4, "p1": 2})

                await stub.Register(registration("p0"))  # it restarted: its cache is empty
                assert prefix(router, hashes) == {"p1": 2}  # no wait for any event
                assert gauge(router, "p0") is None and gauge(router, "p1") == 2

                # The dead process's stream ends at once, with nothing sent on it: it
                # cannot bring stale blocks back.
                code, details = await ended_with(old)
                assert code == grpc.StatusCode.FAILED_PRECONDITION
                assert "re-registered" in details

                fresh = stub.PublishKVEvents()
                await fresh.write(snapshot("p0", [], next_seq=0))
                await until(lambda: gauge(router, "p0") == 0)
                await fresh.write(stored("p0", 0, hashes[:1]))
                await until(lambda: prefix(router, hashes) == {"p0": 1, "p1": 2})
                for call in (other, fresh):
                    call.cancel()
        finally:
            await router.stop(grace=0)

    run(body())


def test_an_expired_worker_leaves_the_index() -> None:
    async def body() -> None:
        clock = FakeClock()
        router = await start_router(CONFIG, clock=clock)
        try:
            async with client_channel(router.address) as channel:
                stub = worker_pb2_grpc.RegistryStub(channel)
                await stub.Register(registration("p0"))
                await stub.Register(registration("d0", DECODE))
                hashes = chain(1, 3)
                calls = []
                for worker_id in ("p0", "d0"):
                    calls.append(call := stub.PublishKVEvents())
                    await call.write(snapshot(worker_id, hashes, next_seq=0))
                await until(lambda: prefix(router, hashes) == {"p0": 3, "d0": 3})

                clock.now += 1.5
                await stub.Heartbeat(wpb.HeartbeatRequest(worker_id="d0"))
                clock.now += 1.0  # p0 silent 2.5 s > the 2 s timeout
                router.registry.sweep()
                assert prefix(router, hashes) == {"d0": 3}
                assert router.kv_state.indexed_blocks("p0") == 0
                for call in calls:
                    call.cancel()
        finally:
            await router.stop(grace=0)

    run(body())


# --- the worker's publisher, against the real router -------------------------------


@dataclass
class FakeEngine:
    """What the publisher touches: kv_snapshot(), events and config.block_size."""

    cached: list[BlockHash] = field(default_factory=list)
    events: KVEventLog = field(default_factory=KVEventLog)
    config: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(block_size=BLOCK))
    snapshots: int = 0

    def kv_snapshot(self) -> tuple[list[BlockHash], int]:
        self.snapshots += 1
        self.events.drain()
        return list(self.cached), self.events.next_seq

    def store(self, hashes: list[BlockHash]) -> None:
        self.cached += hashes
        self.events.stored(None, hashes, BLOCK)


class InlineLoop:
    """EngineLoop's ``call`` without a thread."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine

    async def call(self, fn: Callable[[FakeEngine], object]) -> object:
        return fn(self.engine)


def test_the_publisher_registers_late_resyncs_after_a_gap_and_stops() -> None:
    async def body() -> None:
        router = await start_router(CONFIG)
        engine = FakeEngine(cached=chain(1, 2))
        stop = asyncio.Event()
        task = asyncio.create_task(
            publish_kv_events(router.address, "p0", InlineLoop(engine), stop, interval_s=0.01)
        )
        try:
            await asyncio.sleep(0.2)  # refused while unregistered, retrying
            assert router.kv_state.index(MODEL) is None
            async with client_channel(router.address) as channel:
                await worker_pb2_grpc.RegistryStub(channel).Register(registration("p0"))
            await until(lambda: prefix(router, chain(1, 2)) == {"p0": 2})

            engine.store(chain(2, 2))
            await until(lambda: prefix(router, chain(2, 2)) == {"p0": 2})

            engine.store(chain(3, 1))
            engine.events.drain()  # these events are lost: the next one leaves a gap
            snapshots = engine.snapshots
            engine.store(chain(4, 1))
            await until(lambda: engine.snapshots > snapshots)
            await until(lambda: prefix(router, chain(3, 1)) == {"p0": 1})
            assert prefix(router, chain(4, 1)) == {"p0": 1}
            assert router.kv_state.indexed_blocks("p0") == 6
        finally:
            stop.set()
            await asyncio.wait_for(task, 5.0)
            await router.stop(grace=0)

    run(body())


def test_an_idle_worker_back_from_a_missed_heartbeat_is_indexed_again_at_once() -> None:
    """Expired by one missed heartbeat, a live worker re-registers with its cache intact.
    The router drops its blocks; its old stream must end at once so the publisher resyncs,
    not at the worker's next KV event (idle, it had none: the index said {} for good)."""

    async def body() -> None:
        clock = FakeClock()
        router = await start_router(CONFIG, clock=clock)
        engine = FakeEngine(cached=chain(1, 4))
        stop = asyncio.Event()
        task = asyncio.create_task(
            publish_kv_events(router.address, "p0", InlineLoop(engine), stop, interval_s=0.01)
        )
        try:
            async with client_channel(router.address) as channel:
                stub = worker_pb2_grpc.RegistryStub(channel)
                await stub.Register(registration("p0"))
                await until(lambda: prefix(router, chain(1, 4)) == {"p0": 4})
                clock.now += CONFIG.heartbeat_timeout_s + 0.5  # a heartbeat missed
                router.registry.sweep()
                assert prefix(router, chain(1, 4)) == {}
                await stub.Register(registration("p0"))  # what registration.py does next
            await until(lambda: prefix(router, chain(1, 4)) == {"p0": 4})  # no new event
        finally:
            stop.set()
            await asyncio.wait_for(task, 5.0)
            await router.stop(grace=0)

    run(body())
