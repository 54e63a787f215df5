"""What two workers must agree on to exchange KV blocks, and where a block's bytes lie.

The pool tensor has one of two dimension orders (services/engine/kv_cache.py), named in
``KVLayout.layout``. Either way it is a stack of *planes*, each ``num_blocks`` spans of
``span_bytes``:

- layer-major, ``[num_layers, 2 (K, V), slots, num_kv_heads, head_dim]``: each
  ``[layer, K|V]`` slice is a plane, ``2 * num_layers`` of them, plane ``p = 2 * layer +
  kv``, and a block's span in a plane is its ``block_size`` slots of that layer's K or V;
- slot-major, ``[slots, num_layers, 2, num_kv_heads, head_dim]``: the whole pool is one
  plane and a block's span is the whole block.

Block ``b``'s bytes in plane ``p`` are one span at ``p * plane_bytes + b * span_bytes``.
The offsets depend on ``num_blocks`` (through ``plane_bytes``), which differs between
workers: every offset into a peer's pool must be computed from the peer's layout, never
from the local one.

Byte order on the wire (ReadBlocks): for each block in the order asked, for each plane in
order, that block's span. Everything here is pure and torch-free, so the router can check
layouts too.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from services.engine.errors import InvalidRequestError
from services.kv_transfer.errors import IncompatiblePeerError
from services.stubs.tandem.v1 import worker_pb2

if TYPE_CHECKING:
    from services.engine.kv_cache import KVCache

PROTOCOL_VERSION = 1
"""Raised whenever the handshake, the byte order or the meaning of a layout field changes."""

LAYOUT_NAMES = {"layer-major": "layer-kv-slot-head-dim", "slot-major": "slot-layer-kv-head-dim"}
"""Each pool order (``KVCache.layout``) as carried in ``KVLayout.layout``: its dimensions."""

DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
"""Element size of each KV dtype a layout may name (torch's names without ``torch.``)."""

# Checked in this order; the first difference is reported. num_blocks may differ.
_ADVICE = {
    "protocol_version": "run the same Tandem release on both workers",
    "model_id": "pair only workers that serve the same model",
    "block_size": "start both workers with the same block size",
    "dtype": "start both workers with the same KV dtype",
    "layout": "start both workers with the same --kv-layout (and the same Tandem release)",
    "num_layers": "load the same checkpoint on both workers",
    "num_kv_heads": "load the same checkpoint on both workers",
    "head_dim": "load the same checkpoint on both workers",
}


def describe(kv: KVCache, model_id: str) -> worker_pb2.KVLayout:
    """This worker's layout for the handshake and registration. Side-effect free."""
    return worker_pb2.KVLayout(
        protocol_version=PROTOCOL_VERSION,
        model_id=model_id,
        block_size=kv.block_size,
        dtype=str(kv.tensor.dtype).removeprefix("torch."),
        layout=LAYOUT_NAMES[kv.layout],
        num_layers=kv.num_layers,
        num_kv_heads=kv.num_kv_heads,
        head_dim=kv.head_dim,
        num_blocks=kv.num_blocks,
    )


GEOMETRY_FIELDS = ("block_size", "dtype", "layout", "num_layers", "num_kv_heads", "head_dim")
"""The fields byte offsets depend on (with num_blocks, which may differ)."""


def check_compatible(local: worker_pb2.KVLayout, remote: worker_pb2.KVLayout) -> None:
    """Raise IncompatiblePeerError naming the first field in which the layouts differ."""
    _check_fields(local, remote, tuple(_ADVICE))


def compatible(local: worker_pb2.KVLayout, remote: worker_pb2.KVLayout) -> bool:
    """Whether KV can move between the two (check_compatible without the exception)."""
    try:
        check_compatible(local, remote)
    except IncompatiblePeerError:
        return False
    return True


def check_same_geometry(local: worker_pb2.KVLayout, remote: worker_pb2.KVLayout) -> None:
    """Like check_compatible, but only the fields that decide where bytes lie."""
    _check_fields(local, remote, GEOMETRY_FIELDS)


def _check_fields(
    local: worker_pb2.KVLayout, remote: worker_pb2.KVLayout, fields: tuple[str, ...]
) -> None:
    for field in fields:
        advice = _ADVICE[field]
        mine, theirs = getattr(local, field), getattr(remote, field)
        if mine != theirs:
            raise IncompatiblePeerError(
                f"KV layouts differ in {field}: this worker has {mine!r}, the peer has "
                f"{theirs!r}; {advice}"
            )


def dtype_bytes(layout: worker_pb2.KVLayout) -> int:
    try:
        return DTYPE_BYTES[layout.dtype]
    except KeyError:
        raise IncompatiblePeerError(
            f"KV layout dtype {layout.dtype!r} is not one of {sorted(DTYPE_BYTES)}"
        ) from None


def span_bytes(layout: worker_pb2.KVLayout) -> int:
    """Bytes of one block in one plane: the unit every offset is made of."""
    return block_bytes(layout) // num_planes(layout)


def num_planes(layout: worker_pb2.KVLayout) -> int:
    """Planes a block's bytes are split over: ``2 * num_layers``, or 1 when slot-major."""
    if layout.layout == LAYOUT_NAMES["layer-major"]:
        return 2 * layout.num_layers
    if layout.layout == LAYOUT_NAMES["slot-major"]:
        return 1
    raise IncompatiblePeerError(
        f"KV layout {layout.layout!r} is not one of {sorted(LAYOUT_NAMES.values())}; "
        f"{_ADVICE['layout']}"
    )


def block_bytes(layout: worker_pb2.KVLayout) -> int:
    """Bytes of one block across all planes: what moving a block costs."""
    per_token = 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim
    return layout.block_size * per_token * dtype_bytes(layout)


def pool_bytes(layout: worker_pb2.KVLayout) -> int:
    """Bytes of the whole pool tensor."""
    return layout.num_blocks * block_bytes(layout)


def check_block_ids(layout: worker_pb2.KVLayout, block_ids: Sequence[int], name: str) -> None:
    """Raise InvalidRequestError (naming ``name``) if an id is outside the pool or repeated."""
    ids = np.asarray(block_ids, dtype=np.int64)
    if ids.size == 0:
        return
    inside = ids.min() >= 0 and ids.max() < layout.num_blocks
    if inside and np.unique(ids).size == ids.size:
        return  # the common case, without a Python loop over a long prompt's blocks
    seen: set[int] = set()
    for b in ids.tolist():
        if not 0 <= b < layout.num_blocks:
            raise InvalidRequestError(
                name, f"block {b} is outside the pool of {layout.num_blocks} blocks"
            )
        if b in seen:
            raise InvalidRequestError(name, f"block {b} appears twice")
        seen.add(b)


def block_span_offsets(
    layout: worker_pb2.KVLayout, block_ids: Sequence[int]
) -> list[tuple[int, int]]:
    """(byte offset, length) of each block's span in each plane, block-major: the wire order.

    A pure function of ``layout``; ``len(block_ids) * num_planes(layout)`` spans.
    """
    check_block_ids(layout, block_ids, "block_ids")
    span = span_bytes(layout)
    plane = layout.num_blocks * span
    return [(p * plane + b * span, span) for b in block_ids for p in range(num_planes(layout))]


def paired_spans(
    local_layout: worker_pb2.KVLayout,
    local_ids: Sequence[int],
    remote_layout: worker_pb2.KVLayout,
    remote_ids: Sequence[int],
) -> np.ndarray:
    """Rows of (local offset, remote offset, length) covering ``remote_ids[i] → local_ids[i]``
    (int64, shape ``[n, 3]``).

    Consecutive pairs whose ids both go up by one form a run; each run is one span per
    plane, so a run of consecutive blocks costs ``num_planes`` descriptors however long
    it is. Order: run by run, plane by plane (a transfer's descriptors need no other order).

    It sits on every pull's path. The common case, one run on each side (a prompt's blocks
    handed out consecutively), is checked with two list comparisons and answered from a
    cached table of plane offsets: two numpy calls. Otherwise it is a fixed chain of numpy
    calls whatever the prompt's length (50–60 µs with warm caches, 270–400 µs right after a
    16 MiB copy: see bench/kv_transfer/README.md): the ids are checked per run (a run's ids
    rise by one, so the pool's bounds and overlaps between runs say it all), and only a
    failing check walks the ids one by one, to name the bad block.
    """
    if len(local_ids) != len(remote_ids):
        raise InvalidRequestError(
            "local_block_ids",
            f"has {len(local_ids)} ids but remote_block_ids has {len(remote_ids)}",
        )
    check_same_geometry(local_layout, remote_layout)
    if len(local_ids) == 0:
        return np.empty((0, 3), dtype=np.int64)
    run = _single_run(local_layout, local_ids, remote_layout, remote_ids)
    if run is not None:
        return _run_spans(local_layout, remote_layout, *run)
    local = np.asarray(local_ids, dtype=np.int64)
    remote = np.asarray(remote_ids, dtype=np.int64)
    starts, counts = _runs(local, remote)
    local_starts, remote_starts = local[starts], remote[starts]
    if not _valid_runs(local_layout, local_starts, counts):
        check_block_ids(local_layout, local, "local_block_ids")
    if not _valid_runs(remote_layout, remote_starts, counts):
        check_block_ids(remote_layout, remote, "remote_block_ids")
    span = span_bytes(local_layout)
    planes = np.arange(num_planes(local_layout), dtype=np.int64)
    spans = np.empty((starts.size, planes.size, 3), dtype=np.int64)
    spans[..., 0] = planes * (local_layout.num_blocks * span) + (local_starts * span)[:, None]
    spans[..., 1] = planes * (remote_layout.num_blocks * span) + (remote_starts * span)[:, None]
    spans[..., 2] = (counts * span)[:, None]
    return spans.reshape(-1, 3)


def _single_run(
    local_layout: worker_pb2.KVLayout,
    local_ids: Sequence[int],
    remote_layout: worker_pb2.KVLayout,
    remote_ids: Sequence[int],
) -> tuple[int, int, int] | None:
    """(local first id, remote first id, count) when each side is one run of consecutive ids
    inside its pool; None otherwise (the general path then checks and names any bad id)."""
    n = len(local_ids)
    first_local, first_remote = local_ids[0], remote_ids[0]
    if not (isinstance(first_local, int) and isinstance(first_remote, int)):
        return None  # numpy integers and the like: the general path converts them
    if not (0 <= first_local <= local_layout.num_blocks - n):
        return None
    if not (0 <= first_remote <= remote_layout.num_blocks - n):
        return None
    if list(local_ids) != list(range(first_local, first_local + n)):
        return None
    if list(remote_ids) != list(range(first_remote, first_remote + n)):
        return None
    return first_local, first_remote, n


def _run_spans(
    local_layout: worker_pb2.KVLayout,
    remote_layout: worker_pb2.KVLayout,
    first_local: int,
    first_remote: int,
    count: int,
) -> np.ndarray:
    """paired_spans' rows for one run: a copy of the cached plane table, shifted."""
    span = span_bytes(local_layout)
    rows = _plane_table(
        num_planes(local_layout), local_layout.num_blocks * span, remote_layout.num_blocks * span
    ).copy()
    rows += (first_local * span, first_remote * span, count * span)
    return rows


@functools.lru_cache(maxsize=64)
def _plane_table(planes: int, local_plane_bytes: int, remote_plane_bytes: int) -> np.ndarray:
    """(local plane offset, remote plane offset, 0) per plane; read-only, shared."""
    table = np.zeros((planes, 3), dtype=np.int64)
    table[:, 0] = np.arange(planes) * local_plane_bytes
    table[:, 1] = np.arange(planes) * remote_plane_bytes
    table.setflags(write=False)
    return table


def _runs(local: np.ndarray, remote: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first index, length) of each run: a stretch where both ids go up by one."""
    step = np.empty(local.size, dtype=bool)
    step[0] = True
    np.not_equal(np.diff(local), 1, out=step[1:])
    step[1:] |= np.diff(remote) != 1
    starts = np.flatnonzero(step)
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1] = local.size
    return starts, ends - starts


def _valid_runs(layout: worker_pb2.KVLayout, starts: np.ndarray, counts: np.ndarray) -> bool:
    """Whether runs of ids ``[start, start + count)`` lie inside the pool and do not overlap
    (so no id repeats)."""
    ends = starts + counts
    if starts.min() < 0 or ends.max() > layout.num_blocks:
        return False
    if starts.size == 1:
        return True
    order = np.argsort(starts, kind="stable")
    return bool(np.all(starts[order[1:]] >= ends[order[:-1]]))
