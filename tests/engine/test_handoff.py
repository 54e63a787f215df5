"""Prefill on one engine, decode on another: the engine side of disaggregation.

The KV is copied between the two pools block by block here (the services do it
with NIXL or a byte stream); the tokens must equal one engine doing everything,
and every block must come back to the pools.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.engine.engine import EngineConfig, LLMEngine, TransferTarget
from services.engine.sampling_params import SamplingParams
from tests.engine.reference import build_checkpoint

PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPT = list(range(100, 150))  # 50 tokens: 3 full blocks + 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("llama"), tiny_model_dir, "llama", seed=3)


def _engine(directory: Path) -> LLMEngine:
    return LLMEngine(str(directory), EngineConfig(dtype="float32", device="cpu", num_blocks=64))


def _run(engine: LLMEngine) -> list[int]:
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.token_ids
    return tokens


def _copy_blocks(src: LLMEngine, src_ids: list[int], dst: LLMEngine, dst_ids: list[int]) -> None:
    src_planes, dst_planes = src.runner.kv_cache.planes(), dst.runner.kv_cache.planes()
    for s, d in zip(src_ids, dst_ids, strict=True):
        dst_planes[:, d] = src_planes[:, s]


def _prefill(prefill: LLMEngine, rid: str) -> tuple[int, list[int]]:
    prefill.add_request(rid, PROMPT, PARAMS, prefill_only=True)
    (out,) = [o for o in _drain(prefill)]
    assert out.finish_reason is None and out.usage is not None
    held = prefill.held(rid)
    assert held is not None and held.num_tokens == len(PROMPT)
    assert out.held == held  # the last delta carries the pin: no second engine call needed
    return out.token_ids[0], list(held.block_ids)


def _drain(engine: LLMEngine) -> list:
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


def test_decode_from_transferred_kv_equals_one_engine(checkpoint: Path) -> None:
    (whole,) = _engine(checkpoint).generate([PROMPT], PARAMS)
    prefill, decode = _engine(checkpoint), _engine(checkpoint)
    first, remote_ids = _prefill(prefill, "r1")
    assert first == whole.token_ids[0]
    assert prefill.pool.num_free_blocks == 64 - 4  # 4 blocks pinned under the lease

    target = decode.add_transferred_request("r1", PROMPT, first, PARAMS)
    assert target is not None and target.num_reused == 0 and len(target.block_ids) == 4
    _copy_blocks(prefill, remote_ids, decode, list(target.block_ids))
    assert prefill.release_held("r1") and not prefill.release_held("r1")
    decode.transfer_done("r1", ok=True)
    rest = _run(decode)
    assert [first, *rest] == list(whole.token_ids)
    assert prefill.pool.num_free_blocks == decode.pool.num_free_blocks == 64
    # The decode side computed none of the prompt: its 3 full prompt blocks are
    # cached from the transfer, so the same prompt now hits there.
    assert decode.scheduler.pool.num_cached_blocks >= 3


def test_decode_reuses_its_own_prefix_cache(checkpoint: Path) -> None:
    prefill, decode = _engine(checkpoint), _engine(checkpoint)
    decode.generate([PROMPT], PARAMS)  # decode now caches the prompt's 3 full blocks
    first, _ = _prefill(prefill, "r2")
    target = decode.add_transferred_request("r2", PROMPT, first, PARAMS)
    assert target is not None and target.num_reused == 3


def test_failed_transfer_falls_back_to_local_prefill(checkpoint: Path) -> None:
    (whole,) = _engine(checkpoint).generate([PROMPT], PARAMS)
    prefill, decode = _engine(checkpoint), _engine(checkpoint)
    first, _ = _prefill(prefill, "r3")
    decode.add_transferred_request("r3", PROMPT, first, PARAMS)
    decode.transfer_done("r3", ok=False)  # nothing was copied: recompute here
    assert [first, *_run(decode)] == list(whole.token_ids)
    assert decode.pool.num_free_blocks == 64


def test_lease_expiry_releases_unread_blocks(checkpoint: Path) -> None:
    prefill = _engine(checkpoint)
    prefill.add_request("r4", PROMPT, PARAMS, prefill_only=True, lease_s=5.0)
    _drain(prefill)
    held = prefill.held("r4")
    assert held is not None
    assert prefill.expire_held(held.expires_at - 1) == []
    assert prefill.expire_held(held.expires_at) == ["r4"]
    assert prefill.num_lease_expiries == 1 and prefill.pool.num_free_blocks == 64


def test_first_token_that_finishes_holds_nothing(checkpoint: Path) -> None:
    prefill = _engine(checkpoint)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    prefill.add_request("r5", PROMPT, one, prefill_only=True)
    (out,) = _drain(prefill)
    assert out.finish_reason is not None and prefill.held("r5") is None
    assert prefill.pool.num_free_blocks == 64


def test_abort_while_awaiting_kv_frees_blocks(checkpoint: Path) -> None:
    decode = _engine(checkpoint)
    target = decode.add_transferred_request("r6", PROMPT, 7, PARAMS)
    assert target is not None and decode.pool.num_free_blocks == 60
    out = decode.abort("r6")
    assert out is not None and out.finish_reason is not None
    assert decode.pool.num_free_blocks == 64
    decode.pool.check_integrity()


# -- waiting for room to receive (a decode worker's pool full of running sequences) -----

BUSY = list(range(300, 350))  # 50 tokens, no block shared with PROMPT


def _small_decode(directory: Path) -> LLMEngine:
    """8 blocks: a running 50-token request (4 blocks, then 5) leaves no room for PROMPT's
    4 plus one block of headroom for the running one."""
    return LLMEngine(str(directory), EngineConfig(dtype="float32", device="cpu", num_blocks=8))


def _busy(decode: LLMEngine) -> None:
    decode.add_request("busy", BUSY, PARAMS)
    decode.step()  # its prefill: 4 blocks taken
    assert decode.pool.num_free_blocks == 4


def test_transfer_waits_for_room_then_reads(checkpoint: Path) -> None:
    (whole,) = _engine(checkpoint).generate([PROMPT], PARAMS)
    prefill, decode = _engine(checkpoint), _small_decode(checkpoint)
    first, remote_ids = _prefill(prefill, "r7")
    _busy(decode)
    assert decode.add_transferred_request("r7", PROMPT, first, PARAMS, wait_for_room=True) is None
    assert decode.num_awaiting_room == 1 and decode.pool.num_free_blocks == 4
    steps = 0
    while not (admitted := decode.admit_awaiting()):
        assert decode.has_schedulable(), "the busy request finished and still no room"
        decode.step()
        steps += 1
    assert steps == 23  # busy's tokens after its first: room came only when it finished
    assert decode.num_awaiting_room == 0 and list(admitted) == ["r7"]
    target = admitted["r7"]
    # busy's full blocks 0-3 stay cached; its partial block 4 and the never-used 5-7 are taken
    assert target == TransferTarget((4, 5, 6, 7), 0)
    _copy_blocks(prefill, remote_ids, decode, list(target.block_ids))
    prefill.release_held("r7")
    decode.transfer_done("r7", ok=True)
    assert [first, *_run(decode)] == list(whole.token_ids)
    assert prefill.pool.num_free_blocks == 64 and decode.pool.num_free_blocks == 8
    decode.pool.check_integrity()


def test_waiting_transfer_past_its_deadline_is_prefilled_here(checkpoint: Path) -> None:
    (whole,) = _engine(checkpoint).generate([PROMPT], PARAMS)
    decode = _small_decode(checkpoint)
    _busy(decode)
    decode.add_transferred_request("r8", PROMPT, whole.token_ids[0], PARAMS, wait_for_room=True)
    assert decode.admit_awaiting(give_up=["r8"]) == {}
    assert decode.num_awaiting_room == 0
    outs = _drain(decode)
    r8 = [t for o in outs if o.request_id == "r8" for t in o.token_ids]
    assert [whole.token_ids[0], *r8] == list(whole.token_ids)
    assert decode.pool.num_free_blocks == 8


def test_abort_while_awaiting_room_leaves_the_queue(checkpoint: Path) -> None:
    decode = _small_decode(checkpoint)
    _busy(decode)
    decode.add_transferred_request("r9", PROMPT, 7, PARAMS, wait_for_room=True)
    out = decode.abort("r9")
    assert out is not None and out.finish_reason is not None
    assert decode.num_awaiting_room == 0 and decode.pool.num_free_blocks == 4
    assert decode.admit_awaiting(give_up=["r9"]) == {}  # gone: nothing to admit or give up
    _drain(decode)
    assert decode.pool.num_free_blocks == 8


def test_a_request_that_fits_the_prefill_pool_fits_a_decode_pool_of_its_size(
    checkpoint: Path,
) -> None:
    """The first token is one of max_tokens: a hand-off needs no more room than the same
    request on one worker. Counted twice, the decode worker refused (OutOfBlocksError)
    what its prefill twin took: 8 + 8 tokens in 4 blocks of 4 sized as 17 tokens."""
    config = EngineConfig(dtype="float32", device="cpu", num_blocks=4, block_size=4)
    prompt, params = PROMPT[:8], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    (whole,) = LLMEngine(str(checkpoint), config).generate([prompt], params)
    prefill, decode = (LLMEngine(str(checkpoint), config) for _ in range(2))
    prefill.add_request("r", prompt, params, prefill_only=True)
    (first,) = _drain(prefill)
    held = prefill.held("r")
    assert held is not None and held.block_ids == (0, 1)
    target = decode.add_transferred_request("r", prompt, first.token_ids[0], params)
    assert target is not None and target.block_ids == (0, 1)
    _copy_blocks(prefill, list(held.block_ids), decode, list(target.block_ids))
    assert prefill.release_held("r")
    decode.transfer_done("r", ok=True)
    assert [first.token_ids[0], *_run(decode)] == list(whole.token_ids)
    assert decode.pool.num_free_blocks == prefill.pool.num_free_blocks == 4
