"""The interface every KV transport implements, and what a peer tells us at the handshake.

Lifecycle on the reading (decode) side, per peer::

    peer = await handshake(address, ...)         # client.py: the Handshake RPC
    await transport.connect(peer)                # once per peer (again after it restarts)
    n = await transport.pull(peer, remote_ids, local_ids, request_id, timeout_s)

On the serving (prefill) side the transport only answers: its ``handshake_payload`` goes
into the Handshake response and ``accept`` takes the caller's metadata. Both sides call
``close`` once when the worker stops.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import ClassVar

from services.engine.kv_cache import KVCache
from services.kv_transfer import layout as kv_layout
from services.stubs.tandem.v1 import worker_pb2


@dataclass(frozen=True)
class HandshakePayload:
    """The transport's part of a HandshakeResponse; all empty/zero for the gRPC transport."""

    nixl_metadata: bytes = b""
    nixl_agent: str = ""
    pool_address: int = 0
    pool_bytes: int = 0
    memory_type: str = ""
    device_id: int = 0

    def fill(self, response: worker_pb2.HandshakeResponse) -> None:
        response.nixl_metadata = self.nixl_metadata
        response.nixl_agent = self.nixl_agent
        response.pool_address = self.pool_address
        response.pool_bytes = self.pool_bytes
        response.memory_type = self.memory_type
        response.device_id = self.device_id


@dataclass(frozen=True)
class PeerInfo:
    """Everything needed to read from one peer, as its Handshake answered."""

    address: str
    """host:port serving the peer's KVTransfer."""
    worker_id: str
    layout: worker_pb2.KVLayout
    nixl_metadata: bytes
    """Empty when the peer has no NIXL: read with ReadBlocks instead."""
    nixl_agent: str
    pool_address: int
    pool_bytes: int
    memory_type: str
    device_id: int

    @classmethod
    def from_handshake(cls, address: str, response: worker_pb2.HandshakeResponse) -> PeerInfo:
        layout = worker_pb2.KVLayout()
        layout.CopyFrom(response.layout)
        return cls(
            address=address,
            worker_id=response.worker_id,
            layout=layout,
            nixl_metadata=response.nixl_metadata,
            nixl_agent=response.nixl_agent,
            pool_address=response.pool_address,
            pool_bytes=response.pool_bytes,
            memory_type=response.memory_type,
            device_id=response.device_id,
        )

    @property
    def has_nixl(self) -> bool:
        return bool(self.nixl_metadata)

    def __str__(self) -> str:
        return f"worker {self.worker_id!r} at {self.address}"


class KVTransport(abc.ABC):
    """Moves KV blocks from a peer's pool into this worker's pool (``kv``)."""

    name: ClassVar[str]
    """"nixl" or "grpc"."""

    def __init__(self, kv: KVCache) -> None:
        self.kv = kv
        self.layout = kv_layout.describe(kv, model_id="")
        """Local geometry (no model id): what local byte offsets are computed from."""
        self.on_unreleased: Callable[[list[int], Future[None]], None] | None = None
        """Told when a pull ends while its transfer may still write its local blocks (the
        agent did not release it in time): the pool's owner keeps those blocks out of use
        until the future resolves, since freeing them would let the transfer write into
        another request's KV. None: it is only logged."""

    @abc.abstractmethod
    async def handshake_payload(self) -> HandshakePayload:
        """What peers need to read from this worker. Side-effect free; may be called often."""

    async def accept(self, worker_id: str, nixl_metadata: bytes) -> None:
        """Take a caller's NIXL metadata from its Handshake (its agent then knows ours both ways).

        Called once per Handshake; a caller that restarted replaces its stale entry.
        No-op for transports without NIXL.
        """
        return None

    @abc.abstractmethod
    async def connect(self, peer: PeerInfo) -> None:
        """Prepare to read from ``peer``. Called once per peer, before any pull from it.

        Calling it again for the same address with a new PeerInfo (the peer restarted)
        replaces the stale connection; with the same PeerInfo it changes nothing.
        Raises IncompatiblePeerError when this transport cannot read from the peer,
        KVTransferError when the peer cannot be reached.
        """

    async def disconnect(self, address: str) -> None:  # noqa: B027 - most hold nothing
        """Drop the connection to the peer at ``address`` (the reader forgets peers it has
        not read from in a while: prefill workers come and go at new addresses). Only
        called with no pull from it in progress; a later ``connect`` starts afresh."""

    @abc.abstractmethod
    async def pull(
        self,
        peer: PeerInfo,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        request_id: str,
        timeout_s: float,
    ) -> int:
        """Copy ``remote_block_ids[i]`` on the peer into ``local_block_ids[i]`` here.

        The remote blocks must be pinned under ``request_id`` on the peer. Returns the bytes
        moved. Raises KVTransferError on any failure and when ``timeout_s`` runs out: it
        always returns or raises within about ``timeout_s``. Raises InvalidRequestError,
        before moving anything, for lists of different lengths or ids outside either pool
        or repeated. Concurrent pulls are allowed when their local blocks differ.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every peer and registration. Called once, when the worker stops."""
