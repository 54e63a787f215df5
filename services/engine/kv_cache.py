"""The KV pool: one tensor per worker holding every layer's keys and values.

Layout ``[num_layers, 2 (K, V), num_blocks * block_size (slots), num_kv_heads, head_dim]``.

Why this order:
- Attention reads a sequence's keys for one layer as ``[tokens, kv_heads, head_dim]``.
  When the sequence's blocks have consecutive ids (the block pool arranges that
  in the common case) those slots are consecutive here too, so the read is a
  view: no gather, no copy, whatever the batch size.
- Transfer: block ``b`` occupies ``block_size`` consecutive slots in each of the
  ``2 * num_layers`` planes, at offsets computable from ``b`` alone. A run of
  consecutive blocks is one span per plane, so moving a whole prompt's KV takes
  ``2 * num_layers`` descriptors however long the prompt is (``block_spans``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.host_memory import host_zeros


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
    ) -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_slots = num_blocks * block_size
        # zeros, not empty: a bug that reads an unwritten slot then shows as a
        # wrong token in the reference tests rather than as NaNs in some runs.
        shape = (num_layers, 2, self.num_slots, num_kv_heads, head_dim)
        if torch.device(device).type == "cpu":
            self.tensor = host_zeros(shape, dtype)  # huge pages: faster CMA pulls, fewer TLB misses
        else:
            self.tensor = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return num_layers * 2 * num_kv_heads * head_dim * dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.tensor[:, :, : self.block_size].numel() * self.tensor.element_size()

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, each ``[num_slots, num_kv_heads, head_dim]`` (views)."""
        return self.tensor[layer, 0], self.tensor[layer, 1]

    def block_spans(self, block_ids: list[int]) -> list[ByteSpan]:
        """Byte spans covering these blocks in every layer, runs of consecutive ids merged."""
        plane_bytes = self.num_slots * self.tensor[0, 0, 0].numel() * self.tensor.element_size()
        block_bytes = plane_bytes // self.num_blocks
        spans: list[ByteSpan] = []
        for start, count in block_runs(block_ids):
            for plane in range(self.num_layers * 2):
                spans.append(
                    ByteSpan(plane * plane_bytes + start * block_bytes, count * block_bytes)
                )
        return spans


def block_runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """(first id, count) for each run of consecutive ids, in order."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs
