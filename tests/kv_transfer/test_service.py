"""KVTransfer served in-process on a real port: handshake, ReadBlocks errors, pulls."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future

import grpc
import pytest

from services.kv_transfer import layout as kv_layout
from services.kv_transfer.agent_thread import AgentThread
from services.kv_transfer.client import KVReader, handshake
from services.kv_transfer.errors import IncompatiblePeerError, KVTransferError
from services.kv_transfer.factory import make_transport
from services.kv_transfer.grpc_transport import GrpcTransport
from services.kv_transfer.nixl_transport import NixlTransport
from services.kv_transfer.service import PinCheck, servicer
from services.kv_transfer.transport import KVTransport
from services.rpc.server import RunningServer, client_channel, start_server
from services.stubs.tandem.v1 import worker_pb2, worker_pb2_grpc
from tests.kv_transfer.conftest import needs_nixl
from tests.kv_transfer.helpers import block_bytes, fill_pattern, layout_of, make_kv, pool_bytes

PINS = {"req-1": [3, 4, 5, 9]}


def pinned(request_id: str, block_ids: list[int]) -> PinCheck:
    return PinCheck.of(PINS.get(request_id), block_ids)


async def serve(transport: KVTransport, pins=pinned, worker_id: str = "prefill-0") -> RunningServer:
    layout = layout_of(transport.kv)
    return await start_server([servicer(layout, transport, pins, worker_id)])


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


def test_pin_check_of() -> None:
    assert PinCheck.of(None, [1]) == PinCheck(request_pinned=False)
    assert PinCheck.of([1, 2], [2, 1]) == PinCheck(True, ())
    assert PinCheck.of([1, 2], [2, 7, 8]) == PinCheck(True, (7, 8))


def test_make_transport_kinds() -> None:
    kv = make_kv(8)
    assert isinstance(make_transport("grpc", kv, "w"), GrpcTransport)
    with pytest.raises(
        ValueError, match="unknown KV transport 'rdma': choose one of auto, nixl, grpc"
    ):
        make_transport("rdma", kv, "w")


@needs_nixl
def test_make_transport_auto_is_nixl_here() -> None:
    async def body() -> None:
        transport = make_transport("auto", make_kv(8), "w")
        assert isinstance(transport, NixlTransport)
        await transport.close()

    run(body)


@pytest.mark.parametrize(
    ("kv_args", "model_id", "field"),
    [((64, 32), "tandem-tiny", "block_size"), ((64, 16), "other-model", "model_id")],
)
def test_incompatible_handshake_is_failed_precondition(kv_args, model_id, field) -> None:
    async def body() -> None:
        server = await serve(GrpcTransport(make_kv(80)))
        caller = make_kv(*kv_args)
        request = worker_pb2.HandshakeRequest(worker_id="d", layout=layout_of(caller, model_id))
        async with client_channel(server.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await worker_pb2_grpc.KVTransferStub(channel).Handshake(request, timeout=5)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"differ in {field}" in e.value.details()
        # The client helper turns it into IncompatiblePeerError with the same message.
        with pytest.raises(IncompatiblePeerError, match=f"differ in {field}"):
            await handshake(
                server.address, "d", layout_of(caller, model_id), GrpcTransport(caller), 5
            )
        await server.stop(0)

    run(body)


def test_read_blocks_errors() -> None:
    async def body() -> None:
        server = await serve(GrpcTransport(make_kv(64)))
        async with client_channel(server.address) as channel:
            stub = worker_pb2_grpc.KVTransferStub(channel)

            async def read(request_id: str, ids: list[int]) -> grpc.aio.AioRpcError:
                request = worker_pb2.ReadBlocksRequest(request_id=request_id, block_ids=ids)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in stub.ReadBlocks(request, timeout=5):
                        pass
                return e.value

            e = await read("nobody", [3])
            assert e.code() == grpc.StatusCode.NOT_FOUND and "'nobody'" in e.details()
            e = await read("req-1", [3, 4, 7])
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "block 7 is not pinned by request 'req-1'" in e.details()
            e = await read("req-1", [])
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        await server.stop(0)

    run(body)


def test_lease_running_out_during_a_read_fails_it() -> None:
    calls = []

    async def pins(request_id: str, block_ids: list[int]) -> PinCheck:  # async is allowed
        calls.append(request_id)
        return PinCheck.of([3] if len(calls) == 1 else None, block_ids)

    async def body() -> None:
        server = await serve(GrpcTransport(make_kv(64)), pins)
        reader = KVReader("decode-0", layout_of(make_kv(80)), GrpcTransport(make_kv(80)))
        with pytest.raises(KVTransferError, match="unpinned while being read") as e:
            await reader.pull(server.address, [3], [10], "req-1", timeout_s=5)
        assert e.value.peer_code == "NOT_FOUND"
        await server.stop(0)

    run(body)


def _transports(kind: str, num_blocks: int, worker_id: str) -> KVTransport:
    kv = make_kv(num_blocks)
    return NixlTransport(kv, worker_id) if kind == "nixl" else GrpcTransport(kv)


@pytest.mark.parametrize("kind", [pytest.param("nixl", marks=needs_nixl), "grpc"])
def test_pull_in_process(kind: str) -> None:
    async def body() -> None:
        prefill = _transports(kind, 64, "prefill-0")
        fill_pattern(prefill.kv, seed=7)
        server = await serve(prefill)
        decode = _transports(kind, 80, "decode-0")
        reader = KVReader("decode-0", layout_of(decode.kv), decode)
        n = await reader.pull(server.address, [3, 4, 5, 9], [10, 11, 12, 40], "req-1", 5)
        assert n == 4 * 128 * 1024
        want = block_bytes(pool_bytes(prefill.kv), layout_of(prefill.kv), [3, 4, 5, 9])
        got = block_bytes(pool_bytes(decode.kv), layout_of(decode.kv), [10, 11, 12, 40])
        assert got == want
        await decode.close()
        await server.stop(0)
        await prefill.close()

    run(body)


@needs_nixl
def test_short_nixl_pulls_run_on_the_calling_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pulls up to inline_max_bytes skip the agent thread (two thread hops, ~45 µs); larger
    ones, and every one with inline_max_bytes=0, go through it. Bytes right either way."""
    threaded: list[str] = []
    real_transfer = AgentThread.transfer

    def counted(self: AgentThread, make_handle: Callable[[], object]) -> object:
        threaded.append(self._thread.name)
        return real_transfer(self, make_handle)

    monkeypatch.setattr(AgentThread, "transfer", counted)

    async def body() -> None:
        prefill = NixlTransport(make_kv(64), "prefill-0")
        fill_pattern(prefill.kv, seed=11)
        server = await serve(prefill)
        want = block_bytes(pool_bytes(prefill.kv), layout_of(prefill.kv), [3, 4, 5])
        for inline_max, blocks, hops in ((None, 2, 0), (None, 3, 1), (0, 1, 1)):
            decode = NixlTransport(make_kv(80), "decode-0", inline_max_bytes=inline_max)
            reader = KVReader("decode-0", layout_of(decode.kv), decode)
            threaded.clear()
            n = await reader.pull(
                server.address, [3, 4, 5][:blocks], [20, 21, 22][:blocks], "req-1", 5
            )
            assert (n, len(threaded)) == (blocks * 128 * 1024, hops), (inline_max, blocks)
            got = block_bytes(pool_bytes(decode.kv), layout_of(decode.kv), [20, 21, 22])
            assert got[: blocks * 128 * 1024] == want[: blocks * 128 * 1024]
            await decode.close()
        await server.stop(0)
        await prefill.close()

    run(body)


