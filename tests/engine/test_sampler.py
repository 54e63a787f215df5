"""Sampler: greedy is argmax, filters only ever allow the tokens they should, seeds reproduce."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from services.engine.sampler import Sampler
from services.engine.sampling_params import SamplingParams

VOCAB = 32
CPU = torch.device("cpu")
GREEDY = SamplingParams(temperature=0.0)


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=gen) * 3


def probs_logits(probs: list[float]) -> torch.Tensor:
    """One row whose softmax is ``probs`` (rest of the vocabulary impossible)."""
    row = torch.full((VOCAB,), float("-inf"))
    row[: len(probs)] = torch.tensor([math.log(p) for p in probs])
    return row


def draws(params: SamplingParams, logits: torch.Tensor, n: int, seed: int = 0) -> Counter[int]:
    """``n`` independent draws (one sampler step each) from the same row of logits."""
    sampler = Sampler(CPU, seed=seed)
    counts: Counter[int] = Counter()
    for _ in range(n):
        (token,) = sampler.sample(logits.clone()[None], ["r"], [params], [()])
        counts[token] += 1
    return counts


def test_greedy_is_argmax_for_every_row() -> None:
    logits = random_logits(5)
    tokens = Sampler(CPU).sample(logits.clone(), list("abcde"), [GREEDY] * 5, [()] * 5)
    assert tokens == logits.argmax(dim=-1).tolist()


def test_suppress_blocks_the_listed_tokens() -> None:
    logits = random_logits(2)
    top = logits.argmax(dim=-1).tolist()
    second = logits.topk(2, dim=-1).indices[:, 1].tolist()
    tokens = Sampler(CPU).sample(logits.clone(), ["a", "b"], [GREEDY] * 2, [[top[0]], ()])
    # Row 0 may not produce its best token (say, EOS before min_tokens); row 1 is untouched.
    assert tokens == [second[0], top[1]]


def test_suppressed_eos_is_never_sampled() -> None:
    eos = 3
    logits = probs_logits([0.1, 0.1, 0.1, 0.7])
    params = SamplingParams(temperature=1.0, seed=1)
    sampler = Sampler(CPU)
    drawn = {sampler.sample(logits.clone()[None], ["r"], [params], [[eos]])[0] for _ in range(300)}
    assert drawn == {0, 1, 2}


def test_top_k_1_and_a_tiny_top_p_are_greedy() -> None:
    logits = random_logits(8, seed=3)
    want = logits.argmax(dim=-1).tolist()
    sampler = Sampler(CPU, seed=5)
    ids = [f"r{i}" for i in range(8)]
    for params in (
        SamplingParams(temperature=1.5, top_k=1),
        SamplingParams(temperature=1.5, top_p=1e-6),
        SamplingParams(temperature=1.5, top_p=1e-46),  # 0 in float32: every token dropped
        SamplingParams(temperature=1.5, top_p=5e-324),
        SamplingParams(temperature=1.5, top_k=1, seed=9),
    ):
        for _ in range(5):
            assert sampler.sample(logits.clone(), ids, [params] * 8, [()] * 8) == want


def test_same_seed_same_draws_whatever_the_batch() -> None:
    logits = random_logits(4, seed=11)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    other = SamplingParams(temperature=1.0)

    alone = Sampler(CPU, seed=0)
    solo = [alone.sample(logits[2:3].clone(), ["x"], [seeded], [()])[0] for _ in range(20)]

    # The same request (same logits row) batched with others, at another position, with a
    # different engine seed and unseeded neighbours drawing from the shared generator.
    crowd = Sampler(CPU, seed=99)
    batched = []
    for step in range(20):
        order = [2, 0, 3, 1] if step % 2 else [0, 1, 3, 2]
        rows = logits[order].clone()
        ids = ["x" if i == 2 else f"n{i}" for i in order]
        params = [seeded if i == 2 else other for i in order]
        tokens = crowd.sample(rows, ids, params, [()] * 4)
        batched.append(tokens[order.index(2)])
    assert batched == solo
    assert len(set(solo)) > 1  # really sampled, not a degenerate distribution


def test_two_requests_with_one_seed_draw_the_same_tokens() -> None:
    logits = random_logits(1, seed=2).repeat(2, 1)
    seeded = SamplingParams(temperature=1.0, seed=7)
    sampler = Sampler(CPU)
    steps = [sampler.sample(logits.clone(), ["a", "b"], [seeded] * 2, [()] * 2) for _ in range(20)]
    assert all(a == b for a, b in steps)


def test_different_seeds_draw_different_tokens() -> None:
    logits = torch.zeros(1, VOCAB)  # uniform: 32 ** 20 possible sequences
    seq_a = _sequence(SamplingParams(seed=1), logits, 20)
    seq_b = _sequence(SamplingParams(seed=2), logits, 20)
    assert seq_a != seq_b
    assert seq_a == _sequence(SamplingParams(seed=1), logits, 20)


def _sequence(params: SamplingParams, logits: torch.Tensor, n: int) -> list[int]:
    sampler = Sampler(CPU)
    return [sampler.sample(logits.clone(), ["r"], [params], [()])[0] for _ in range(n)]


def test_forget_restarts_a_seeded_generator() -> None:
    logits = torch.zeros(1, VOCAB)
    params = SamplingParams(seed=3)
    sampler = Sampler(CPU)
    first = [sampler.sample(logits.clone(), ["r"], [params], [()])[0] for _ in range(10)]
    sampler.forget("r")
    again = [sampler.sample(logits.clone(), ["r"], [params], [()])[0] for _ in range(10)]
    assert again == first


def test_top_k_only_samples_the_k_most_likely() -> None:
    logits = random_logits(1, seed=4)[0]
    allowed = set(logits.topk(3).indices.tolist())
    counts = draws(SamplingParams(temperature=2.0, top_k=3), logits, 600)
    assert set(counts) == allowed


@pytest.mark.parametrize(
    ("top_p", "allowed"),
    [
        (0.35, {0}),  # token 0 alone reaches 0.35
        (0.45, {0, 1}),  # 0.4 < 0.45: token 1 is needed
        (0.5, {0, 1}),
        (0.75, {0, 1, 2}),
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_the_mass(top_p: float, allowed: set[int]) -> None:
    logits = probs_logits([0.4, 0.3, 0.2, 0.1])
    counts = draws(SamplingParams(top_p=top_p), logits, 800)
    assert set(counts) == allowed


def test_temperature_sampling_follows_the_distribution() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    counts = draws(SamplingParams(temperature=1.0, seed=0), probs_logits(probs), 4000)
    assert set(counts) == {0, 1, 2, 3}
    for token, p in enumerate(probs):
        assert abs(counts[token] / 4000 - p) < 0.03


def test_low_temperature_sharpens_and_high_temperature_flattens() -> None:
    logits = probs_logits([0.4, 0.3, 0.2, 0.1])
    cold = draws(SamplingParams(temperature=0.05), logits, 500)
    assert cold[0] > 490
    hot = draws(SamplingParams(temperature=10.0), logits, 4000)
    # At T=10 the four probabilities are within a few percent of 1/4 each.
    assert set(hot) == {0, 1, 2, 3}
    assert all(abs(hot[t] / 4000 - 0.25) < 0.05 for t in range(4))


def test_top_k_then_top_p_combine() -> None:
    logits = probs_logits([0.35, 0.3, 0.2, 0.15])
    # top_k=3 renormalizes to 0.41, 0.35, 0.24; top_p=0.7 keeps the first two (0.41 < 0.7).
    counts = draws(SamplingParams(top_k=3, top_p=0.7), logits, 800)
    assert set(counts) == {0, 1}


def test_suppress_works_on_logits_made_in_inference_mode() -> None:
    """The runner's logits come out of torch.inference_mode(); suppressing EOS must not
    fail on them (an in-place write outside inference mode raises)."""
    with torch.inference_mode():
        logits = random_logits(1)
    top = int(logits.argmax())
    (token,) = Sampler(CPU).sample(logits, ["r"], [GREEDY], [[top]])
    assert token != top
