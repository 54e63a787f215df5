"""The per-step inputs the runner builds: slot runs and rotary tables.

Both have fast paths (a consecutive block table checked at once; sin stored with its first
half negated) that must give exactly what the plain computation gives.
"""

from __future__ import annotations

import pytest
import torch

from services.engine.model_config import RopeConfig
from services.engine.rope import RotaryTable, apply_rotary, inverse_frequencies
from services.engine.runner import _slot_runs


def _walked(table: list[int], kv_len: int, bs: int) -> tuple[tuple[int, int], ...]:
    """Slot runs by walking every token: the definition the fast path must meet."""
    slots = [table[p // bs] * bs + p % bs for p in range(kv_len)]
    runs: list[list[int]] = []
    for s in slots:
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1][1] += 1
        else:
            runs.append([s, 1])
    return tuple((a, n) for a, n in runs)


@pytest.mark.parametrize(
    ("table", "kv_len"),
    [
        ([7], 1),
        ([7], 16),
        ([4, 5, 6], 33),  # consecutive, last block partly filled
        ([4, 5, 6, 9], 33),  # only the first kv_len's blocks count
        ([3, 5, 4, 6], 64),  # first and last ids look consecutive, the middle is not
        ([8, 9, 2, 3, 4], 70),  # two runs
        ([1, 0], 20),  # descending ids
        ([2, 2], 32),
    ],
)
def test_slot_runs_match_token_by_token(table: list[int], kv_len: int) -> None:
    assert _slot_runs(table, kv_len, 16) == _walked(table, kv_len, 16)


def _hf_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``apply_rotary_pos_emb`` for one tensor: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope_type", ["default", "llama3"])
def test_rotary_equals_transformers_bit_for_bit(dtype: torch.dtype, rope_type: str) -> None:
    rope = RopeConfig(
        theta=50000.0,
        rope_type=rope_type,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
    table = RotaryTable(rope, 64, 300, "cpu")
    # The tables as transformers builds them: float32, cast to the model's dtype at use.
    freqs = torch.outer(torch.arange(300, dtype=torch.float), inverse_frequencies(rope, 64))
    emb = torch.cat((freqs, freqs), dim=-1)
    hf_cos, hf_sin = emb.cos(), emb.sin()
    positions = torch.tensor([0, 1, 5, 17, 63, 64, 200, 299, 5])
    x = torch.randn(len(positions), 12, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    cos, sin = table.lookup(positions, dtype)
    expected = _hf_rotary(
        x,
        hf_cos[positions].to(dtype).unsqueeze(1),
        hf_sin[positions].to(dtype).unsqueeze(1),
    )
    assert torch.equal(apply_rotary(x, cos, sin), expected)
    # A non-contiguous input, as the fused qkv projection hands it over.
    qkv = torch.randn(len(positions), 16 * 64, generator=torch.Generator().manual_seed(1))
    qk = qkv.to(dtype)[:, : 12 * 64].view(len(positions), 12, 64)
    expected = _hf_rotary(
        qk,
        hf_cos[positions].to(dtype).unsqueeze(1),
        hf_sin[positions].to(dtype).unsqueeze(1),
    )
    assert torch.equal(apply_rotary(qk, cos, sin), expected)
