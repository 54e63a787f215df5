"""A decode-side reader in this process pulls from a peer in another process, for real.

The peer (tests/kv_transfer/peer.py) has 64 blocks filled with a seeded pattern and pins
blocks 3, 4, 5, 9 under "req-1"; this side has 80 blocks, so every offset differs.
"""

from __future__ import annotations

import asyncio

import pytest

from services.kv_transfer.client import KVReader
from services.kv_transfer.errors import IncompatiblePeerError
from services.kv_transfer.grpc_transport import GrpcTransport
from services.kv_transfer.nixl_transport import NixlTransport
from services.kv_transfer.transport import KVTransport
from tests.kv_transfer.conftest import PeerFactory, needs_nixl
from tests.kv_transfer.helpers import block_bytes, layout_of, make_kv, pattern, pool_bytes

REMOTE, LOCAL = [3, 4, 5, 9], [10, 11, 12, 40]
PIN = "--pin=req-1=3,4,5,9"
KINDS = [pytest.param("nixl", marks=needs_nixl), "grpc"]


def reader(kind: str, layout: str = "slot-major") -> tuple[KVReader, KVTransport]:
    kv = make_kv(80, layout=layout)
    transport = NixlTransport(kv, "decode-0") if kind == "nixl" else GrpcTransport(kv)
    return KVReader("decode-0", layout_of(kv), transport), transport


def expected(
    seed: int, block_ids: list[int], num_blocks: int = 64, layout: str = "slot-major"
) -> bytes:
    peer_layout = layout_of(make_kv(num_blocks, layout=layout))
    return block_bytes(pattern(num_blocks, seed), peer_layout, block_ids)


def pulled(transport: KVTransport, block_ids: list[int] = LOCAL) -> bytes:
    return block_bytes(pool_bytes(transport.kv), layout_of(transport.kv), block_ids)


@pytest.mark.parametrize("layout", ["layer-major", "slot-major"])
@pytest.mark.parametrize("kind", KINDS)
def test_pull_between_processes(peers: PeerFactory, kind: str, layout: str) -> None:
    peer = peers.start(f"--transport={kind}", f"--layout={layout}", "--seed=11", PIN)

    async def body() -> None:
        kv_reader, transport = reader(kind, layout)
        n = await kv_reader.pull(peer.address, REMOTE, LOCAL, "req-1", timeout_s=10)
        assert n == 4 * 128 * 1024
        assert pulled(transport) == expected(11, REMOTE, layout=layout)
        others = [b for b in range(80) if b not in LOCAL]
        assert not any(pulled(transport, others))
        # Again, another order: the connection is reused.
        n = await kv_reader.pull(peer.address, [9, 3], [0, 1], "req-1", timeout_s=10)
        assert n == 2 * 128 * 1024
        assert pulled(transport, [0, 1]) == expected(11, [9, 3], layout=layout)
        await transport.close()

    asyncio.run(body())


@needs_nixl
def test_restarted_peer_is_reconnected(peers: PeerFactory) -> None:
    """Same address, new process and agent: the stale agent goes, the pull works."""
    first = peers.start("--transport=nixl", "--seed=1", PIN)

    async def body() -> None:
        kv_reader, transport = reader("nixl")
        assert isinstance(transport, NixlTransport)
        await kv_reader.pull(first.address, REMOTE, LOCAL, "req-1", timeout_s=10)
        assert pulled(transport) == expected(1, REMOTE)
        assert first.agent in transport.remote_agents
        first.kill()
        second = peers.start(
            "--transport=nixl", "--seed=2", "--num-blocks=72", f"--port={first.port}", PIN
        )
        assert second.address == first.address and second.agent != first.agent
        n = await kv_reader.pull(second.address, REMOTE, LOCAL, "req-1", timeout_s=10)
        assert n == 4 * 128 * 1024
        assert pulled(transport) == expected(2, REMOTE, num_blocks=72)
        assert first.agent not in transport.remote_agents
        assert second.agent in transport.remote_agents
        await transport.close()

    asyncio.run(body())


@pytest.mark.parametrize("kind", KINDS)
def test_a_peer_with_the_other_pool_order_is_refused(peers: PeerFactory, kind: str) -> None:
    """Byte offsets mean different things in the two orders: the handshake refuses the pair,
    naming the flag, and nothing is written."""
    peer = peers.start(f"--transport={kind}", "--layout=layer-major", "--seed=3", PIN)

    async def body() -> None:
        kv_reader, transport = reader(kind, "slot-major")
        with pytest.raises(IncompatiblePeerError, match=r"differ in layout.*--kv-layout"):
            await kv_reader.pull(peer.address, REMOTE, LOCAL, "req-1", timeout_s=10)
        assert not pool_bytes(transport.kv).any()
        await transport.close()

    asyncio.run(body())
