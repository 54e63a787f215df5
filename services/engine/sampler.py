"""Pick each sequence's next token from its logits.

Greedy rows are decided together with one argmax. Sampled rows apply
temperature (to logits shifted so the row's maximum is 0: no overflow, whatever
their scale), then top-k, then top-p, and draw one token.

A seeded request's n-th output token is drawn with a generator seeded from
``(seed, n)`` alone (``draw_seed``), so its tokens do not depend on what it is
batched with, nor on which worker draws them: a decode worker continuing a request
prefilled elsewhere draws token 1 exactly as a single worker would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from services.engine.sampling_params import SamplingParams


def draw_seed(seed: int, index: int) -> int:
    """The generator seed for output token ``index`` of a request seeded with ``seed``."""
    digest = hashlib.blake2b(
        seed.to_bytes(8, "little") + index.to_bytes(8, "little"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") >> 1  # < 2**63


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._unseeded = torch.Generator(device=device).manual_seed(seed)
        self._seeded = torch.Generator(device=device)  # re-seeded for every seeded draw
        self._drawn: dict[str, int] = {}
        """Draws so far per seeded request, for callers that give no output indices."""

    def forget(self, request_id: str) -> None:
        """Drop a finished request's draw count (only kept when no indices are given)."""
        self._drawn.pop(request_id, None)

    @torch.inference_mode()
    def sample(
        self,
        logits: torch.Tensor,  # [S, vocab] float32
        request_ids: Sequence[str],
        params: Sequence[SamplingParams],
        suppress: Sequence[Sequence[int]],
        output_indices: Sequence[int] | None = None,
    ) -> list[int]:
        """Next token per row; ``suppress[i]`` lists token ids row i may not produce (EOS
        before min_tokens). ``output_indices[i]`` is the index among its request's output
        tokens of the token row i draws (the engine passes them); without them the sampler
        counts each seeded request's draws itself (until ``forget``)."""
        for row, banned in enumerate(suppress):
            if banned:
                logits[row, list(banned)] = float("-inf")
        tokens = logits.argmax(dim=-1).tolist()
        for row, p in enumerate(params):
            if not p.greedy:
                index = None if output_indices is None else output_indices[row]
                tokens[row] = self._draw(logits[row], request_ids[row], p, index)
        return tokens

    def _draw(
        self, logits: torch.Tensor, request_id: str, p: SamplingParams, index: int | None
    ) -> int:
        # Shift the maximum to 0 before dividing: the top token stays exactly 0 and the rest
        # go towards -inf, never to +inf or NaN (greedy covers temperatures < GREEDY_BELOW).
        logits = (logits - logits.max()) / p.temperature
        if 0 < p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Drop a token when the mass before it already reaches top_p; the most
            # likely token always stays.
            drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
            drop[0] = False  # a top_p below float32's least (1e-46) compares as 0 >= 0
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self._generator(request_id, p, index)))

    def _generator(self, request_id: str, p: SamplingParams, index: int | None) -> torch.Generator:
        if p.seed is None:
            return self._unseeded
        if index is None:
            index = self._drawn.get(request_id, 0)
            self._drawn[request_id] = index + 1
        return self._seeded.manual_seed(draw_seed(p.seed, index))
