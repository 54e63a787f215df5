"""The byte stream's gather (server) and scatter (client) against layout.py's wire order."""

from __future__ import annotations

import pytest
import torch

from services.kv_transfer.errors import KVTransferError
from services.kv_transfer.grpc_transport import BlockWriter, iter_block_bytes
from tests.kv_transfer.helpers import block_bytes, fill_pattern, layout_of, make_kv, pool_bytes


@pytest.mark.parametrize("chunk_bytes", [4 * 2**20, 100_000, 128 * 1024])
def test_iter_block_bytes_is_the_wire_order(chunk_bytes: int) -> None:
    kv = make_kv(64)
    fill_pattern(kv, seed=3)
    ids = [3, 4, 5, 9, 0, 63]
    chunks = list(iter_block_bytes(kv, ids, chunk_bytes))
    assert all(len(c) <= chunk_bytes for c in chunks)
    assert b"".join(chunks) == block_bytes(pool_bytes(kv), layout_of(kv), ids)


@pytest.mark.parametrize(("piece", "stage_bytes"), [(1000, 4 * 2**20), (300_001, 128 * 1024)])
def test_block_writer_scatters_any_chunking(piece: int, stage_bytes: int) -> None:
    src, dst = make_kv(64), make_kv(80)
    fill_pattern(src, seed=4)
    remote_ids, local_ids = [3, 4, 5, 9], [10, 11, 12, 40]
    data = block_bytes(pool_bytes(src), layout_of(src), remote_ids)
    writer = BlockWriter(dst, local_ids, stage_bytes)
    for i in range(0, len(data), piece):
        writer.feed(data[i : i + piece])
    assert writer.finish() == len(data) == 4 * 128 * 1024
    assert block_bytes(pool_bytes(dst), layout_of(dst), local_ids) == data
    untouched = [b for b in range(80) if b not in local_ids]
    assert not any(block_bytes(pool_bytes(dst), layout_of(dst), untouched))


def test_block_writer_counts_bytes() -> None:
    kv = make_kv(8)
    short = BlockWriter(kv, [1, 2])
    short.feed(bytes(kv.bytes_per_block))
    with pytest.raises(KVTransferError, match="sent 131072 bytes, 2 blocks are 262144"):
        short.finish()
    long = BlockWriter(kv, [1])
    with pytest.raises(KVTransferError, match="more than the 131072 bytes"):
        long.feed(bytes(kv.bytes_per_block + 1))


def test_bf16_values_survive() -> None:
    src, dst = make_kv(4), make_kv(4)
    src.tensor.copy_(torch.randn(src.tensor.shape))
    writer = BlockWriter(dst, [0, 1, 2, 3])
    for chunk in iter_block_bytes(src, [0, 1, 2, 3], chunk_bytes=77_777):
        writer.feed(chunk)
    writer.finish()
    assert torch.equal(src.tensor, dst.tensor)
