"""tandem.v1.KVTransfer: the handshake every worker answers, and the byte-stream reads.

Served by every worker. Handshake tells a peer this worker's layout and how to reach its
pool (NIXL agent metadata, pool address); ReadBlocks streams pinned blocks to peers
without NIXL. Which blocks are pinned is the worker's business: it passes ``pinned``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

import grpc

from services.engine.errors import InvalidRequestError, TandemError
from services.kv_transfer import layout as kv_layout
from services.kv_transfer.errors import IncompatiblePeerError, KVTransferError
from services.kv_transfer.grpc_transport import iter_block_bytes
from services.kv_transfer.transport import KVTransport
from services.rpc.server import Servicer
from services.rpc.status import abort_with
from services.stubs.tandem.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PinCheck:
    """Whether a request holds some blocks pinned on this worker."""

    request_pinned: bool
    """False when the request holds nothing here (never pinned, released, or expired)."""
    not_pinned: tuple[int, ...] = ()
    """Asked-for block ids the request does not hold (empty when all are held)."""

    @classmethod
    def of(cls, pinned_blocks: Collection[int] | None, block_ids: Sequence[int]) -> PinCheck:
        """From the request's pinned block ids (None when it holds nothing)."""
        if pinned_blocks is None:
            return cls(request_pinned=False)
        held = set(pinned_blocks)
        return cls(True, tuple(b for b in block_ids if b not in held))


class _NotPinnedError(TandemError, LookupError):
    """The request holds no pinned blocks here (NOT_FOUND)."""

    grpc_code = "NOT_FOUND"


PinnedCallback = Callable[[str, list[int]], PinCheck | Awaitable[PinCheck]]
"""``pinned(request_id, block_ids)``: checked before streaming and again after, so a lease
that runs out during a read fails the read instead of sending reused blocks. May be async
(e.g. when the answer comes from the engine thread)."""

ServedCallback = Callable[[int], None]
"""``served(nbytes)``: called once per ReadBlocks that sent every block it was asked for
while they stayed pinned (e.g. a Prometheus counter's ``inc``)."""


class KVTransferService(worker_pb2_grpc.KVTransferServicer):
    def __init__(
        self,
        layout: worker_pb2.KVLayout,
        transport: KVTransport,
        pinned: PinnedCallback,
        worker_id: str,
        served: ServedCallback | None = None,
    ) -> None:
        """``layout``: this worker's (layout.describe, with its model id); ``transport``: the
        one this worker reads with (its pool is what ReadBlocks serves); ``served``: told the
        bytes of each read served in full."""
        kv_layout.check_same_geometry(layout, transport.layout)
        self.layout = layout
        self.worker_id = worker_id
        self.transport = transport
        self._pinned = pinned
        self._served = served

    async def Handshake(
        self, request: worker_pb2.HandshakeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.HandshakeResponse:
        try:
            kv_layout.check_compatible(self.layout, request.layout)
        except IncompatiblePeerError as e:
            log.warning("refused handshake from %r: %s", request.worker_id, e)
            await abort_with(context, e)
        try:
            await self.transport.accept(request.worker_id, request.nixl_metadata)
        except KVTransferError as e:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"nixl_metadata of {request.worker_id!r}: {e}"
            )
        response = worker_pb2.HandshakeResponse(worker_id=self.worker_id, layout=self.layout)
        (await self.transport.handshake_payload()).fill(response)
        return response

    async def ReadBlocks(
        self, request: worker_pb2.ReadBlocksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.KVChunk]:
        block_ids = list(request.block_ids)
        try:
            if request.HasField("layout"):  # this process may not be the one it handshook
                kv_layout.check_same_geometry(self.layout, request.layout)
            if not block_ids:
                raise InvalidRequestError("block_ids", "is empty: name the blocks to read")
            await self._check_pinned(request.request_id, block_ids)
            kv_layout.check_block_ids(self.layout, block_ids, "block_ids")
        except TandemError as e:
            await abort_with(context, e)
        sent = 0
        for data in iter_block_bytes(self.transport.kv, block_ids):
            yield worker_pb2.KVChunk(data=data)
            sent += len(data)
        try:
            await self._check_pinned(request.request_id, block_ids)
        except TandemError as e:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"the blocks were unpinned while being read: {e}"
            )
        # Counted only now: a read the reader must discard (unpinned under it, or cut off
        # by its deadline before here) served nothing it can use.
        if self._served is not None:
            self._served(sent)

    async def _check_pinned(self, request_id: str, block_ids: list[int]) -> None:
        check = self._pinned(request_id, block_ids)
        if inspect.isawaitable(check):
            check = await check
        if not check.request_pinned:
            raise _NotPinnedError(
                f"request {request_id!r} holds no pinned blocks here (released, expired, "
                "or never prefilled on this worker)"
            )
        if check.not_pinned:
            raise InvalidRequestError(
                "block_ids",
                f"block {check.not_pinned[0]} is not pinned by request {request_id!r}",
            )


def servicer(
    layout: worker_pb2.KVLayout,
    transport: KVTransport,
    pinned: PinnedCallback,
    worker_id: str,
    served: ServedCallback | None = None,
) -> Servicer:
    """KVTransfer ready to mount with services.rpc.server.start_server."""
    return Servicer(
        impl=KVTransferService(layout, transport, pinned, worker_id, served),
        add_to_server=worker_pb2_grpc.add_KVTransferServicer_to_server,
        service_name=worker_pb2.DESCRIPTOR.services_by_name["KVTransfer"].full_name,
    )
