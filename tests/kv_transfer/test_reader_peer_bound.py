"""KVReader keeps at most ``max_peers`` peers connected: the one read from least recently
(and not being read from) is disconnected, its NIXL agent removed, and a later pull from it
handshakes again. Prefill workers come and go at new addresses; without the bound every
address ever read from kept its handshake, agent and channel for the worker's life."""

from __future__ import annotations

import asyncio

import pytest

from services.kv_transfer.client import KVReader
from services.kv_transfer.factory import make_transport
from services.kv_transfer.service import PinCheck, servicer
from services.rpc.server import start_server
from tests.kv_transfer.conftest import needs_nixl
from tests.kv_transfer.helpers import block_bytes, fill_pattern, layout_of, make_kv, pool_bytes

PINS = {"r": [3, 4]}


def _pinned(request_id: str, block_ids: list[int]) -> PinCheck:
    return PinCheck.of(PINS.get(request_id), block_ids)


@pytest.mark.parametrize("kind", ["grpc", pytest.param("nixl", marks=needs_nixl)])
def test_the_least_recently_read_idle_peer_is_disconnected(kind: str) -> None:
    async def body() -> None:
        peers, servers = [], []
        for i in range(3):
            kv = make_kv(16)
            fill_pattern(kv, seed=i + 1)
            transport = make_transport(kind, kv, f"prefill-{i}")
            server = await start_server([servicer(layout_of(kv), transport, _pinned, f"p{i}")])
            peers.append((kv, transport))
            servers.append(server)
        a, b, c = (s.address for s in servers)
        local = make_kv(16)
        transport = make_transport(kind, local, "decode-0")
        reader = KVReader("decode-0", layout_of(local), transport)
        reader.max_peers = 2
        try:
            for address in (a, b, a):  # a read last: b is now the least recent
                await reader.pull(address, [3, 4], [0, 1], "r", 10)
            reader._reading[a] += 1  # a pull from a in progress: never the one dropped
            reader._peers[a] = reader._peers.pop(a)
            reader._peers = {a: reader._peers[a], b: reader._peers[b]}  # a oldest now
            await reader.pull(c, [3, 4], [2, 3], "r", 10)
            assert list(reader._peers) == [a, c]  # b went, though a was read longer ago
            assert list(transport._peers) == [a, c]
            if kind == "nixl":
                names = [(await t.handshake_payload()).nixl_agent for _, t in peers]
                assert names[1] not in transport.remote_agents
                assert {names[0], names[2]} <= transport.remote_agents
            reader._reading[a] -= 1
            moved = await reader.pull(b, [3, 4], [4, 5], "r", 10)  # b again: a new handshake
            assert moved == 2 * len(block_bytes(pool_bytes(local), layout_of(local), [0]))
            assert block_bytes(pool_bytes(local), layout_of(local), [4, 5]) == block_bytes(
                pool_bytes(peers[1][0]), layout_of(local), [3, 4]
            )
            assert list(reader._peers) == [c, b]  # a, idle again and least recent, went
        finally:
            await transport.close()
            for server, (_, peer_transport) in zip(servers, peers, strict=True):
                await server.stop(0)
                await peer_transport.close()

    asyncio.run(asyncio.wait_for(body(), 60))
