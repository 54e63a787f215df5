"""The engine against transformers: same greedy tokens, fp32 logits within 1e-3.

Random Llama (GQA, llama3 rope scaling), Qwen2 (qkv bias, tied embeddings) and
Mistral checkpoints; prompts of different lengths run one at a time and all in
one batch, and again through a prefix-cache hit, chunked prefill and preemption.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from services.engine.engine import EngineConfig, LLMEngine
from services.engine.sampling_params import SamplingParams
from tests.engine.reference import (
    DEVICE,
    build_checkpoint,
    greedy_tokens,
    last_logits,
    load_reference,
)

NEW_TOKENS = 64
PROMPT_LENGTHS = (1, 7, 16, 33, 100)
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)

ARCHS = {
    "llama": {
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "rope_theta": 50000.0,
    },
    "qwen2": {"tie_word_embeddings": True},
    "mistral": {"sliding_window": None},
}


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 4096) for _ in range(n)] for n in PROMPT_LENGTHS]


class Case(NamedTuple):
    directory: Path
    reference: object
    prompts: list[list[int]]
    expected: list[list[int]]
    kv_layout: str


# Every architecture with the default pool order, and one with the other order: the
# order changes only where K/V lie, which no architecture touches.
CASES = [*((arch, "slot-major") for arch in sorted(ARCHS)), ("llama", "layer-major")]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(c))
def case(request: pytest.FixtureRequest, tmp_path_factory, tiny_model_dir: Path) -> Case:
    arch, kv_layout = request.param
    directory = build_checkpoint(
        tmp_path_factory.mktemp(arch), tiny_model_dir, arch, seed=1, **ARCHS[arch]
    )
    reference = load_reference(directory)
    prompts = _prompts(seed=len(arch))
    expected = [greedy_tokens(reference, p, NEW_TOKENS) for p in prompts]
    return Case(directory, reference, prompts, expected, kv_layout)


def _engine(case: Case, **overrides: object) -> LLMEngine:
    config = {"dtype": "float32", "device": DEVICE, "num_blocks": 256, **overrides}
    config.setdefault("kv_layout", case.kv_layout)
    return LLMEngine(str(case.directory), EngineConfig(**config))


def test_greedy_tokens_one_at_a_time(case) -> None:
    prompts, expected = case.prompts, case.expected
    engine = _engine(case)
    for prompt, want in zip(prompts, expected, strict=True):
        (got,) = engine.generate([prompt], GREEDY)
        assert list(got.token_ids) == want


def test_greedy_tokens_batched_together(case) -> None:
    prompts, expected = case.prompts, case.expected
    engine = _engine(case, enable_prefix_caching=False)
    results = engine.generate(prompts, GREEDY)
    assert [list(r.token_ids) for r in results] == expected
    assert all(r.usage.completion_tokens == NEW_TOKENS for r in results)


def test_fp32_logits_match(case) -> None:
    reference, prompts = case.reference, case.prompts
    engine = _engine(case)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, GREEDY)
    chunks = engine.scheduler.schedule()
    logits = engine.runner.execute(chunks).cpu()
    want = torch.stack([last_logits(reference, p) for p in prompts])
    torch.testing.assert_close(logits, want, atol=1e-3, rtol=0)


def test_prefix_cache_hits_keep_tokens(case) -> None:
    reference, prompts, expected = case.reference, case.prompts, case.expected
    engine = _engine(case)
    long_prompt = prompts[-1]  # 100 tokens: 6 full blocks
    (first,) = engine.generate([long_prompt], GREEDY)
    assert first.usage.cached_tokens == 0
    (again,) = engine.generate([long_prompt], GREEDY)
    assert list(again.token_ids) == expected[-1]
    assert again.usage.cached_tokens == 96
    # A new prompt sharing the first 40 tokens hits the 2 full blocks they fill.
    branched = [*long_prompt[:40], 5, 6, 7, 8, 9]
    (hit,) = engine.generate([branched], GREEDY)
    assert hit.usage.cached_tokens == 32
    assert list(hit.token_ids) == greedy_tokens(reference, branched, NEW_TOKENS)


def test_chunked_prefill_keeps_tokens(case) -> None:
    prompts, expected = case.prompts, case.expected
    engine = _engine(case, max_num_batched_tokens=24, enable_prefix_caching=False)
    results = engine.generate(prompts, GREEDY)
    assert [list(r.token_ids) for r in results] == expected


def test_preemption_keeps_tokens(case) -> None:
    prompts, expected = case.prompts, case.expected
    # 5 requests need 1+3+5+7+11 = 27 blocks at full length; 14 forces preemption.
    engine = _engine(case, num_blocks=14)
    results = engine.generate(prompts, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert [list(r.token_ids) for r in results] == expected
    assert engine.pool.num_free_blocks == 14
    engine.pool.check_integrity()


def test_wave_of_equal_prompts_decodes_in_strided_groups(case) -> None:
    """Equal-length prompts admitted together sit evenly spaced in the pool and
    are decoded by one strided attention call per layer; tokens must not change."""
    reference, prompts = case.reference, case.prompts
    wave = [prompts[-1][i : i + 20] for i in range(0, 80, 20)]
    engine = _engine(case)
    for i, prompt in enumerate(wave):
        engine.add_request(f"w{i}", prompt, GREEDY)
    outputs = engine.step()
    starts = [s.block_table[0] for s in engine.scheduler.running]
    assert len({b - a for a, b in itertools.pairwise(starts)}) == 1
    results: dict[str, list[int]] = {}
    for out in outputs:
        results.setdefault(out.request_id, []).extend(out.token_ids)
    while engine.has_unfinished():
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.token_ids)
    for i, prompt in enumerate(wave):
        assert results[f"w{i}"] == greedy_tokens(reference, prompt, NEW_TOKENS)
