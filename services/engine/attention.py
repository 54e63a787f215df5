"""Attention over the paged KV pool for a flattened batch of sequences.

Each sequence in a step contributes ``q_len`` new tokens (1 when decoding, a
chunk when prefilling) and attends to ``kv_len`` cached tokens, its new ones
included. Its K/V live in one or more runs of consecutive slots
(``kv_cache.block_runs``); with a single run — the common case the block pool
arranges — the keys are a strided view of the pool, read in place by SDPA.
Only fragmented sequences pay a copy.

Decoding sequences whose slots start at evenly spaced offsets (the block pool
places a wave of similar requests that way) are attended in one SDPA call over
a strided view of the pool, padded to the longest with a mask: one call reads
memory at close to the bandwidth of a contiguous batch, where one call per
sequence reaches about half of it on CPU.
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


@dataclass(frozen=True)
class Segment:
    """Sequences attended by one SDPA call: one sequence, or an evenly spaced decode group."""

    seqs: tuple[SeqSlice, ...]
    stride: int = 0
    """Slots between consecutive members' starts (groups only)."""
    max_len: int = 0
    """Longest kv_len in a group; shorter members are masked."""
    mask: torch.Tensor | None = None
    """Boolean attention mask, or None when SDPA needs none (or is_causal does)."""


def plan_attention(
    seqs: list[SeqSlice], num_slots: int, device: torch.device | str
) -> list[Segment]:
    """Decide once per step how to attend ``seqs``; every layer reuses the plan."""
    segments: list[Segment] = []
    i = 0
    while i < len(seqs):
        end = _strided_group_end(seqs, i, num_slots)
        if end - i > 1:
            segments.append(_group_segment(tuple(seqs[i:end]), device))
        else:
            segments.append(Segment((seqs[i],), mask=_prefill_mask(seqs[i], device)))
        i = max(end, i + 1)
    return segments


def paged_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    plan: list[Segment],
) -> torch.Tensor:  # [T, num_heads, head_dim]
    outs = [
        _strided_decode(q, k_cache, v_cache, seg)
        if len(seg.seqs) > 1
        else _one_sequence(q, k_cache, v_cache, seg.seqs[0], seg.mask)
        for seg in plan
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _one_sequence(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    s: SeqSlice,
    mask: torch.Tensor | None,
) -> torch.Tensor:  # [q_len, heads, head_dim]
    q_s = q[s.q_start : s.q_start + s.q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q, d]
    k_s = _gather(k_cache, s.slot_runs).transpose(0, 1).unsqueeze(0)  # [1, Hkv, kv, d]
    v_s = _gather(v_cache, s.slot_runs).transpose(0, 1).unsqueeze(0)
    causal = mask is None and 1 < s.q_len == s.kv_len
    o = F.scaled_dot_product_attention(
        q_s, k_s, v_s, attn_mask=mask, is_causal=causal, enable_gqa=True
    )
    return o[0].transpose(0, 1)


def _prefill_mask(s: SeqSlice, device: torch.device | str) -> torch.Tensor | None:
    """A chunk after cached context: query i sees keys ≤ i + offset (None otherwise)."""
    if s.q_len == 1 or s.q_len == s.kv_len:
        return None
    mask = torch.ones(s.q_len, s.kv_len, dtype=torch.bool, device=device)
    return mask.tril(s.kv_len - s.q_len)


def _group_segment(group: tuple[SeqSlice, ...], device: torch.device | str) -> Segment:
    lengths = [s.kv_len for s in group]
    max_len = max(lengths)
    mask = None
    if min(lengths) != max_len:
        length_t = torch.tensor(lengths, device=device)
        mask = (torch.arange(max_len, device=device) < length_t[:, None])[:, None, None, :]
    return Segment(group, _start(group[1]) - _start(group[0]), max_len, mask)


def _strided_group_end(seqs: list[SeqSlice], i: int, num_slots: int) -> int:
    """End (exclusive) of the run of decoding sequences from ``i`` on whose single
    slot runs start a constant stride apart, each fitting within the stride."""
    first = seqs[i]
    if first.q_len != 1 or len(first.slot_runs) != 1 or i + 1 >= len(seqs):
        return i
    stride = _start(seqs[i + 1]) - _start(first)
    if stride <= 0:
        return i
    end, max_len = i + 1, first.kv_len
    while end < len(seqs):
        s = seqs[end]
        ok = s.q_len == 1 and len(s.slot_runs) == 1 and s.kv_len <= stride
        if not ok or _start(s) - _start(seqs[end - 1]) != stride:
            break
        max_len = max(max_len, s.kv_len)
        end += 1
    # The padded view of the last member must stay inside the pool.
    while end - i > 1 and _start(seqs[end - 1]) + max_len > num_slots:
        end -= 1
    return end if first.kv_len <= stride else i


def _strided_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seg: Segment
) -> torch.Tensor:  # [n, heads, head_dim]
    n, first = len(seg.seqs), seg.seqs[0]
    q_g = q[first.q_start : first.q_start + n].unsqueeze(2)  # [n, H, 1, d]
    k_g = _lanes(k_cache, _start(first), n, seg.stride, seg.max_len)  # [n, Hkv, max_len, d]
    v_g = _lanes(v_cache, _start(first), n, seg.stride, seg.max_len)
    o = F.scaled_dot_product_attention(q_g, k_g, v_g, attn_mask=seg.mask, enable_gqa=True)
    return o.squeeze(2)


def _lanes(cache: torch.Tensor, first: int, n: int, stride: int, length: int) -> torch.Tensor:
    """View of ``n`` windows of ``length`` slots, ``stride`` slots apart, as [n, Hkv, length, d]."""
    slot = cache.stride(0)
    view = cache.as_strided(
        (n, length, cache.shape[1], cache.shape[2]),
        (stride * slot, slot, cache.stride(1), cache.stride(2)),
        cache.storage_offset() + first * slot,
    )
    return view.transpose(1, 2)


def _start(s: SeqSlice) -> int:
    return s.slot_runs[0][0]


def _gather(cache: torch.Tensor, runs: tuple[tuple[int, int], ...]) -> torch.Tensor:
    if len(runs) == 1:
        start, count = runs[0]
        return cache[start : start + count]
    return torch.cat([cache[start : start + count] for start, count in runs])
