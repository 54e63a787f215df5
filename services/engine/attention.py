"""Attention over the paged KV pool for a flattened batch of sequences.

Each sequence in a step contributes ``q_len`` new tokens (1 when decoding, a
chunk when prefilling) and attends to ``kv_len`` cached tokens, its new ones
included. Its K/V live in one or more runs of consecutive slots
(``kv_cache.block_runs``); with a single run — the common case the block pool
arranges — the keys are a strided view of the pool, read in place by SDPA.
Only fragmented sequences pay a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's place in a step."""

    q_start: int
    """Offset of its first new token in the flattened batch."""
    q_len: int
    """New tokens this step."""
    kv_len: int
    """Tokens it attends to (cached prefix + earlier chunks + the new ones)."""
    slot_runs: tuple[tuple[int, int], ...]
    """(first slot, count) runs covering its first kv_len slots, in order."""


def paged_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    seqs: list[SeqSlice],
) -> torch.Tensor:  # [T, num_heads, head_dim]
    outs = []
    for s in seqs:
        q_s = q[s.q_start : s.q_start + s.q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q, d]
        k_s = _gather(k_cache, s.slot_runs).transpose(0, 1).unsqueeze(0)  # [1, Hkv, kv, d]
        v_s = _gather(v_cache, s.slot_runs).transpose(0, 1).unsqueeze(0)
        if s.q_len == 1:
            o = F.scaled_dot_product_attention(q_s, k_s, v_s, enable_gqa=True)
        elif s.q_len == s.kv_len:
            o = F.scaled_dot_product_attention(q_s, k_s, v_s, is_causal=True, enable_gqa=True)
        else:
            # New tokens sit at the end of the context: query i sees keys ≤ i + offset.
            mask = torch.ones(s.q_len, s.kv_len, dtype=torch.bool, device=q.device)
            mask = mask.tril(s.kv_len - s.q_len)
            o = F.scaled_dot_product_attention(q_s, k_s, v_s, attn_mask=mask, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _gather(cache: torch.Tensor, runs: tuple[tuple[int, int], ...]) -> torch.Tensor:
    if len(runs) == 1:
        start, count = runs[0]
        return cache[start : start + count]
    return torch.cat([cache[start : start + count] for start, count in runs])
