"""layout.py against the real storage of KVCache tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.engine.errors import InvalidRequestError
from services.engine.kv_cache import KVCache
from services.kv_transfer import layout as kv_layout
from services.kv_transfer.errors import IncompatiblePeerError
from tests.kv_transfer import helpers
from tests.kv_transfer.helpers import MODEL_ID, TINY, blocks_kv, layout_of, pool_bytes


def make_kv(num_blocks: int, block_size: int = 16, layout: str = "layer-major") -> KVCache:
    """Layer-major unless asked: most tests here check the 16-plane arithmetic, which the
    one-plane slot-major order (the workers' default) reduces to its own tests below."""
    return helpers.make_kv(num_blocks, block_size, layout)  # type: ignore[arg-type]


LAYOUTS = pytest.mark.parametrize("pool_layout", ["layer-major", "slot-major"])


def test_describe_tiny() -> None:
    layout = layout_of(make_kv(64))
    assert layout.protocol_version == kv_layout.PROTOCOL_VERSION == 1
    assert layout.layout == kv_layout.LAYOUT_NAMES["layer-major"] == "layer-kv-slot-head-dim"
    assert kv_layout.num_planes(layout) == 16
    assert (layout.model_id, layout.dtype, layout.block_size) == (MODEL_ID, "bfloat16", 16)
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim) == (8, 4, 64)
    assert layout.num_blocks == 64
    assert kv_layout.span_bytes(layout) == 16 * 4 * 64 * 2
    assert kv_layout.block_bytes(layout) == make_kv(64).bytes_per_block == 128 * 1024
    assert kv_layout.pool_bytes(layout) == pool_bytes(make_kv(64)).numel()


def test_describe_slot_major() -> None:
    """A slot-major pool is one plane: a block's span is the whole block."""
    kv = make_kv(64, layout="slot-major")
    layout = layout_of(kv)
    assert layout.layout == "slot-layer-kv-head-dim"
    assert kv_layout.num_planes(layout) == kv.num_planes == 1
    assert kv_layout.span_bytes(layout) == kv_layout.block_bytes(layout) == 128 * 1024
    assert kv.bytes_per_block == 128 * 1024
    assert kv_layout.pool_bytes(layout) == pool_bytes(kv).numel()


def test_pools_of_different_orders_are_refused_naming_the_flag() -> None:
    local = layout_of(make_kv(64))
    remote = layout_of(make_kv(64, layout="slot-major"))
    with pytest.raises(IncompatiblePeerError, match=r"differ in layout.*same --kv-layout"):
        kv_layout.check_compatible(local, remote)
    assert not kv_layout.compatible(local, remote)
    assert kv_layout.compatible(remote, layout_of(make_kv(80, layout="slot-major")))
    with pytest.raises(IncompatiblePeerError, match="layout"):
        kv_layout.paired_spans(local, [1], remote, [1])


def test_an_unknown_order_is_refused() -> None:
    layout = layout_of(make_kv(8))
    layout.layout = "block-layer-kv"
    with pytest.raises(IncompatiblePeerError, match="'block-layer-kv' is not one of"):
        kv_layout.span_bytes(layout)


def test_num_blocks_may_differ() -> None:
    kv_layout.check_compatible(layout_of(make_kv(64)), layout_of(make_kv(80)))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("protocol_version", 2),
        ("model_id", "other-model"),
        ("block_size", 32),
        ("dtype", "float16"),
        ("layout", "block-layer-kv"),
        ("num_layers", 16),
        ("num_kv_heads", 8),
        ("head_dim", 128),
    ],
)
def test_first_difference_is_named(field: str, value: object) -> None:
    local = layout_of(make_kv(64))
    remote = layout_of(make_kv(80))
    setattr(remote, field, value)
    with pytest.raises(IncompatiblePeerError) as e:
        kv_layout.check_compatible(local, remote)
    message = str(e.value)
    assert f"differ in {field}" in message
    assert repr(getattr(local, field)) in message and repr(value) in message
    assert IncompatiblePeerError.grpc_code == "FAILED_PRECONDITION"


def test_protocol_version_is_reported_before_block_size() -> None:
    remote = layout_of(make_kv(64))
    remote.protocol_version, remote.block_size = 9, 32
    with pytest.raises(IncompatiblePeerError, match="protocol_version"):
        kv_layout.check_compatible(layout_of(make_kv(64)), remote)


def _mark_blocks(kv) -> None:
    """Every (layer, K/V, block) slice gets its own value, written by tensor indexing."""
    for b in range(kv.num_blocks):
        block = blocks_kv(kv, b)
        for layer in range(kv.num_layers):
            for k in range(2):
                block[layer, k] = float(layer * 1000 + k * 500 + b)


