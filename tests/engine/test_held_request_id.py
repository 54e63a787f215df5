"""A request id whose prompt KV is held for a decode worker cannot be prefilled again.

A prefill-only request pins its prompt's blocks under a lease (``held``) until the decode
worker has read them (``release_held``) or the lease runs out (``expire_held``). A second
request with the same id would pin a second set under the same id and orphan the first:
it is refused, allocating nothing, and every block comes back once the one pin is let go.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.engine.engine import EngineConfig, LLMEngine
from services.engine.errors import InvalidRequestError
from services.engine.sampling_params import SamplingParams

NUM_BLOCKS = 64
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = list(range(1, 41))  # 40 tokens: 3 blocks of 16
OTHER = list(range(100, 140))


@pytest.fixture
def engine(tiny_model_dir: Path) -> LLMEngine:
    config = EngineConfig(dtype="float32", device="cpu", num_blocks=NUM_BLOCKS, block_size=16)
    return LLMEngine(str(tiny_model_dir), config)


def _prefill(engine: LLMEngine, rid: str, prompt: list[int], lease_s: float = 30.0) -> None:
    engine.add_request(rid, prompt, PARAMS, prefill_only=True, lease_s=lease_s)
    while engine.has_unfinished():
        engine.step()
    assert engine.held(rid) is not None


def _refused_again(engine: LLMEngine) -> None:
    held = engine.held("dup")
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("dup", OTHER, PARAMS, prefill_only=True)
    assert info.value.grpc_code == "INVALID_ARGUMENT"
    assert info.value.field == "request_id"
    assert "'dup' already holds KV for a decode worker" in str(info.value)
    # Nothing was allocated or queued, and the first pin is untouched.
    assert engine.pool.num_free_blocks == NUM_BLOCKS - 3
    assert not engine.has_unfinished() and not engine.has_schedulable()
    assert engine.num_held == 1 and engine.held("dup") == held


def test_a_second_prefill_of_a_held_id_is_refused_and_release_frees_every_block(
    engine: LLMEngine,
) -> None:
    assert engine.pool.num_free_blocks == NUM_BLOCKS
    _prefill(engine, "dup", PROMPT)
    assert engine.pool.num_free_blocks == NUM_BLOCKS - 3
    _refused_again(engine)
    assert engine.release_held("dup")
    assert engine.pool.num_free_blocks == NUM_BLOCKS and engine.num_held == 0
    # Once released, the id may be prefilled again.
    _prefill(engine, "dup", OTHER)
    assert engine.release_held("dup")
    assert engine.pool.num_free_blocks == NUM_BLOCKS


def test_a_second_prefill_of_a_held_id_is_refused_and_expiry_frees_every_block(
    engine: LLMEngine,
) -> None:
    _prefill(engine, "dup", PROMPT, lease_s=5.0)
    _refused_again(engine)
    assert engine.expire_held(now=engine.held("dup").expires_at) == ["dup"]
    assert engine.pool.num_free_blocks == NUM_BLOCKS and engine.num_held == 0
    assert engine.num_lease_expiries == 1
