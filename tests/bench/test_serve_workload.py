"""Serving workloads and the Poisson arrival schedule: seeded, exact lengths, right shape."""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter

import pytest

from services.bench.serve_workload import (
    poisson_schedule,
    random_prompts,
    shared_prefix_prompts,
    warmup_prompt,
)
from services.bench.workload import FIRST_ORDINARY_ID, WARMUP_INPUT_LEN


def test_schedule_is_seeded_and_starts_at_zero() -> None:
    first = poisson_schedule(200, 4.0, seed=7)
    assert first == poisson_schedule(200, 4.0, seed=7)
    assert first != poisson_schedule(200, 4.0, seed=8)
    assert len(first) == 200
    assert first[0] == 0.0
    assert all(b >= a for a, b in itertools.pairwise(first))


def test_schedule_gaps_average_one_over_the_rate() -> None:
    times = poisson_schedule(20_000, 4.0, seed=0)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Exponential gaps: mean 1/R and standard deviation 1/R (std error here 0.7%).
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.05)


def test_infinite_rate_sends_everything_at_once() -> None:
    assert poisson_schedule(5, math.inf, seed=3) == [0.0] * 5


@pytest.mark.parametrize("rate", [0.0, -1.0])
def test_rate_must_be_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="request_rate must be above 0"):
        poisson_schedule(3, rate, seed=0)


def test_random_prompts_are_seeded_distinct_and_in_range() -> None:
    prompts = random_prompts(50, 8, vocab_size=100, seed=1)
    assert prompts == random_prompts(50, 8, vocab_size=100, seed=1)
    assert prompts != random_prompts(50, 8, vocab_size=100, seed=2)
    assert all(len(p) == 8 for p in prompts)
    assert len({tuple(p) for p in prompts}) == 50
    assert all(FIRST_ORDINARY_ID <= t < 100 for p in prompts for t in p)


def test_random_prompts_stay_distinct_in_a_tiny_space() -> None:
    # 4 ordinary ids and 1-token prompts: exactly 4 distinct prompts exist.
    assert sorted(random_prompts(4, 1, vocab_size=7, seed=0)) == [[3], [4], [5], [6]]
    with pytest.raises(ValueError, match="only 4\\^1 distinct"):
        random_prompts(5, 1, vocab_size=7, seed=0)


def test_shared_prefix_groups() -> None:
    prompts = shared_prefix_prompts(10, 3, prefix_len=6, input_len=4, vocab_size=500, seed=0)
    assert prompts == shared_prefix_prompts(10, 3, 6, 4, 500, seed=0)
    assert all(len(p) == 10 for p in prompts)
    groups = Counter(tuple(p[:6]) for p in prompts)
    assert sorted(groups.values()) == [3, 3, 4]  # round-robin: 10 prompts over 3 groups
    assert len({tuple(p[6:]) for p in prompts}) == 10  # every suffix unique
    # Shuffled: not the round-robin order a, b, c, a, b, c, ...
    order = [tuple(p[:6]) for p in prompts]
    assert any(order[i] != order[i % 3] for i in range(10))


def test_shared_prefix_needs_a_group_per_prompt_at_most() -> None:
    with pytest.raises(ValueError, match="num_groups must be in"):
        shared_prefix_prompts(2, 3, 4, 4, 500, seed=0)


def test_warmup_prompt_is_short_and_apart_from_the_workload() -> None:
    warm = warmup_prompt(500, seed=0)
    assert len(warm) == WARMUP_INPUT_LEN
    assert warm != random_prompts(1, WARMUP_INPUT_LEN, 500, seed=0)[0]