@needs_nixl
def test_a_read_not_released_in_time_hands_its_blocks_to_their_owner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The agent thread stuck (here: busy with another call) past RELEASE_TIMEOUT_S when a
    pull gives up: the pull returns, and ``on_unreleased`` gets the local blocks it was
    reading into and a future set only once the READ can no longer write them."""
    monkeypatch.setattr("services.kv_transfer.nixl_transport.RELEASE_TIMEOUT_S", 0.1)
    told: list[tuple[list[int], Future[None]]] = []

    async def body() -> None:
        prefill = NixlTransport(make_kv(64), "prefill-0")
        server = await serve(prefill)
        decode = NixlTransport(make_kv(80), "decode-0", inline_max_bytes=0)
        decode.on_unreleased = lambda ids, until: told.append((ids, until))
        reader = KVReader("decode-0", layout_of(decode.kv), decode)
        await reader.pull(server.address, [3], [20], "req-1", 5)  # connected
        stuck = threading.Event()
        busy = decode._thread.submit(lambda: stuck.wait(10))
        with pytest.raises(KVTransferError, match="did not finish within"):
            await reader.pull(server.address, [3, 4, 5], [20, 21, 22], "req-1", 0.05)
        assert [ids for ids, _ in told] == [[20, 21, 22]]
        assert not told[0][1].done()  # still owned by the stuck READ
        stuck.set()
        await asyncio.wrap_future(busy)
        await asyncio.wait_for(asyncio.wrap_future(told[0][1]), 5)
        await decode.close()
        await server.stop(0)
        await prefill.close()

    run(body)


class InFlight:
    """The decode side's NIXL agent, except that its READs report PROC until ``finish`` is
    set (as a device READ does after its post, which only queues the copies); records an
    agent removed while a READ from it was still in flight."""

    def __init__(self, agent: object) -> None:
        self._agent = agent
        self.finish = threading.Event()
        self.in_flight: dict[object, str] = {}  # handle -> remote agent
        self.removed: list[str] = []
        self.removed_under_a_read: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._agent, name)

    def initialize_xfer(self, op: str, local: object, remote: object, agent: str) -> object:
        handle = self._agent.initialize_xfer(op, local, remote, agent)  # type: ignore[attr-defined]
        self.in_flight[handle] = agent
        return handle

    def transfer(self, handle: object) -> str:
        state = self._agent.transfer(handle)  # type: ignore[attr-defined]
        return "PROC" if state == "DONE" and not self.finish.is_set() else state

    def check_xfer_state(self, handle: object) -> str:
        return self._agent.check_xfer_state(handle) if self.finish.is_set() else "PROC"  # type: ignore[attr-defined]

    def release_xfer_handle(self, handle: object) -> None:
        self.in_flight.pop(handle, None)
        self._agent.release_xfer_handle(handle)  # type: ignore[attr-defined]

    def remove_remote_agent(self, name: str) -> None:
        if name in self.in_flight.values():
            self.removed_under_a_read.append(name)
        self.removed.append(name)
        self._agent.remove_remote_agent(name)  # type: ignore[attr-defined]


@needs_nixl
def test_a_peer_replaced_under_a_read_keeps_its_agent_until_the_read_is_over() -> None:
    """A prefill worker restarted at the same address while a READ from its old agent is in
    flight: connect(new peer) removed the old agent at once, under the READ (on a GPU the
    copy still runs after the post; NIXL would tear down what it uses). The removal now
    waits for the READ's release."""

    async def body() -> None:
        old, new = NixlTransport(make_kv(64), "prefill-0"), NixlTransport(make_kv(64), "p-1")
        old_server, new_server = await serve(old), await serve(new, worker_id="p-1")
        decode = NixlTransport(make_kv(80), "decode-0", inline_max_bytes=0)
        layout = layout_of(decode.kv)
        peer = await handshake(old_server.address, "decode-0", layout, decode, 5)
        await decode.connect(peer)
        restarted = await handshake(new_server.address, "decode-0", layout, decode, 5)
        restarted = dataclasses.replace(restarted, address=peer.address)
        agent = decode._agent = decode._thread._agent = InFlight(decode._agent)
        pull = asyncio.ensure_future(decode.pull(peer, [3, 4, 5], [20, 21, 22], "req-1", 5))
        while not agent.in_flight:
            await asyncio.sleep(0.005)
        await decode.connect(restarted)  # the peer restarted at the same address
        assert agent.removed == []  # deferred: a READ from it is in flight
        agent.finish.set()
        assert await pull == 3 * 128 * 1024
        for _ in range(200):
            if agent.removed:
                break
            await asyncio.sleep(0.005)
        assert (agent.removed, agent.removed_under_a_read) == ([peer.nixl_agent], [])
        await decode.close()
        for server, transport in ((old_server, old), (new_server, new)):
            await server.stop(0)
            await transport.close()

    run(body)


