"""KVReader.pull keeps its own deadline when other pulls wait on the same silent peer.

The peer here is a listening socket that never speaks HTTP/2: a handshake with it ends
only at its deadline. Pulls from one address share a handshake lock; before the fix a pull
waited for the lock without a bound and then handshook for its full timeout, so the n-th
of n concurrent pulls took n times its timeout (1, 2, 3, 4 s for four pulls of 1 s).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from services.kv_transfer.client import KVReader
from services.kv_transfer.errors import KVTransferError
from services.kv_transfer.grpc_transport import GrpcTransport
from tests.kv_transfer.helpers import layout_of, make_kv

TIMEOUT_S = 0.5
SLACK_S = 0.3
"""What a pull may take past its timeout (scheduling, closing its channel)."""


@pytest.fixture
def silent_peer() -> Iterator[str]:
    """host:port of a socket that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


async def _timed_pull(reader: KVReader, address: str, local_block: int) -> float:
    start = time.monotonic()
    with pytest.raises(KVTransferError, match=r"127\.0\.0\.1"):
        await reader.pull(address, [1], [local_block], f"req-{local_block}", TIMEOUT_S)
    return time.monotonic() - start


def test_concurrent_pulls_from_a_silent_peer_each_end_at_their_own_deadline(
    silent_peer: str,
) -> None:
    async def body() -> list[float]:
        kv = make_kv(16)
        transport = GrpcTransport(kv)
        reader = KVReader("decode-0", layout_of(kv), transport)
        try:
            return await asyncio.gather(
                *(_timed_pull(reader, silent_peer, block) for block in range(4))
            )
        finally:
            await transport.close()

    took = asyncio.run(body())
    assert all(TIMEOUT_S - 0.05 <= t < TIMEOUT_S + SLACK_S for t in took), took


def test_a_pull_waiting_on_a_longer_handshake_ends_at_its_own_deadline(
    silent_peer: str,
) -> None:
    """A pull of 0.5 s behind one of 3 s (holding the handshake lock) ends after 0.5 s with
    a message naming its timeout."""

    async def body() -> float:
        kv = make_kv(16)
        transport = GrpcTransport(kv)
        reader = KVReader("decode-0", layout_of(kv), transport)
        slow = asyncio.create_task(reader.pull(silent_peer, [1], [2], "slow", 3.0))
        await asyncio.sleep(0.05)  # the slow pull now holds the lock, handshaking
        start = time.monotonic()
        with pytest.raises(KVTransferError, match=r"'fast' .* did not finish within 0\.5 s"):
            await reader.pull(silent_peer, [1], [3], "fast", TIMEOUT_S)
        took = time.monotonic() - start
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
        await transport.close()
        return took

    took = asyncio.run(body())
    assert TIMEOUT_S - 0.05 <= took < TIMEOUT_S + SLACK_S, took
