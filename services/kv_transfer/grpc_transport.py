"""The byte-stream KV transport, for hosts without NIXL: KVTransfer.ReadBlocks over gRPC.

Both ends move whole blocks in the wire order of layout.py (block-major, plane-minor),
one strided copy per run of consecutive block ids, never a Python loop per span: the
server copies ``[planes, run, span]`` slices of the pool into a ``[blocks, planes, span]``
buffer and sends its bytes; the client stages what arrives in a bounded buffer and copies
it back run by run. (Slice copies of runs are 2-6x faster here than advanced indexing.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

import grpc
import numpy as np
import torch

from services.engine.kv_cache import KVCache, block_runs
from services.kv_transfer import layout as kv_layout
from services.kv_transfer.errors import KVTransferError
from services.kv_transfer.transport import HandshakePayload, KVTransport, PeerInfo
from services.rpc.server import client_channel
from services.rpc.tls import TlsConfig
from services.stubs.tandem.v1 import worker_pb2, worker_pb2_grpc

CHUNK_BYTES = 4 * 2**20
"""Bytes per KVChunk (and per staging buffer): large enough that per-message cost is
small, far below the 64 MiB message limit of services/rpc/server.py."""


def iter_block_bytes(
    kv: KVCache, block_ids: Sequence[int], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[bytes]:
    """The bytes of ``block_ids`` in wire order, in pieces of at most ``chunk_bytes``.

    Reads the pool lazily, a group of blocks at a time, so the caller must keep the blocks
    pinned until the iterator is exhausted. Ids must be valid (layout.check_block_ids).
    """
    planes = kv.planes()
    per_group = max(1, chunk_bytes // kv.bytes_per_block)
    for start in range(0, len(block_ids), per_group):
        ids = list(block_ids[start : start + per_group])
        group = planes.new_empty((len(ids), planes.shape[0], planes.shape[2]))  # [n, planes, span]
        i = 0
        for first, count in block_runs(ids):
            group[i : i + count].copy_(planes[:, first : first + count].transpose(0, 1))
            i += count
        data = group.cpu().view(torch.uint8).numpy().tobytes()
        for offset in range(0, len(data), chunk_bytes):
            yield data[offset : offset + chunk_bytes]


class BlockWriter:
    """Scatters wire-order bytes of ``block_ids`` into the pool as they arrive.

    Holds at most ``stage_bytes`` (rounded up to whole blocks) of them at a time.
    """

    def __init__(self, kv: KVCache, block_ids: Sequence[int], stage_bytes: int = CHUNK_BYTES):
        self._kv = kv
        self._planes = kv.planes()
        self._block_bytes = kv.bytes_per_block
        self._ids = list(block_ids)
        self.expected_bytes = len(self._ids) * self._block_bytes
        per_stage = max(1, min(len(self._ids), stage_bytes // self._block_bytes))
        self._stage = torch.empty(per_stage * self._block_bytes, dtype=torch.uint8)
        self._stage_np = self._stage.numpy()
        self._filled = 0
        self._blocks_written = 0
        self.received_bytes = 0

    def feed(self, data: bytes) -> None:
        if self.received_bytes + len(data) > self.expected_bytes:
            raise KVTransferError(
                f"the peer sent more than the {self.expected_bytes} bytes of "
                f"{len(self._ids)} blocks"
            )
        self.received_bytes += len(data)
        view = memoryview(data)
        while view:
            n = min(len(view), len(self._stage_np) - self._filled)
            self._stage_np[self._filled : self._filled + n] = np.frombuffer(view[:n], np.uint8)
            self._filled += n
            view = view[n:]
            if self._filled == len(self._stage_np):
                self._flush()

    def finish(self) -> int:
        """Write what is staged; raise KVTransferError unless every byte arrived."""
        if self.received_bytes != self.expected_bytes:
            raise KVTransferError(
                f"the peer sent {self.received_bytes} bytes, {len(self._ids)} blocks are "
                f"{self.expected_bytes}"
            )
        self._flush()
        return self.received_bytes

    def _flush(self) -> None:
        count = self._filled // self._block_bytes
        if count == 0:
            return
        ids = self._ids[self._blocks_written : self._blocks_written + count]
        src = self._stage[: count * self._block_bytes].view(self._kv.tensor.dtype)
        src = src.view(count, self._planes.shape[0], -1).to(self._kv.tensor.device)
        i = 0
        for first, run in block_runs(ids):
            self._planes[:, first : first + run].copy_(src[i : i + run].transpose(0, 1))
            i += run
        self._blocks_written += count
        self._filled = 0


class GrpcTransport(KVTransport):
    """Reads blocks with the peer's KVTransfer.ReadBlocks stream; one channel per peer."""

    name = "grpc"

    def __init__(
        self, kv: KVCache, chunk_bytes: int = CHUNK_BYTES, tls: TlsConfig | None = None
    ) -> None:
        super().__init__(kv)
        self.chunk_bytes = chunk_bytes
        self._tls = tls  # peers' CA and this worker's identity (mTLS); None: plaintext
        self._peers: dict[str, tuple[PeerInfo, grpc.aio.Channel]] = {}

    async def handshake_payload(self) -> HandshakePayload:
        return HandshakePayload()

    async def connect(self, peer: PeerInfo) -> None:
        kv_layout.check_same_geometry(self.layout, peer.layout)
        old = self._peers.get(peer.address)
        if old is not None and old[0] == peer:
            return
        self._peers[peer.address] = (peer, client_channel(peer.address, tls=self._tls))
        if old is not None:
            await old[1].close()

    async def disconnect(self, address: str) -> None:
        entry = self._peers.pop(address, None)
        if entry is not None:
            await entry[1].close()

    async def pull(
        self,
        peer: PeerInfo,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        request_id: str,
        timeout_s: float,
    ) -> int:
        kv_layout.paired_spans(self.layout, local_block_ids, peer.layout, remote_block_ids)
        entry = self._peers.get(peer.address)
        if entry is None or entry[0] != peer:
            raise KVTransferError(f"not connected to {peer}: call connect(peer) first")
        if not remote_block_ids:
            return 0
        writer = BlockWriter(self.kv, local_block_ids, self.chunk_bytes)
        stub = worker_pb2_grpc.KVTransferStub(entry[1])
        request = worker_pb2.ReadBlocksRequest(
            request_id=request_id, block_ids=list(remote_block_ids), layout=self.layout
        )
        call = stub.ReadBlocks(request, timeout=timeout_s)
        try:
            async for chunk in call:
                writer.feed(chunk.data)
            return writer.finish()
        except grpc.aio.AioRpcError as e:
            raise KVTransferError(
                f"reading {len(remote_block_ids)} blocks of {request_id!r} from {peer} "
                f"failed: {e.code().name}: {e.details()}",
                peer_code=e.code().name,
            ) from None
        except KVTransferError as e:
            raise KVTransferError(f"reading {request_id!r} from {peer}: {e}") from None
        finally:
            call.cancel()  # a no-op once the stream has ended

    async def close(self) -> None:
        peers, self._peers = self._peers, {}
        await asyncio.gather(*(channel.close() for _, channel in peers.values()))
