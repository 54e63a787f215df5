"""A seeded request yields the same tokens on one worker as split between a prefill and a
decode worker: each draw depends only on (seed, index of the output token)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.engine.engine import EngineConfig, LLMEngine
from services.engine.sampling_params import SamplingParams
from tests.engine.reference import build_checkpoint

PROMPT = [(37 * i + 11) % 4000 + 3 for i in range(13)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("llama"), tiny_model_dir, "llama", seed=1)


def _engine(checkpoint: Path, num_blocks: int = 64) -> LLMEngine:
    config = EngineConfig(dtype="float32", device="cpu", num_blocks=num_blocks, block_size=4)
    return LLMEngine(str(checkpoint), config)


def _tokens(engine: LLMEngine, rid: str) -> list[int]:
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() if o.request_id == rid for t in o.token_ids]
    return tokens


def _split(checkpoint: Path, params: SamplingParams) -> list[int]:
    """Prefill on one engine, copy the prompt's KV, decode on another (as the services do)."""
    prefill, decode = _engine(checkpoint), _engine(checkpoint, num_blocks=80)
    prefill.add_request("r", PROMPT, params, prefill_only=True)
    outs = []
    while prefill.has_unfinished():
        outs += prefill.step()
    (out,) = outs
    held, first = out.held, out.token_ids[0]
    assert held is not None
    target = decode.add_transferred_request("r", PROMPT, first, params)
    assert target is not None
    src, dst = prefill.runner.kv_cache.planes(), decode.runner.kv_cache.planes()
    for s, d in list(zip(held.block_ids, target.block_ids, strict=True))[target.num_reused :]:
        dst[:, d] = src[:, s]
    prefill.release_held("r")
    decode.transfer_done("r", ok=True)
    return [first, *_tokens(decode, "r")]


@pytest.mark.parametrize("seed", [1234, 7])
def test_seeded_tokens_equal_on_one_worker_and_split(checkpoint: Path, seed: int) -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)
    single = _engine(checkpoint)
    single.add_request("r", PROMPT, params)
    want = _tokens(single, "r")
    assert len(want) == 12 and len(set(want)) > 1  # really sampled
    assert _split(checkpoint, params) == want


def test_seeded_tokens_do_not_depend_on_the_batch(checkpoint: Path) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=99, ignore_eos=True)
    alone = _engine(checkpoint)
    alone.add_request("r", PROMPT, params)
    want = _tokens(alone, "r")
    crowd = _engine(checkpoint)
    crowd.add_request("n0", [5, 6, 7], SamplingParams(max_tokens=6, temperature=1.0))
    crowd.add_request("r", PROMPT, params)
    crowd.add_request("n1", [8, 9], SamplingParams(max_tokens=14, temperature=0.7, seed=3))
    assert _tokens(crowd, "r") == want
