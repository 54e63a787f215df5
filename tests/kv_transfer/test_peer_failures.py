"""Pulls from a peer process that died, stopped answering, or never existed: each ends in
KVTransferError within its timeout (plus 1 s), never a hang; a NIXL READ abandoned at its
deadline leaves the transport working."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import pytest

from services.kv_transfer.errors import KVTransferError
from tests.kv_transfer.conftest import PeerFactory, needs_nixl
from tests.kv_transfer.test_two_processes import (
    KINDS,
    LOCAL,
    PIN,
    REMOTE,
    expected,
    pulled,
    reader,
)


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
    """A peer that never answers (SIGSTOP): the gRPC pull gives up at its deadline. A NIXL
    READ may instead complete, when UCX moves it without the peer (CMA reads a stopped
    process's memory): then the bytes must be right. Either way, within the deadline."""
    peer = peers.start(f"--transport={kind}", "--seed=12", PIN)

    async def body() -> None:
        kv_reader, transport = reader(kind)
        await kv_reader.pull(peer.address, REMOTE, LOCAL, "req-1", timeout_s=10)
        transport.kv.tensor.zero_()
        os.kill(peer.process.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            try:
                await kv_reader.pull(peer.address, REMOTE, LOCAL, "req-1", timeout_s=1.5)
            except KVTransferError as e:
                assert re.search(r"deadline|within|DEADLINE_EXCEEDED", str(e)), e
            else:
                assert kind == "nixl", "a gRPC pull from a stopped peer cannot succeed"
                assert pulled(transport) == expected(12, REMOTE)
            assert time.monotonic() - start < 1.5 + 1
        finally:
            os.kill(peer.process.pid, signal.SIGCONT)
        await transport.close()

    asyncio.run(body())


@needs_nixl
def test_a_nixl_read_past_its_deadline_is_abandoned_and_the_next_one_works(
    peers: PeerFactory,
) -> None:
    peer = peers.start("--transport=nixl", "--seed=13", PIN)

    async def body() -> None:
        kv_reader, transport = reader("nixl")
        await kv_reader.pull(peer.address, REMOTE, LOCAL, "req-1", timeout_s=10)
        transport.kv.tensor.zero_()
        with pytest.raises(KVTransferError, match="did not finish within"):
            await kv_reader.pull(peer.address, REMOTE, LOCAL, "req-1", timeout_s=0.0)
        await kv_reader.pull(peer.address, REMOTE, LOCAL, "req-1", timeout_s=10)
        assert pulled(transport) == expected(13, REMOTE)
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


@needs_nixl
def test_pulls_started_during_a_re_handshake_wait_for_it(
    peers: PeerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer restarted at the same address; one pull failed on the old agent and is
    handshaking again (slowly: another host). Pulls starting meanwhile wait for that
    handshake and use its answer: one handshake, not one each (a shortcut past the
    per-peer lock sent them to the dead agent, and each then handshook in turn, 21 for 21
    pulls, some past their deadline)."""
    from services.kv_transfer import client

    handshakes = []
    real = client.handshake

    async def slow_handshake(*args: object, **kwargs: object) -> object:
        handshakes.append(args[0])
        await asyncio.sleep(0.05)
        return await real(*args, **kwargs)

    pin = "--pin=req-h=" + ",".join(map(str, range(1, 22)))
    first = peers.start("--transport=nixl", "--seed=21", pin)

    async def body() -> None:
        kv_reader, transport = reader("nixl")
        await kv_reader.pull(first.address, [1], [1], "req-h", timeout_s=5)
        first.kill()
        await asyncio.to_thread(
            peers.start, "--transport=nixl", "--seed=22", f"--port={first.port}", pin
        )
        monkeypatch.setattr(client, "handshake", slow_handshake)
        failing = asyncio.create_task(kv_reader.pull(first.address, [1], [1], "req-h", 5))
        await asyncio.sleep(0.02)  # it failed on the old agent and is handshaking again
        rest = [kv_reader.pull(first.address, [i], [i], "req-h", 5) for i in range(2, 22)]
        moved = await asyncio.gather(failing, *rest)
        assert moved == [128 * 1024] * 21
        assert len(handshakes) == 1
        await transport.close()

    asyncio.run(body())
