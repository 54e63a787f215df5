"""WorkerRegistry: registration, heartbeats, expiry, compatibility; and its RPC face."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.engine.errors import InvalidRequestError
from services.router.config import RouterConfig
from services.router.errors import (
    IncompatibleWorkerError,
    SupersededWorkerError,
    UnknownWorkerError,
)
from services.router.registry import DECODE, PREFILL, WorkerRegistry
from services.stubs.tandem.v1 import worker_pb2, worker_pb2_grpc
from tests.router.fakes import MODEL, MODEL_ID
from tests.router.harness import cluster, run


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def registration(
    worker_id: str,
    role: int = DECODE,
    *,
    model: str = MODEL,
    block_size: int = 16,
    model_id: str = MODEL_ID,
    address: str = "127.0.0.1:1",
    instance: str = "",
) -> worker_pb2.RegisterRequest:
    return worker_pb2.RegisterRequest(
        worker_id=worker_id,
        role=role,
        address=address,
        model=model,
        layout=worker_pb2.KVLayout(model_id=model_id, block_size=block_size),
        max_context_length=512,
        vocab_size=4096,
        instance=instance,
    )


def _two_decode_workers() -> tuple[FakeClock, WorkerRegistry, list[str]]:
    """A registry with d1 and d2 (3 s heartbeat timeout), its clock, and the ids it removes."""
    clock = FakeClock()
    registry = WorkerRegistry(heartbeat_timeout_s=3.0, clock=clock)
    removed: list[str] = []
    registry.add_remove_listener(lambda w: removed.append(w.worker_id))
    registry.register(registration("d1"))
    registry.register(registration("d2"))
    return clock, registry, removed


def test_a_worker_that_stops_heartbeating_expires_after_the_timeout() -> None:
    clock, registry, removed = _two_decode_workers()
    d1 = registry.get("d1")

    clock.now += 2.0
    registry.heartbeat("d2", worker_pb2.WorkerLoad(running=4))
    clock.now += 1.5  # d1 silent 3.5 s, d2 1.5 s
    assert [w.worker_id for w in registry.candidates(MODEL, DECODE)] == ["d2"]
    assert registry.get("d2").load.running == 4
    assert removed == ["d1"] and d1.gone.is_set()

    clock.now += 1.5  # d2 silent for exactly the timeout: still alive
    assert registry.get("d2") is not None
    clock.now += 0.01
    assert registry.sweep()[0].worker_id == "d2"
    assert registry.workers() == []
    assert registry.models() == [] and registry.was_served(MODEL)


def test_heartbeat_from_an_expired_worker_is_refused_until_it_registers_again() -> None:
    clock = FakeClock()
    registry = WorkerRegistry(heartbeat_timeout_s=1.0, clock=clock)
    registry.register(registration("d1"))
    clock.now += 1.5
    with pytest.raises(UnknownWorkerError, match="register again"):
        registry.heartbeat("d1", worker_pb2.WorkerLoad())
    registry.register(registration("d1"))
    registry.heartbeat("d1", worker_pb2.WorkerLoad())
    with pytest.raises(UnknownWorkerError):
        registry.heartbeat("never", worker_pb2.WorkerLoad())


def test_a_draining_worker_stays_registered_but_takes_no_new_requests() -> None:
    clock, registry, removed = _two_decode_workers()
    d1 = registry.get("d1")

    registry.heartbeat("d1", worker_pb2.WorkerLoad(running=2), draining=True)
    assert [w.worker_id for w in registry.candidates(MODEL, DECODE)] == ["d2"]
    assert registry.draining(MODEL, DECODE) == ["d1"]
    assert registry.get("d1") is d1 and not d1.gone.is_set()  # its calls go on
    assert [m.model for m in registry.models()] == [MODEL]
    # A later heartbeat without the flag does not bring it back: draining is one-way.
    clock.now += 2.0
    registry.heartbeat("d1", worker_pb2.WorkerLoad(running=1))
    registry.heartbeat("d2", worker_pb2.WorkerLoad())
    assert registry.draining(MODEL, DECODE) == ["d1"] and removed == []
    # It still expires like any worker once it stops heartbeating...
    clock.now += 2.0
    registry.heartbeat("d2", worker_pb2.WorkerLoad())
    clock.now += 1.5
    assert registry.draining(MODEL, DECODE) == [] and removed == ["d1"]
    # ...and a process registering under its id again is a new, serving entry.
    registry.register(registration("d1"))
    assert [w.worker_id for w in registry.candidates(MODEL, DECODE)] == ["d1", "d2"]


def test_re_registration_replaces_the_entry() -> None:
    registry = WorkerRegistry(heartbeat_timeout_s=1.0, clock=FakeClock())
    old = registry.register(registration("d1", address="127.0.0.1:1"))
    old.in_flight = 3
    new = registry.register(registration("d1", address="127.0.0.1:2"))
    assert old.gone.is_set() and not new.gone.is_set()
    assert registry.get("d1") is new
    assert (new.address, new.in_flight) == ("127.0.0.1:2", 0)


def test_the_replaced_process_can_neither_keep_the_entry_alive_nor_drain_it() -> None:
    """Two processes under one worker id: the later registration wins, and the earlier
    process's heartbeats are refused rather than credited to it (they kept a dead address
    routable, and a draining one took the healthy worker out of service for good)."""
    clock = FakeClock()
    registry = WorkerRegistry(heartbeat_timeout_s=3.0, clock=clock)
    registry.register(registration("d1", address="127.0.0.1:1", instance="a" * 32))
    new = registry.register(registration("d1", address="127.0.0.1:2", instance="b" * 32))
    clock.now += 2.0
    stale = worker_pb2.WorkerLoad(running=7)
    with pytest.raises(SupersededWorkerError, match=r"another process \(at 127\.0\.0\.1:2\)"):
        registry.heartbeat("d1", stale, draining=True, instance="a" * 32)
    assert (new.draining, new.load.running, new.last_heartbeat) == (False, 0, 100.0)
    registry.heartbeat("d1", worker_pb2.WorkerLoad(running=1), instance="b" * 32)
    registry.heartbeat("d1", worker_pb2.WorkerLoad(running=2))  # a worker too old to say
    assert (registry.get("d1") is new, new.load.running, new.last_heartbeat) == (True, 2, 102.0)


def test_a_different_block_size_or_model_id_for_the_same_model_is_refused() -> None:
    registry = WorkerRegistry(heartbeat_timeout_s=1.0, clock=FakeClock())
    registry.register(registration("p1", PREFILL))
    with pytest.raises(IncompatibleWorkerError, match=r"block_size 32.*\(p1\).*block_size 16"):
        registry.register(registration("d1", block_size=32))
    with pytest.raises(IncompatibleWorkerError, match="model_id"):
        registry.register(registration("d1", model_id="other@2"))
    # Other model names, and the same worker restarting alone, are free to differ.
    registry.register(registration("o1", model="other", block_size=32, model_id="o"))
    registry.register(registration("p1", PREFILL, block_size=32))
    assert registry.get("p1").layout.block_size == 32


def test_a_worker_whose_kv_cannot_move_is_registered_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another --kv-layout (say, during a rolling upgrade) is served, not refused: requests
    pairing the two prefill again on the decode worker, and the log says why."""
    registry = WorkerRegistry(heartbeat_timeout_s=1.0, clock=FakeClock())
    registry.register(registration("p1", PREFILL))
    registry.register(registration("p2", PREFILL))
    other = registration("d1")
    other.layout.layout = "slot-layer-kv-head-dim"
    with caplog.at_level("WARNING", logger="services.router.registry"):
        registry.register(other)
    assert registry.get("d1") is not None
    [record] = caplog.records  # one line, however many workers differ
    assert "worker d1 (model" in record.getMessage()
    assert "cannot exchange KV with p1" in record.getMessage()
    assert "--kv-layout" in record.getMessage()
    caplog.clear()
    registry.register(registration("d2"))  # as the prefill workers; decode pairs never move KV
    assert caplog.records == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"worker_id": ""}, "worker_id"),
        ({"address": ""}, "address"),
        ({"model": ""}, "model"),
        ({"role": worker_pb2.WORKER_ROLE_UNSPECIFIED}, "role"),
        ({"max_context_length": 0}, "max_context_length"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_malformed_registrations_name_the_field(change: dict[str, object], field: str) -> None:
    request = registration("d1")
    for name, value in change.items():
        setattr(request, name, value)
    registry = WorkerRegistry(heartbeat_timeout_s=1.0)
    with pytest.raises(InvalidRequestError) as info:
        registry.register(request)
    assert info.value.field == field


def test_missing_layout_is_refused() -> None:
    request = registration("d1")
    request.ClearField("layout")
    with pytest.raises(InvalidRequestError, match=r"layout\.block_size"):
        WorkerRegistry(heartbeat_timeout_s=1.0).register(request)


def test_registry_rpc_statuses() -> None:
    async def body() -> None:
        async with cluster(RouterConfig(heartbeat_interval_s=0.25)) as c:
            stub = worker_pb2_grpc.RegistryStub(c.channel)
            reply = await stub.Register(registration("d1"))
            assert reply.heartbeat_interval_ms == 250
            await stub.Heartbeat(worker_pb2.HeartbeatRequest(worker_id="d1"))

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Register(registration("d2", block_size=8))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "block_size" in info.value.details()

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Heartbeat(worker_pb2.HeartbeatRequest(worker_id="nobody"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Register(registration(""))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "worker_id" in info.value.details()

    run(body())


def test_expired_worker_leaves_the_registry_and_gets_no_more_requests() -> None:
    config = RouterConfig(policy="round-robin", heartbeat_interval_s=0.1, heartbeat_timeout_s=0.5)

    async def body() -> None:
        async with cluster(config) as c:
            d1 = await c.add("d1", DECODE)
            d2 = await c.add("d2", DECODE)
            await asyncio.sleep(0.7)  # both keep heartbeating past the timeout
            assert [w.worker_id for w in c.router.registry.workers()] == ["d1", "d2"]
            assert d1.heartbeats >= 3

            await d1.stop_heartbeats()
            await asyncio.sleep(0.9)
            assert [w.worker_id for w in c.router.registry.workers()] == ["d2"]
            for _ in range(4):
                result = await c.generate(prompt_token_ids=[1, 2], max_tokens=2)
                assert result.final.serving.decode_worker == "d2"
            assert d1.calls == [] and len(d2.calls) == 4

    run(body())
