"""Random-token workloads: prompts of fixed length drawn from a seeded generator.

Prompts are token ids, never text, so their length is exact (re-encoding text can
change it). Ids below FIRST_ORDINARY_ID are skipped: in Llama-family vocabularies
(and tandem-tiny's) they are special tokens such as BOS, EOS and padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST_ORDINARY_ID = 3
WARMUP_INPUT_LEN = 8
"""Shorter than a KV block (16 by default), so the warm-up leaves nothing in the prefix
cache for the timed prompts to hit."""
WARMUP_OUTPUT_LEN = 4


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    """The timed prompts, all of the same length."""
    warmup_prompt: list[int]
    """One short prompt, drawn after the timed ones so it shares none of their tokens' draws."""


def random_workload(num_prompts: int, input_len: int, vocab_size: int, seed: int) -> Workload:
    if vocab_size <= FIRST_ORDINARY_ID:
        raise ValueError(f"vocabulary of {vocab_size} has no ids above the special ones")
    rng = random.Random(seed)

    def draw(length: int) -> list[int]:
        return [rng.randrange(FIRST_ORDINARY_ID, vocab_size) for _ in range(length)]

    prompts = [draw(input_len) for _ in range(num_prompts)]
    return Workload(prompts, draw(min(WARMUP_INPUT_LEN, input_len)))
