"""Shared by the KV transfer tests: pools with the tandem-tiny geometry, known contents."""

from __future__ import annotations

import torch

from services.engine.kv_cache import KVCache, KVLayoutName
from services.kv_transfer import layout as kv_layout
from services.stubs.tandem.v1 import worker_pb2

MODEL_ID = "tandem-tiny"
TINY = dict(num_layers=8, block_size=16, num_kv_heads=4, head_dim=64, dtype=torch.bfloat16)
"""tandem-tiny's KV geometry: 8 KiB per token, 128 KiB per block."""


def make_kv(num_blocks: int, block_size: int = 16, layout: KVLayoutName = "slot-major") -> KVCache:
    return KVCache(num_blocks=num_blocks, **{**TINY, "block_size": block_size}, layout=layout)


def blocks_kv(kv: KVCache, first: int, count: int = 1) -> torch.Tensor:
    """Blocks ``first ..< first + count`` as ``[layers, 2, slots, heads, dim]`` whatever the
    pool's layout (a view: writing it writes the pool)."""
    slots = slice(first * kv.block_size, (first + count) * kv.block_size)
    if kv.layout == "layer-major":
        return kv.tensor[:, :, slots]
    return kv.tensor[slots].permute(1, 2, 0, 3, 4)


def pool_bytes(kv: KVCache) -> torch.Tensor:
    """The pool's storage as a flat uint8 view."""
    return kv.tensor.view(-1).view(torch.uint8)


def pattern(num_blocks: int, seed: int, block_size: int = 16) -> torch.Tensor:
    """Seeded random bytes for a whole pool of ``num_blocks`` (what a peer fills its pool with)."""
    kv = make_kv(num_blocks, block_size)
    g = torch.Generator().manual_seed(seed)
    n = pool_bytes(kv).numel()
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def fill_pattern(kv: KVCache, seed: int) -> None:
    pool_bytes(kv).copy_(pattern(kv.num_blocks, seed, kv.block_size))


def layout_of(kv: KVCache, model_id: str = MODEL_ID) -> worker_pb2.KVLayout:
    return kv_layout.describe(kv, model_id)


def block_bytes(storage: torch.Tensor, layout: worker_pb2.KVLayout, block_ids: list[int]) -> bytes:
    """Concatenated bytes of ``block_ids`` read from raw storage at the layout's offsets."""
    return b"".join(
        storage[o : o + n].numpy().tobytes()
        for o, n in kv_layout.block_span_offsets(layout, block_ids)
    )
