"""A failure while sampling or appending one request's token ends that request alone.

It gets one ERROR output and its blocks back to the pool; the requests batched with it
carry on and produce exactly the tokens they produce alone. A tiny but valid temperature
(1.4e-45, what a float32 proto field can carry) is decoded greedily instead of
overflowing the sampler.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.engine.engine import EngineConfig, LLMEngine
from services.engine.outputs import FinishReason, RequestOutput
from services.engine.sampler import Sampler
from services.engine.sampling_params import SamplingParams
from services.engine.sequence import SeqStatus
from tests.engine.reference import build_checkpoint

GOOD = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=8, temperature=1.0, seed=42, ignore_eos=True)
BAD = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
PROMPTS = {"good": [5, 6, 7, 8, 9], "seeded": [10, 11, 12], "bad": list(range(20, 33))}
NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("llama"), tiny_model_dir, "llama", seed=1)


def _engine(checkpoint: Path) -> LLMEngine:
    config = EngineConfig(dtype="float32", device="cpu", num_blocks=NUM_BLOCKS, block_size=4)
    return LLMEngine(str(checkpoint), config)


def _alone(checkpoint: Path, rid: str, params: SamplingParams) -> list[int]:
    engine = _engine(checkpoint)
    engine.add_request(rid, PROMPTS[rid], params)
    return [t for o in _all_outputs(engine) for t in o.token_ids]


def _all_outputs(engine: LLMEngine) -> list[RequestOutput]:
    outs: list[RequestOutput] = []
    for _ in range(100):
        if not engine.has_unfinished():
            return outs
        outs += engine.step()
    raise AssertionError("the engine never finished")


def _poison_sampling(engine: LLMEngine) -> None:
    """Drawing "bad"'s third token raises (every time), as a numerically broken draw would."""
    draw, seq = engine.sampler._draw, engine._requests["bad"].seq

    def poisoned(logits, request_id, params, *rest):
        if request_id == "bad" and seq.num_output_tokens == 2:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or < 0")
        return draw(logits, request_id, params, *rest)

    engine.sampler._draw = poisoned  # type: ignore[method-assign]


def _poison_append(engine: LLMEngine) -> None:
    """Detokenizing "bad"'s third token raises."""
    text = engine._requests["bad"].text
    push, calls = text.push, []

    def poisoned(token, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return push(token, **kw)

    text.push = poisoned  # type: ignore[method-assign]


def _poison_growing(engine: LLMEngine) -> None:
    """Giving "bad" room for its third token raises (every time), as a corrupted pool would;
    scheduling raises before any chunk of that step runs."""
    grow, seq = engine.scheduler._grow, engine._requests["bad"].seq

    def poisoned(s, n):
        if s is seq and seq.num_output_tokens == 2:
            raise RuntimeError("block pool: free list corrupted")
        return grow(s, n)

    engine.scheduler._grow = poisoned  # type: ignore[method-assign]


@pytest.mark.parametrize(
    "poison", [_poison_sampling, _poison_append, _poison_growing], ids=["sample", "append", "grow"]
)
def test_a_failing_request_ends_alone_with_error_and_frees_its_blocks(
    checkpoint: Path, poison
) -> None:
    want_good = _alone(checkpoint, "good", GOOD)
    want_seeded = _alone(checkpoint, "seeded", SEEDED)
    engine = _engine(checkpoint)
    for rid, params in (("good", GOOD), ("bad", BAD), ("seeded", SEEDED)):
        engine.add_request(rid, PROMPTS[rid], params)
    bad_seq = engine._requests["bad"].seq
    poison(engine)

    outs = _all_outputs(engine)

    by_id: dict[str, list[RequestOutput]] = {}
    for o in outs:
        by_id.setdefault(o.request_id, []).append(o)
    bad = by_id["bad"]
    assert [o.finish_reason for o in bad] == [None, None, FinishReason.ERROR]
    assert bad[-1].token_ids == () and bad[-1].usage is not None
    assert bad_seq.status == SeqStatus.FINISHED and bad_seq.block_table == []
    for rid, want in (("good", want_good), ("seeded", want_seeded)):
        assert [t for o in by_id[rid] for t in o.token_ids] == want
        assert by_id[rid][-1].finish_reason == FinishReason.LENGTH
    assert engine.scheduler.running == [] and not engine.has_unfinished()
    assert engine.pool.num_free_blocks == NUM_BLOCKS  # every block came back


def test_a_request_whose_admission_fails_ends_alone_and_the_queue_behind_it_moves(
    checkpoint: Path,
) -> None:
    """Before, the waiting request stayed at the head of the queue and raised on every pass:
    it never ended, and nothing queued behind it ever started."""
    want = {rid: _alone(checkpoint, rid, p) for rid, p in (("good", GOOD), ("seeded", SEEDED))}
    engine = _engine(checkpoint)
    for rid, params in (("bad", GOOD), ("good", GOOD), ("seeded", SEEDED)):
        engine.add_request(rid, PROMPTS[rid], params)
    bad_seq = engine._requests["bad"].seq

    def unhashable(*args: object) -> list[int]:
        raise RuntimeError("hashing the prompt's blocks failed")

    bad_seq.block_hashes = unhashable  # type: ignore[method-assign]

    outs = _all_outputs(engine)

    (bad,) = [o for o in outs if o.request_id == "bad"]
    assert (bad.finish_reason, bad.token_ids) == (FinishReason.ERROR, ())
    assert bad.usage is not None and bad.usage.prompt_tokens == len(PROMPTS["bad"])
    assert bad.usage.completion_tokens == 0
    assert bad_seq.status == SeqStatus.FINISHED and bad_seq.block_table == []
    assert bad_seq not in engine.scheduler.waiting
    got = {rid: [t for o in outs if o.request_id == rid for t in o.token_ids] for rid in want}
    assert got == want
    assert not engine.has_unfinished() and engine.pool.num_free_blocks == NUM_BLOCKS


def test_a_tiny_valid_temperature_decodes_greedily(checkpoint: Path) -> None:
    tiny = float(torch.tensor(1e-45, dtype=torch.float32))  # 1.4e-45: a float32 denormal
    SamplingParams(temperature=tiny).validate()  # valid input
    want_good = _alone(checkpoint, "good", GOOD)
    engine = _engine(checkpoint)
    engine.add_request("bad", PROMPTS["bad"], SamplingParams(max_tokens=8, temperature=tiny))
    engine.add_request("good", PROMPTS["good"], GOOD)
    outs = _all_outputs(engine)
    got = {
        rid: [t for o in outs if o.request_id == rid for t in o.token_ids]
        for rid in ("bad", "good")
    }
    greedy = _alone(checkpoint, "bad", SamplingParams(max_tokens=8, temperature=0.0))
    assert got == {"bad": greedy, "good": want_good}
    assert all(o.finish_reason != FinishReason.ERROR for o in outs)


def test_huge_logits_at_a_low_temperature_do_not_overflow() -> None:
    """Logits of 1e36 divided by 1e-4 overflow float32; shifted by the row's maximum first,
    the draw is the argmax (the others are e^-1e40 times less likely)."""
    logits = torch.tensor([[1e36, -1e36, 5e35, 0.0]])
    params = SamplingParams(temperature=1e-4, seed=1)
    (token,) = Sampler(torch.device("cpu")).sample(logits.clone(), ["r"], [params], [()])
    assert token == 0
