"""paged_attention against plain per-sequence SDPA on gathered K/V."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.engine.attention import (
    SeqSlice,
    _strided_group_end,
    paged_attention,
    plan_attention,
)

HEADS, KV_HEADS, DIM, SLOTS = 4, 2, 8, 512


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: list[SeqSlice]
) -> torch.Tensor:
    outs = []
    for s in seqs:
        idx = torch.cat([torch.arange(a, a + n) for a, n in s.slot_runs])
        kk = k[idx].repeat_interleave(HEADS // KV_HEADS, dim=1).transpose(0, 1)  # [H, kv, d]
        vv = v[idx].repeat_interleave(HEADS // KV_HEADS, dim=1).transpose(0, 1)
        qq = q[s.q_start : s.q_start + s.q_len].transpose(0, 1)  # [H, q, d]
        allowed = torch.ones(s.q_len, s.kv_len, dtype=torch.bool).tril(s.kv_len - s.q_len)
        outs.append(F.scaled_dot_product_attention(qq, kk, vv, attn_mask=allowed).transpose(0, 1))
    return torch.cat(outs)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: list[SeqSlice]
) -> torch.Tensor:
    return paged_attention(q, k, v, plan_attention(seqs, SLOTS, "cpu"))


def _inputs(seqs: list[SeqSlice]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    total = sum(s.q_len for s in seqs)
    q = torch.randn(total, HEADS, DIM, generator=g, dtype=torch.float64)
    k = torch.randn(SLOTS, KV_HEADS, DIM, generator=g, dtype=torch.float64)
    v = torch.randn(SLOTS, KV_HEADS, DIM, generator=g, dtype=torch.float64)
    return q, k, v


def test_evenly_spaced_decodes_of_different_lengths_match_reference() -> None:
    # Four decoding sequences 64 slots apart (one strided call), then a prefill
    # chunk over a cached prefix, then a fragmented decode (two runs, a copy).
    seqs = [SeqSlice(i, 1, 40 + 7 * i, ((100 + 64 * i, 40 + 7 * i),)) for i in range(4)]
    seqs.append(SeqSlice(4, 5, 21, ((16, 21),)))
    seqs.append(SeqSlice(9, 1, 30, ((400, 16), (480, 14))))
    assert _strided_group_end(seqs, 0, SLOTS) == 4
    q, k, v = _inputs(seqs)
    torch.testing.assert_close(
        paged_attention(q, k, v, plan_attention(seqs, SLOTS, "cpu")), _reference(q, k, v, seqs)
    )


def test_group_that_would_run_past_the_pool_end_is_split() -> None:
    # The padded view of the last member would end past slot 512: it runs alone.
    seqs = [
        SeqSlice(0, 1, 20, ((300, 20),)),
        SeqSlice(1, 1, 20, ((400, 20),)),
        SeqSlice(2, 1, 10, ((500, 10),)),
    ]
    assert _strided_group_end(seqs, 0, SLOTS) == 2
    q, k, v = _inputs(seqs)
    torch.testing.assert_close(
        paged_attention(q, k, v, plan_attention(seqs, SLOTS, "cpu")), _reference(q, k, v, seqs)
    )


def test_full_prefill_is_causal() -> None:
    seqs = [SeqSlice(0, 9, 9, ((32, 9),)), SeqSlice(9, 3, 3, ((64, 3),))]
    q, k, v = _inputs(seqs)
    torch.testing.assert_close(
        paged_attention(q, k, v, plan_attention(seqs, SLOTS, "cpu")), _reference(q, k, v, seqs)
    )