@needs_nixl
def test_nixl_reader_falls_back_to_grpc_for_a_peer_without_nixl() -> None:
    async def body() -> None:
        prefill = GrpcTransport(make_kv(64))
        fill_pattern(prefill.kv, seed=8)
        server = await serve(prefill)
        decode = NixlTransport(make_kv(80), "decode-0")
        reader = KVReader("decode-0", layout_of(decode.kv), decode)
        assert await reader.pull(server.address, [9], [0], "req-1", 5) == 128 * 1024
        want = block_bytes(pool_bytes(prefill.kv), layout_of(prefill.kv), [9])
        assert block_bytes(pool_bytes(decode.kv), layout_of(decode.kv), [0]) == want
        await decode.close()
        await server.stop(0)

    run(body)


@needs_nixl
def test_pull_rejects_bad_ids_before_moving_anything() -> None:
    async def body() -> None:
        prefill = NixlTransport(make_kv(64), "prefill-0")
        server = await serve(prefill)
        decode = NixlTransport(make_kv(80), "decode-0")
        reader = KVReader("decode-0", layout_of(decode.kv), decode)
        with pytest.raises(ValueError, match="remote_block_ids: block 64 is outside"):
            await reader.pull(server.address, [64], [0], "req-1", 5)
        await decode.close()
        await server.stop(0)
        await prefill.close()

    run(body)