@pytest.mark.parametrize("num_blocks", [5, 7])
def test_block_span_offsets_match_storage(num_blocks: int) -> None:
    kv = make_kv(num_blocks)
    _mark_blocks(kv)
    layout = layout_of(kv)
    storage = pool_bytes(kv)
    ids = [4, 0, 2]
    spans = kv_layout.block_span_offsets(layout, ids)
    assert len(spans) == len(ids) * 2 * kv.num_layers
    i = 0
    for b in ids:  # block-major, then plane = (layer, K/V) in order
        for layer in range(kv.num_layers):
            for k in range(2):
                offset, length = spans[i]
                i += 1
                expect = kv.tensor[layer, k, b * 16 : (b + 1) * 16].contiguous()
                got = storage[offset : offset + length].view(TINY["dtype"]).view(expect.shape)
                assert torch.equal(got, expect), (b, layer, k)


@pytest.mark.parametrize("num_blocks", [5, 7])
def test_slot_major_block_span_is_the_whole_block(num_blocks: int) -> None:
    kv = make_kv(num_blocks, layout="slot-major")
    _mark_blocks(kv)
    storage = pool_bytes(kv)
    spans = kv_layout.block_span_offsets(layout_of(kv), [4, 0, 2])
    assert spans == [(b * kv.bytes_per_block, kv.bytes_per_block) for b in (4, 0, 2)]
    for (offset, length), b in zip(spans, (4, 0, 2), strict=True):
        got = storage[offset : offset + length].view(TINY["dtype"]).view(16, 8, 2, 4, 64)
        assert torch.equal(got.permute(1, 2, 0, 3, 4), blocks_kv(kv, b)), b


def test_block_span_offsets_rejects_bad_ids() -> None:
    layout = layout_of(make_kv(8))
    with pytest.raises(InvalidRequestError, match="block 8 is outside the pool of 8"):
        kv_layout.block_span_offsets(layout, [1, 8])
    with pytest.raises(InvalidRequestError, match="block 1 appears twice"):
        kv_layout.block_span_offsets(layout, [1, 2, 1])


def test_paired_spans_merge_runs_on_both_sides() -> None:
    local, remote = layout_of(make_kv(80)), layout_of(make_kv(64))
    planes = 2 * 8
    # [3,4,5] -> [10,11,12] is one run, 9 -> 40 another.
    spans = kv_layout.paired_spans(local, [10, 11, 12, 40], remote, [3, 4, 5, 9])
    assert len(spans) == 2 * planes
    assert spans[0][2] == 3 * kv_layout.span_bytes(local)
    # Consecutive on one side only: no merging.
    assert len(kv_layout.paired_spans(local, [10, 11], remote, [3, 5])) == 2 * planes
    assert len(kv_layout.paired_spans(local, [10, 12], remote, [3, 4])) == 2 * planes
    # A whole 2,048-token prompt in consecutive blocks: 2 * num_layers descriptors.
    prompt = list(range(128))
    assert (
        len(
            kv_layout.paired_spans(layout_of(make_kv(200)), prompt, layout_of(make_kv(128)), prompt)
        )
        == planes
    )
    assert kv_layout.paired_spans(local, [], remote, []).shape == (0, 3)


def test_slot_major_runs_are_one_descriptor_each() -> None:
    local = layout_of(make_kv(80, layout="slot-major"))
    remote = layout_of(make_kv(64, layout="slot-major"))
    block = kv_layout.block_bytes(local)
    rows = kv_layout.paired_spans(local, [10, 11, 12, 40], remote, [3, 4, 5, 9]).tolist()
    assert rows == [[10 * block, 3 * block, 3 * block], [40 * block, 9 * block, block]]
    prompt = list(range(64))  # a whole 1,024-token prompt: one descriptor
    assert kv_layout.paired_spans(local, prompt, remote, prompt).tolist() == [[0, 0, 64 * block]]
    general = kv_layout.paired_spans(local, np.array(prompt), remote, np.array(prompt))
    assert general.tolist() == [[0, 0, 64 * block]]


