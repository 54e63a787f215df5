"""The reading side: handshake with peers once, then pull blocks, reconnecting on restart.

``KVReader`` is what a decode worker holds: one per worker, shared by all requests.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence

import grpc

from services.kv_transfer import layout as kv_layout
from services.kv_transfer.errors import IncompatiblePeerError, KVTransferError
from services.kv_transfer.transport import KVTransport, PeerInfo
from services.rpc.server import client_channel
from services.rpc.tls import TlsConfig
from services.stubs.tandem.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

MAX_PEERS = 256
"""Peers a reader keeps connected: past it, the one read from least recently (and not being
read from) is disconnected. Prefill workers come and go at new addresses (a Kubernetes pod
restarts at a new IP); without a bound every address ever read from kept its handshake, its
NIXL agent and its channels for the worker's life."""


async def handshake(
    address: str,
    worker_id: str,
    layout: worker_pb2.KVLayout,
    transport: KVTransport,
    timeout_s: float,
    tls: TlsConfig | None = None,
) -> PeerInfo:
    """Call ``address``'s KVTransfer.Handshake with this worker's layout and NIXL metadata.

    Raises IncompatiblePeerError when either side finds the layouts incompatible,
    KVTransferError when the peer cannot be reached within ``timeout_s``. ``tls``: dial with
    this identity and CA (None: plaintext).
    """
    payload = await transport.handshake_payload()
    request = worker_pb2.HandshakeRequest(
        worker_id=worker_id, layout=layout, nixl_metadata=payload.nixl_metadata
    )
    async with client_channel(address, tls=tls) as channel:
        try:
            response = await worker_pb2_grpc.KVTransferStub(channel).Handshake(
                request, timeout=timeout_s
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise IncompatiblePeerError(f"peer at {address}: {e.details()}") from None
            raise KVTransferError(
                f"handshake with {address} failed: {e.code().name}: {e.details()}",
                peer_code=e.code().name,
            ) from None
    kv_layout.check_compatible(layout, response.layout)
    return PeerInfo.from_handshake(address, response)


class KVReader:
    """Pulls blocks from peers by address, handshaking and connecting once per peer.

    A pull that fails on a connection made earlier (the peer may have restarted with a
    new agent) handshakes again and retries once within the same deadline.
    """

    def __init__(
        self,
        worker_id: str,
        layout: worker_pb2.KVLayout,
        transport: KVTransport,
        tls: TlsConfig | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.layout = layout
        self.transport = transport
        self.tls = tls
        """This worker's identity and the peers' CA for handshakes (and, via the decode
        service, ReleaseKV); None: plaintext."""
        self._peers: dict[str, PeerInfo] = {}  # least recently read from first
        self._locks: dict[str, asyncio.Lock] = {}
        self._reading: collections.Counter[str] = collections.Counter()
        self.max_peers = MAX_PEERS

    async def peer(self, address: str, timeout_s: float, refresh: bool = False) -> PeerInfo:
        """The connected peer at ``address``; handshakes first when new or ``refresh``."""
        async with self._locks.setdefault(address, asyncio.Lock()):
            known = self._peers.get(address)
            if known is not None and not refresh:
                return known
            peer = await handshake(
                address, self.worker_id, self.layout, self.transport, timeout_s, self.tls
            )
            await self.transport.connect(peer)
            self._peers[address] = peer
        await self._forget_beyond_bound()
        return peer

    async def _forget_beyond_bound(self) -> None:
        """Disconnect the least recently read peers past ``max_peers`` (not one being read
        from, nor one whose handshake is under way)."""
        while len(self._peers) > self.max_peers:
            address = next((a for a in self._peers if self._idle(a)), None)
            if address is None:
                return  # every one is in use: try again after the next handshake
            self.forget(address)
            await self.transport.disconnect(address)

    def _idle(self, address: str) -> bool:
        """No pull from ``address`` is running and no handshake with it is under way."""
        lock = self._locks.get(address)
        return not self._reading[address] and (lock is None or not lock.locked())

    async def pull(
        self,
        address: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        request_id: str,
        timeout_s: float,
    ) -> int:
        """Read ``remote_block_ids`` of ``request_id`` at ``address`` into ``local_block_ids``.

        Returns the bytes moved; raises KVTransferError (or IncompatiblePeerError) within
        about ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        self._reading[address] += 1
        if address in self._peers:  # the most recently read from last
            self._peers[address] = self._peers.pop(address)
        try:
            # One bound for all of it: waiting for another pull's handshake with the same
            # peer (the lock in ``peer``) counts too, else N concurrent pulls from a peer
            # that never answers took N times their timeout.
            async with asyncio.timeout(max(0.0, timeout_s)):
                return await self._pull(
                    address, remote_block_ids, local_block_ids, request_id, deadline
                )
        except TimeoutError:
            raise KVTransferError(
                f"pull of {request_id!r} from {address} did not finish within {timeout_s:.3g} s"
            ) from None
        finally:
            self._reading[address] -= 1
            if not self._reading[address]:
                del self._reading[address]

    async def _pull(
        self,
        address: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        request_id: str,
        deadline: float,
    ) -> int:
        fresh = address not in self._peers
        peer = await self.peer(address, _left(deadline))
        try:
            return await self.transport.pull(
                peer, remote_block_ids, local_block_ids, request_id, _left(deadline)
            )
        except KVTransferError as e:
            if fresh or e.peer_code is not None or _left(deadline) <= 0:
                raise
            log.info("pull from %s failed (%s); handshaking again", peer, e)
        peer = await self.peer(address, _left(deadline), refresh=True)
        return await self.transport.pull(
            peer, remote_block_ids, local_block_ids, request_id, _left(deadline)
        )

    def forget(self, address: str) -> None:
        """Drop what is known about ``address``: the next pull from it handshakes again."""
        self._peers.pop(address, None)
        lock = self._locks.get(address)
        if lock is not None and not lock.locked():
            del self._locks[address]


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