@needs_nixl
def test_restarted_caller_replaces_its_stale_agent() -> None:
    """A decode worker that restarts (same worker id, new agent) is accepted afresh."""

    async def body() -> None:
        prefill = NixlTransport(make_kv(64), "prefill-0")
        server = await serve(prefill)
        before = NixlTransport(make_kv(80), "decode-0")
        await handshake(server.address, "decode-0", layout_of(before.kv), before, 5)
        assert prefill.remote_agents == {before.agent_name}
        after = NixlTransport(make_kv(80), "decode-0")
        await handshake(server.address, "decode-0", layout_of(after.kv), after, 5)
        assert prefill.remote_agents == {after.agent_name}
        for transport in (before, after):
            await transport.close()
        await server.stop(0)
        await prefill.close()

    run(body)


@needs_nixl
def test_callers_agents_beyond_the_cap_are_unloaded_oldest_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each restart of a decode worker is a new caller (a new id): only the most recent
    MAX_ACCEPTED callers' agents stay loaded, and a caller handshaking again is recent."""
    monkeypatch.setattr("services.kv_transfer.nixl_transport.MAX_ACCEPTED", 2)

    async def body() -> None:
        prefill = NixlTransport(make_kv(64), "prefill-0")
        server = await serve(prefill)
        callers = [NixlTransport(make_kv(80), f"decode-{i}") for i in range(3)]
        for i in (0, 1, 0, 2):  # decode-0 again before decode-2: decode-1 is the oldest
            caller = callers[i]
            await handshake(server.address, f"decode-{i}", layout_of(caller.kv), caller, 5)
        assert prefill.remote_agents == {callers[0].agent_name, callers[2].agent_name}
        for transport in callers:
            await transport.close()
        await server.stop(0)
        await prefill.close()

    run(body)


def test_served_bytes_are_counted_once_per_read_served_in_full() -> None:
    """Told the bytes of a read that ended with its blocks still pinned; not told of one
    refused up front, nor of one whose blocks were unpinned while it was read."""
    served: list[int] = []
    checks = []

    def pins(request_id: str, block_ids: list[int]) -> PinCheck:
        checks.append(request_id)
        if request_id == "expiring" and len(checks) > 1:
            return PinCheck.of(None, block_ids)  # the lease ran out during the read
        return PinCheck.of([3, 4, 5, 9], block_ids)

    async def body() -> None:
        kv = make_kv(64)
        layout = layout_of(kv)
        server = await start_server(
            [servicer(layout, GrpcTransport(kv), pins, "prefill-0", served=served.append)]
        )
        async with client_channel(server.address) as channel:
            stub = worker_pb2_grpc.KVTransferStub(channel)

            async def read(request_id: str, ids: list[int]) -> grpc.StatusCode:
                request = worker_pb2.ReadBlocksRequest(request_id=request_id, block_ids=ids)
                try:
                    async for _ in stub.ReadBlocks(request, timeout=5):
                        pass
                except grpc.aio.AioRpcError as e:
                    return e.code()
                return grpc.StatusCode.OK

            assert await read("req-1", [3, 4, 9]) == grpc.StatusCode.OK
            assert await read("req-1", [3, 7]) == grpc.StatusCode.INVALID_ARGUMENT
            checks.clear()
            assert await read("expiring", [3]) == grpc.StatusCode.NOT_FOUND
        await server.stop(0)
        assert served == [3 * kv_layout.block_bytes(layout)]

    run(body)


@pytest.mark.parametrize(
    ("restarted", "field"),
    [({"layout": "layer-major"}, "layout"), ({"block_size": 8}, "block_size")],
)
def test_a_peer_restarted_incompatible_at_the_same_address_is_not_misread(
    restarted: dict[str, object], field: str
) -> None:
    """The gRPC reader handshakes once per address. A peer restarted there with another
    --kv-layout served the same number of bytes, laid out otherwise, and the pull decoded
    them as garbage; each read now carries the reader's layout, checked like a handshake."""

    async def body() -> None:
        first = await serve(GrpcTransport(make_kv(64)))
        port = int(first.address.rsplit(":", 1)[1])
        local = make_kv(32)
        reader = KVReader("decode-0", layout_of(local), GrpcTransport(local))
        await reader.pull(first.address, [3, 4], [20, 21], "req-1", timeout_s=5)
        await first.stop(0)
        kv_args = {"block_size": 16, "layout": "slot-major", **restarted}
        transport = GrpcTransport(make_kv(64, **kv_args))  # type: ignore[arg-type]
        second = await start_server(
            [servicer(layout_of(transport.kv), transport, pinned, "prefill-0")], port=port
        )
        with pytest.raises(KVTransferError, match=f"FAILED_PRECONDITION: .*differ in {field}"):
            await reader.pull(second.address, [3, 4], [20, 21], "req-1", timeout_s=5)
        await reader.transport.close()
        await second.stop(0)

    run(body)
