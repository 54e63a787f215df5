"""Pick each sequence's next token from its logits.

Greedy rows are decided together with one argmax. Sampled rows apply
temperature, then top-k, then top-p, and draw with the request's own generator,
so a seeded request yields the same tokens whatever it is batched with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.engine.sampling_params import SamplingParams


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._unseeded = torch.Generator(device=device).manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator."""
        self._generators.pop(request_id, None)

    @torch.inference_mode()
    def sample(
        self,
        logits: torch.Tensor,  # [S, vocab] float32
        request_ids: Sequence[str],
        params: Sequence[SamplingParams],
        suppress: Sequence[Sequence[int]],
    ) -> list[int]:
        """Next token per row; ``suppress[i]`` lists token ids row i may not produce (EOS
        before min_tokens)."""
        for row, banned in enumerate(suppress):
            if banned:
                logits[row, list(banned)] = float("-inf")
        tokens = logits.argmax(dim=-1).tolist()
        for row, p in enumerate(params):
            if not p.greedy:
                tokens[row] = self._draw(logits[row], request_ids[row], p)
        return tokens

    def _draw(self, logits: torch.Tensor, request_id: str, p: SamplingParams) -> int:
        logits = logits / p.temperature
        if 0 < p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Drop a token when the mass before it already reaches top_p; the most
            # likely token always stays.
            drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self._generator(request_id, p)))

    def _generator(self, request_id: str, p: SamplingParams) -> torch.Generator:
        if p.seed is None:
            return self._unseeded
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(p.seed)
            self._generators[request_id] = gen
        return gen
