"""KV pool layout: block spans are exactly where a block's bytes live in the tensor's storage."""

from __future__ import annotations

import pytest
import torch

from services.engine.kv_cache import ByteSpan, KVCache, block_runs

LAYERS, BLOCKS, BS, HEADS, DIM = 3, 10, 4, 2, 8


@pytest.mark.parametrize(
    ("ids", "runs"),
    [
        ([], []),
        ([5], [(5, 1)]),
        ([0, 1, 2, 3], [(0, 4)]),
        ([3, 4, 5, 9, 1, 2], [(3, 3), (9, 1), (1, 2)]),
        ([4, 3, 2], [(4, 1), (3, 1), (2, 1)]),  # only ascending neighbours merge
        ([7, 7], [(7, 1), (7, 1)]),
    ],
)
def test_block_runs_merge_consecutive_ids_in_order(
    ids: list[int], runs: list[tuple[int, int]]
) -> None:
    assert block_runs(ids) == runs


def make_cache(dtype: torch.dtype) -> KVCache:
    return KVCache(LAYERS, BLOCKS, BS, HEADS, DIM, dtype, layout="layer-major")


def test_shape_and_sizes() -> None:
    cache = make_cache(torch.bfloat16)
    assert cache.tensor.shape == (LAYERS, 2, BLOCKS * BS, HEADS, DIM)
    assert cache.tensor.is_contiguous()
    per_token = KVCache.bytes_per_token(LAYERS, HEADS, DIM, torch.bfloat16)
    assert per_token == LAYERS * 2 * HEADS * DIM * 2
    assert cache.bytes_per_block == per_token * BS
    k, v = cache.layer(1)
    assert k.shape == v.shape == (BLOCKS * BS, HEADS, DIM)
    assert k.data_ptr() == cache.tensor[1, 0].data_ptr()


def test_block_spans_offsets_and_lengths() -> None:
    cache = make_cache(torch.float16)
    block = BS * HEADS * DIM * 2  # bytes of one block in one plane
    plane = BLOCKS * block
    spans = cache.block_spans([3, 4, 5, 9])
    # One span per (run, plane): runs in order, planes (layer, K/V) in storage order.
    assert spans == [ByteSpan(p * plane + 3 * block, 3 * block) for p in range(2 * LAYERS)] + [
        ByteSpan(p * plane + 9 * block, block) for p in range(2 * LAYERS)
    ]
    assert sum(s.length for s in spans) == 4 * cache.bytes_per_block
    assert cache.block_spans([]) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_spans_read_back_exactly_the_blocks_written(dtype: torch.dtype) -> None:
    cache = make_cache(dtype)
    blocks = [7, 2, 3, 4, 0]
    # A distinct value per (layer, K/V, block, slot, head, dim) element of the chosen blocks.
    for n, b in enumerate(blocks):
        slots = slice(b * BS, (b + 1) * BS)
        values = torch.arange(LAYERS * 2 * BS * HEADS * DIM, dtype=torch.float32)
        values = (values % 251 + 1 + 256 * n).reshape(LAYERS, 2, BS, HEADS, DIM)
        cache.tensor[:, :, slots] = values.to(dtype)
    raw = cache.tensor.view(-1).view(torch.uint8)
    assert raw.numel() == cache.tensor.numel() * cache.tensor.element_size()

    got = b"".join(
        bytes(raw[s.offset : s.offset + s.length].tolist()) for s in cache.block_spans(blocks)
    )
    # The same bytes gathered from the tensor: run by run, then plane by plane.
    want = []
    for start, count in block_runs(blocks):
        for layer in range(LAYERS):
            for kv in range(2):
                part = cache.tensor[layer, kv, start * BS : (start + count) * BS].contiguous()
                want.append(bytes(part.view(-1).view(torch.uint8).tolist()))
    assert got == b"".join(want)
    # And nothing outside the written blocks is covered: all of it is still zero.
    covered = torch.zeros(raw.numel(), dtype=torch.bool)
    for s in cache.block_spans(blocks):
        covered[s.offset : s.offset + s.length] = True
    assert int(raw[~covered].count_nonzero()) == 0
    assert bool((raw[covered] != 0).any())


def test_a_span_round_trip_moves_a_block_between_pools() -> None:
    """What a KV transfer does: copy one pool's spans into another pool's spans."""
    src, dst = make_cache(torch.bfloat16), make_cache(torch.bfloat16)
    src.tensor.normal_(generator=torch.Generator().manual_seed(0))
    src_raw = src.tensor.view(-1).view(torch.uint8)
    dst_raw = dst.tensor.view(-1).view(torch.uint8)
    for s, d in zip(src.block_spans([1, 2]), dst.block_spans([6, 7]), strict=True):
        assert s.length == d.length
        dst_raw[d.offset : d.offset + d.length] = src_raw[s.offset : s.offset + s.length]
    torch.testing.assert_close(dst.tensor[:, :, 6 * BS : 8 * BS], src.tensor[:, :, BS : 3 * BS])
    assert int(dst.tensor[:, :, : 6 * BS].count_nonzero()) == 0


def test_slot_major_keeps_a_slot_of_every_layer_together() -> None:
    cache = KVCache(LAYERS, BLOCKS, BS, HEADS, DIM, torch.bfloat16, layout="slot-major")
    assert cache.tensor.shape == (BLOCKS * BS, LAYERS, 2, HEADS, DIM)
    assert cache.tensor.is_contiguous()
    assert cache.bytes_per_block == make_cache(torch.bfloat16).bytes_per_block
    k, v = cache.layer(1)
    assert k.shape == v.shape == (BLOCKS * BS, HEADS, DIM)
    k[5], v[5] = 1.0, 2.0  # what the model's index_copy_ into a layer's view does
    assert bool(cache.tensor[5, 1, 0].eq(1).all()) and bool(cache.tensor[5, 1, 1].eq(2).all())
    assert int(cache.tensor.count_nonzero()) == 2 * HEADS * DIM
    # A run of blocks is one span, whatever the number of layers.
    block = cache.bytes_per_block
    assert cache.num_planes == 1
    assert cache.block_spans([3, 4, 5, 9]) == [
        ByteSpan(3 * block, 3 * block),
        ByteSpan(9 * block, block),
    ]


@pytest.mark.parametrize("layout", ["layer-major", "slot-major"])
def test_planes_view_holds_each_blocks_bytes(layout: str) -> None:
    """planes()[:, b] is block b in every plane: what the byte-stream transport moves."""
    src = KVCache(LAYERS, BLOCKS, BS, HEADS, DIM, torch.float32, layout=layout)
    dst = KVCache(LAYERS, BLOCKS, BS, HEADS, DIM, torch.float32, layout=layout)
    src.tensor.normal_(generator=torch.Generator().manual_seed(1))
    dst.planes()[:, 6:8] = src.planes()[:, 1:3]
    for layer in range(LAYERS):
        for got, want in zip(dst.layer(layer), src.layer(layer), strict=True):
            torch.testing.assert_close(got[6 * BS : 8 * BS], want[BS : 3 * BS])
            assert int(got[: 6 * BS].count_nonzero()) == 0


def test_an_unknown_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="'block-major' is not one of"):
        KVCache(LAYERS, BLOCKS, BS, HEADS, DIM, torch.float32, layout="block-major")  # type: ignore[arg-type]
