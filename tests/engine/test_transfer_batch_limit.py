"""Sequences receiving KV from a prefill worker hold batch slots: no step ever runs more
than max_num_seqs sequences, however transferred and local requests interleave."""

from __future__ import annotations

import pytest

from services.engine.engine import EngineConfig, LLMEngine
from services.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine_model(tiny_model_dir):
    return str(tiny_model_dir)


def _engine(model: str, max_num_seqs: int) -> LLMEngine:
    config = EngineConfig(
        dtype="float32", device="cpu", num_blocks=64, block_size=4, max_num_seqs=max_num_seqs
    )
    return LLMEngine(model, config)


def _step_sizes(engine: LLMEngine) -> list[int]:
    """Run to the end; the number of sequences scheduled in each step."""
    sizes = []
    schedule = engine.scheduler.schedule

    def counting():
        chunks = schedule()
        sizes.append(len({id(c.seq) for c in chunks}))
        return chunks

    engine.scheduler.schedule = counting  # type: ignore[method-assign]
    for _ in range(200):
        if not engine.has_unfinished():
            return sizes
        engine.step()
        assert len(engine.scheduler.running) + engine.scheduler.num_receiving <= 2
    raise AssertionError("the engine never finished")


def test_local_requests_wait_for_slots_held_by_receiving_ones(engine_model: str) -> None:
    engine = _engine(engine_model, max_num_seqs=2)
    for i in range(2):  # KV on its way from a prefill worker (wait_for_room=False)
        assert engine.add_transferred_request(f"t{i}", [5 + i] * 7, 100, GREEDY) is not None
    engine.add_request("l0", [9] * 5, GREEDY)
    engine.add_request("l1", [11] * 5, GREEDY)
    engine.step()
    assert engine.scheduler.running == []  # both slots are taken by the receiving ones
    for i in range(2):
        engine.transfer_done(f"t{i}", True)
    sizes = _step_sizes(engine)
    assert max(sizes) == 2


def test_a_transfer_into_a_full_batch_is_prefilled_here_later(engine_model: str) -> None:
    engine = _engine(engine_model, max_num_seqs=2)
    engine.add_request("l0", [9] * 5, GREEDY)
    engine.add_request("l1", [11] * 5, GREEDY)
    engine.step()  # both running
    # No batch slot: not reserved (the caller copies nothing), queued for a local prefill.
    assert engine.add_transferred_request("t0", [5] * 7, 100, GREEDY) is None
    assert engine.scheduler.num_receiving == 0
    sizes = _step_sizes(engine)
    assert max(sizes) == 2 and not engine.has_unfinished()
