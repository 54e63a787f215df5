"""What a serving benchmark sends, and when: seeded prompts and a Poisson arrival schedule.

Prompts are token ids (sent as ``prompt_token_ids``), never text, so their lengths
cannot drift through decode and re-encode. Ids below FIRST_ORDINARY_ID are special
tokens and are never drawn.

Workloads:
  random         every prompt INPUT_LEN fresh random ids; no two prompts are equal,
                 so nothing is shared between them (a re-run with the same seed
                 against a warm server will hit its prefix cache: change the seed).
  shared-prefix  NUM_GROUPS groups; each group has one random PREFIX_LEN-token
                 prefix, and each prompt is its group's prefix plus INPUT_LEN unique
                 random ids. Prompts go round-robin into groups and are then shuffled,
                 so consecutive requests rarely share a group (SGLang's
                 generated-shared-prefix benchmark).
"""

from __future__ import annotations

import math
import random

from services.bench.workload import FIRST_ORDINARY_ID, WARMUP_INPUT_LEN

WORKLOADS = ("random", "shared-prefix")


def random_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """``num_prompts`` distinct prompts of ``input_len`` ids in [FIRST_ORDINARY_ID, vocab_size)."""
    _check_vocab(vocab_size)
    return _distinct(random.Random(seed), num_prompts, input_len, vocab_size)


def shared_prefix_prompts(
    num_prompts: int,
    num_groups: int,
    prefix_len: int,
    input_len: int,
    vocab_size: int,
    seed: int,
) -> list[list[int]]:
    """``num_prompts`` prompts of ``prefix_len + input_len`` ids in ``num_groups`` groups.

    Prompt i of the unshuffled list belongs to group ``i % num_groups``; the returned
    list is a seeded shuffle of it. Suffixes are distinct across all prompts.
    """
    _check_vocab(vocab_size)
    if not 1 <= num_groups <= num_prompts:
        raise ValueError(f"num_groups must be in [1, num_prompts={num_prompts}], got {num_groups}")
    rng = random.Random(seed)
    prefixes = _distinct(rng, num_groups, prefix_len, vocab_size)
    suffixes = _distinct(rng, num_prompts, input_len, vocab_size)
    prompts = [prefixes[i % num_groups] + suffix for i, suffix in enumerate(suffixes)]
    rng.shuffle(prompts)
    return prompts


def warmup_prompt(vocab_size: int, seed: int) -> list[int]:
    """A short prompt from its own generator, shorter than a KV block so nothing is cached."""
    rng = random.Random(f"{seed}/warmup")
    return [rng.randrange(FIRST_ORDINARY_ID, vocab_size) for _ in range(WARMUP_INPUT_LEN)]


def poisson_schedule(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start of the run, one per request, non-decreasing.

    The first request goes at 0; gaps between consecutive requests are exponential
    with mean 1 / ``request_rate`` (a Poisson process). ``math.inf`` sends every
    request at 0. The same arguments always give the same schedule; it draws from its
    own generator, so changing the prompt lengths leaves it as it was.
    """
    if not request_rate > 0:
        raise ValueError(f"request_rate must be above 0 (or inf), got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(f"{seed}/arrivals")
    times = [0.0]
    for _ in range(num_requests - 1):
        times.append(times[-1] + rng.expovariate(request_rate))
    return times[:num_requests]


def _distinct(rng: random.Random, count: int, length: int, vocab_size: int) -> list[list[int]]:
    choices = vocab_size - FIRST_ORDINARY_ID
    if length * math.log(choices) < math.log(count):
        raise ValueError(
            f"only {choices}^{length} distinct sequences of {length} tokens exist, "
            f"fewer than the {count} asked for; use longer prompts"
        )
    seen: set[tuple[int, ...]] = set()
    out: list[list[int]] = []
    while len(out) < count:
        ids = [rng.randrange(FIRST_ORDINARY_ID, vocab_size) for _ in range(length)]
        if tuple(ids) not in seen:  # redraws are vanishingly rare at real lengths
            seen.add(tuple(ids))
            out.append(ids)
    return out


def _check_vocab(vocab_size: int) -> None:
    if vocab_size <= FIRST_ORDINARY_ID:
        raise ValueError(f"vocabulary of {vocab_size} has no ids above the special ones")
