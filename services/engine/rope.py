"""Rotary position embeddings, computed the way Hugging Face transformers does.

The cos/sin tables are built once in float32 and cast to the model dtype at
use, with the same operation order as transformers, so bf16 outputs match the
reference bit for bit rather than merely closely.
"""

from __future__ import annotations

import math

import torch

from services.engine.model_config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """[head_dim // 2] float32 frequencies, with linear or llama3 scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scaling(inv_freq, rope)
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths are stretched by `factor`, short ones kept, the band in
    # between interpolated (Llama 3.1's published recipe).
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryTable:
    """cos/sin for every position up to ``max_positions``, looked up per token.

    Kept as one ``[P, 2, head_dim]`` table per dtype (cast once, on first use: the cast is
    elementwise, so the values equal casting at every lookup) holding cos and a sin whose
    first half is negated. ``apply_rotary`` then rotates with ``cat((x2, x1)) * sin`` in
    place of transformers' ``cat((-x2, x1)) * sin``: the same products bit for bit (negation
    is exact), one elementwise pass and one allocation fewer per layer, and one gather per
    step for both tables."""

    def __init__(
        self, rope: RopeConfig, head_dim: int, max_positions: int, device: torch.device | str
    ) -> None:
        inv_freq = inverse_frequencies(rope, head_dim)
        positions = torch.arange(max_positions, dtype=torch.float)
        freqs = torch.outer(positions, inv_freq)  # [P, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin()
        half = head_dim // 2
        signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        self._float32 = torch.stack((emb.cos(), signed_sin), dim=1).to(device)  # [P, 2, hd]
        self.cos = self._float32[:, 0]  # [P, head_dim] float32 (a view)
        self._tables: dict[torch.dtype, torch.Tensor] = {torch.float32: self._float32}

    def lookup(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sign-folded sin (see the class) as ``[T, 1, head_dim]`` in ``dtype``,
        broadcasting over heads; for ``apply_rotary`` only."""
        table = self._tables.get(dtype)
        if table is None:
            table = self._tables[dtype] = self._float32.to(dtype)
        both = table[positions]  # [T, 2, head_dim]
        return both[:, 0:1], both[:, 1:2]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; rotates pairs (i, i + head_dim/2) as transformers does.

    ``sin`` is ``RotaryTable.lookup``'s, first half negated: ``x2 * -s`` is exactly
    transformers' ``-x2 * s``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)