@LAYOUTS
def test_paired_spans_copy_equals_tensor_copy(pool_layout: str) -> None:
    """Copying storage bytes along paired_spans does what copying the blocks' slots does."""
    src_kv, dst_kv, want = (make_kv(n, layout=pool_layout) for n in (6, 9, 9))
    src_kv.tensor.copy_(torch.randn(src_kv.tensor.shape))
    remote_ids, local_ids = [1, 2, 3, 5], [6, 7, 8, 0]
    src, dst = pool_bytes(src_kv), pool_bytes(dst_kv)
    for lo, ro, n in kv_layout.paired_spans(
        layout_of(dst_kv), local_ids, layout_of(src_kv), remote_ids
    ).tolist():
        dst[lo : lo + n] = src[ro : ro + n]
    for r, loc in zip(remote_ids, local_ids, strict=True):
        blocks_kv(want, loc).copy_(blocks_kv(src_kv, r))
    assert torch.equal(dst_kv.tensor, want.tensor)


@pytest.mark.parametrize(
    ("local_ids", "remote_ids"),
    [
        (list(range(16, 80)), list(range(0, 64))),  # a 1,024-token prompt, one run each
        ([79], [63]),  # the last block of each pool
        (list(range(72, 80)), list(range(56, 64))),  # runs ending at each pool's end
        ([10, 11, 12], [3, 4, 6]),  # one run locally, two remotely
    ],
)
def test_paired_spans_single_run_path_equals_general_path(
    local_ids: list[int], remote_ids: list[int]
) -> None:
    """Python ints take the one-run shortcut when they can; numpy ids always take the
    general path: both must give the same rows, and the rows must be the caller's own."""
    local, remote = layout_of(make_kv(80)), layout_of(make_kv(64))
    fast = kv_layout.paired_spans(local, local_ids, remote, remote_ids)
    general = kv_layout.paired_spans(local, np.array(local_ids), remote, np.array(remote_ids))
    assert fast.dtype == general.dtype == np.int64
    assert fast.tolist() == general.tolist()
    fast[:, 0] += 1  # writable, and not the cached table
    assert kv_layout.paired_spans(local, local_ids, remote, remote_ids).tolist() == general.tolist()


def test_paired_spans_single_run_rows() -> None:
    """Exact rows for one run: plane p at p * plane_bytes + first * span, on each side."""
    local, remote = layout_of(make_kv(80)), layout_of(make_kv(64))
    span = kv_layout.span_bytes(local)
    rows = kv_layout.paired_spans(local, [5, 6, 7], remote, [60, 61, 62]).tolist()
    want = [[(p * 80 + 5) * span, (p * 64 + 60) * span, 3 * span] for p in range(16)]
    assert rows == want


def test_paired_spans_rejects_mismatches() -> None:
    local, remote = layout_of(make_kv(8)), layout_of(make_kv(8))
    with pytest.raises(InvalidRequestError, match="local_block_ids"):
        kv_layout.paired_spans(local, [1, 2], remote, [1])
    with pytest.raises(InvalidRequestError, match="remote_block_ids: block 9"):
        kv_layout.paired_spans(local, [1], remote, [9])
    other = layout_of(make_kv(8, block_size=32))
    with pytest.raises(IncompatiblePeerError, match="block_size"):
        kv_layout.paired_spans(local, [1], other, [1])


@pytest.mark.parametrize(
    ("local_ids", "remote_ids", "message"),
    [
        # Ids are checked per run; each case hides its fault inside or across runs.
        ([5, 6, 7], [2, 3, 8], "remote_block_ids: block 8 is outside"),  # a run's last id
        ([-1, 0], [1, 2], "local_block_ids: block -1 is outside"),  # a run's first id
        ([1, 2, 3, 2], [1, 2, 3, 4], "local_block_ids: block 2 appears twice"),  # runs overlap
        ([4, 5, 1, 2], [0, 1, 0, 3], "remote_block_ids: block 0 appears twice"),  # out of order
        ([3, 3], [1, 2], "local_block_ids: block 3 appears twice"),  # a run of one, twice
    ],
)
def test_paired_spans_names_the_bad_block(
    local_ids: list[int], remote_ids: list[int], message: str
) -> None:
    local, remote = layout_of(make_kv(8)), layout_of(make_kv(8))
    with pytest.raises(InvalidRequestError, match=message):
        kv_layout.paired_spans(local, local_ids, remote, remote_ids)


def test_paired_spans_accepts_runs_in_any_order() -> None:
    """Disjoint runs are valid whatever their order; no id is taken for a repeat."""
    local, remote = layout_of(make_kv(16)), layout_of(make_kv(16))
    spans = kv_layout.paired_spans(local, [9, 10, 0, 1, 5], remote, [0, 1, 14, 15, 7])
    span = kv_layout.span_bytes(local)
    firsts = spans[:: 2 * 8]  # plane 0 of each run
    assert firsts.tolist() == [
        [9 * span, 0, 2 * span],
        [0, 14 * span, 2 * span],
        [5 * span, 7 * span, span],
    ]
