"""Pulls from a peer process that died, stopped answering, or never existed: each ends in
KVTransferError within its timeout (plus 1 s), never a hang."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from services.kv_transfer.errors import KVTransferError
from tests.kv_transfer.conftest import PeerFactory
from tests.kv_transfer.test_two_processes import KINDS, LOCAL, PIN, REMOTE, reader


@pytest.mark.parametrize("kind", KINDS)
def test_dead_peer_fails_within_timeout(peers: PeerFactory, kind: str) -> None:
    peer = peers.start(f"--transport={kind}", PIN)

    async def body() -> None:
        kv_reader, transport = reader(kind)
        await kv_reader.pull(peer.address, REMOTE, LOCAL, "req-1", timeout_s=10)
        peer.kill()
        start = time.monotonic()
        with pytest.raises(KVTransferError):
            await kv_reader.pull(peer.address, REMOTE, LOCAL, "req-1", timeout_s=2)
        assert time.monotonic() - start < 2 + 1
        await transport.close()

    asyncio.run(body())


@pytest.mark.parametrize("kind", KINDS)
def test_stopped_peer_fails_within_timeout(peers: PeerFactory, kind: str) -> None:
    """A peer that never answers (SIGSTOP): the pull gives up at its deadline."""
    peer = peers.start(f"--transport={kind}", PIN)

    async def body() -> None:
        kv_reader, transport = reader(kind)
        await kv_reader.pull(peer.address, REMOTE, LOCAL, "req-1", timeout_s=10)
        os.kill(peer.process.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(KVTransferError, match=r"deadline|within|DEADLINE_EXCEEDED"):
                await kv_reader.pull(peer.address, REMOTE, LOCAL, "req-1", timeout_s=1.5)
            assert time.monotonic() - start < 1.5 + 1
        finally:
            os.kill(peer.process.pid, signal.SIGCONT)
        await transport.close()

    asyncio.run(body())


@pytest.mark.parametrize("kind", KINDS)
def test_unreachable_peer_fails_within_timeout(kind: str) -> None:
    async def body() -> None:
        kv_reader, transport = reader(kind)
        start = time.monotonic()
        with pytest.raises(KVTransferError, match=r"handshake with 127\.0\.0\.1:9"):
            await kv_reader.pull("127.0.0.1:9", REMOTE, LOCAL, "req-1", timeout_s=2)
        assert time.monotonic() - start < 2 + 1
        await transport.close()

    asyncio.run(body())
