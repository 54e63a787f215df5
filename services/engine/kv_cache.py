"""The KV pool: one tensor per worker holding every layer's keys and values.

Two dimension orders, a worker's choice (``EngineConfig.kv_layout``, slot-major by
default); the handshake refuses to pair workers whose orders differ
(services/kv_transfer/layout.py):

- ``layer-major``: ``[num_layers, 2 (K, V), num_slots, num_kv_heads, head_dim]``. Each
  ``[layer, K|V]`` slice is a *plane*; block ``b`` is ``block_size`` consecutive slots in
  each of the ``2 * num_layers`` planes, so a run of consecutive blocks is one span per
  plane and moving a prompt's KV takes ``2 * num_layers`` descriptors.
- ``slot-major``: ``[num_slots, num_layers, 2, num_kv_heads, head_dim]``. A slot holds
  every layer's K and V, so a block, and a run of consecutive blocks, is one contiguous
  span: the whole pool is one plane, and moving a prompt's KV takes one descriptor per
  run. NIXL charges per descriptor (~7.5 µs each over CUDA IPC on an H100,
  bench/gpu/README.md), which this order removes: on an H200 one 2,048-token pull's READ
  took 26 µs instead of 109. Attention then reads each layer's keys with a stride of a
  whole slot instead of one slot's heads, which cost nothing measurable (offline
  throughput 1.07x of layer-major on that H200, parity on 2 CPU cores).

In both orders a layer's keys are ``[num_slots, num_kv_heads, head_dim]`` with a uniform
slot stride, so a sequence whose blocks have consecutive ids (the block pool arranges that
in the common case) is read by attention as a view: no gather, no copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from services.engine.host_memory import host_zeros

KVLayoutName = Literal["layer-major", "slot-major"]
KV_LAYOUTS: tuple[KVLayoutName, ...] = ("layer-major", "slot-major")


@dataclass(frozen=True)
class ByteSpan:
    """A contiguous byte range inside the pool tensor's storage."""

    offset: int
    length: int


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        layout: KVLayoutName = "slot-major",
    ) -> None:
        if layout not in KV_LAYOUTS:
            raise ValueError(f"KV layout {layout!r} is not one of {KV_LAYOUTS}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layout = layout
        self.num_slots = num_blocks * block_size
        if layout == "layer-major":
            shape = (num_layers, 2, self.num_slots, num_kv_heads, head_dim)
        else:
            shape = (self.num_slots, num_layers, 2, num_kv_heads, head_dim)
        # zeros, not empty: a bug that reads an unwritten slot then shows as a
        # wrong token in the reference tests rather than as NaNs in some runs.
        if torch.device(device).type == "cpu":
            self.tensor = host_zeros(shape, dtype)  # huge pages: faster CMA pulls, fewer TLB misses
        else:
            self.tensor = torch.zeros(shape, dtype=dtype, device=device)
        # Each layer's K and V views, made once: the model asks for them every step.
        if layout == "layer-major":
            kv = [(self.tensor[i, 0], self.tensor[i, 1]) for i in range(num_layers)]
        else:
            kv = [(self.tensor[:, i, 0], self.tensor[:, i, 1]) for i in range(num_layers)]
        self._layers = tuple(kv)

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return num_layers * 2 * num_kv_heads * head_dim * dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        per_token = self.bytes_per_token(
            self.num_layers, self.num_kv_heads, self.head_dim, self.tensor.dtype
        )
        return self.block_size * per_token

    @property
    def num_planes(self) -> int:
        """Planes a block's bytes are split over: ``2 * num_layers``, or 1 when slot-major."""
        return 2 * self.num_layers if self.layout == "layer-major" else 1

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, each ``[num_slots, num_kv_heads, head_dim]`` (views)."""
        return self._layers[layer]

    def planes(self) -> torch.Tensor:
        """The pool as ``[num_planes, num_blocks, span elements]`` (a view): block ``b``'s
        bytes are ``planes()[:, b]``, plane by plane, in either layout."""
        return self.tensor.view(self.num_planes, self.num_blocks, -1)

    def block_spans(self, block_ids: list[int]) -> list[ByteSpan]:
        """Byte spans covering these blocks in every plane, runs of consecutive ids merged."""
        span = self.bytes_per_block // self.num_planes
        plane_bytes = self.num_blocks * span
        return [
            ByteSpan(plane * plane_bytes + start * span, count * span)
            for start, count in block_runs(block_ids)
            for plane in range(self.num_planes)
        ]


def block_runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """(first id, count) for each run of consecutive ids, in order."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs
