"""LLMEngine on a tiny random checkpoint: bad input, broken checkpoints, and how requests end.

Every bad request raises the TandemError subclass the services map to a gRPC
status, names the field, and leaves the engine as it was: nothing queued, the
pool fully free, no KV event emitted.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.engine.engine import EngineConfig, LLMEngine
from services.engine.errors import (
    CheckpointError,
    InvalidRequestError,
    ModelNotFoundError,
    OutOfBlocksError,
    TandemError,
)
from services.engine.outputs import FinishReason, RequestOutput, Usage
from services.engine.sampling_params import SamplingParams
from tests.engine.reference import build_checkpoint

VOCAB = 4096
NUM_BLOCKS = 16
BLOCK_SIZE = 4
MAX_LEN = 64
PROMPT = [5, 6, 7, 8, 9, 10, 11]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("llama"), tiny_model_dir, "llama")


def make_engine(model: Path | str, **overrides: object) -> LLMEngine:
    config = {
        "device": "cpu",
        "dtype": "float32",
        "num_blocks": NUM_BLOCKS,
        "block_size": BLOCK_SIZE,
        "max_model_len": MAX_LEN,
        **overrides,
    }
    return LLMEngine(str(model), EngineConfig(**config))


@pytest.fixture
def engine(checkpoint: Path) -> LLMEngine:
    return make_engine(checkpoint)


@pytest.fixture(scope="module")
def greedy(checkpoint: Path) -> list[int]:
    """The checkpoint's greedy continuation of PROMPT, EOS ignored."""
    (out,) = make_engine(checkpoint).generate([PROMPT], GREEDY)
    return list(out.token_ids)


@pytest.fixture(scope="module")
def eos_case(
    tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, greedy: list[int]
) -> tuple[Path, int]:
    """A copy of the checkpoint whose EOS is the greedy continuation's k-th token.

    Returns (directory, k), with k the first position >= 3 whose token is new and whose
    text so far is plain (no partial character), so EOS arrives at a known step.
    """
    tokenizer = make_engine(checkpoint).tokenizer
    k = next(
        i
        for i in range(3, len(greedy))
        if greedy[i] not in greedy[:i]
        and tokenizer.decode(greedy[:i])
        and not tokenizer.decode(greedy[:i]).endswith("\ufffd")
    )
    directory = tmp_path_factory.mktemp("eos") / "model"
    shutil.copytree(checkpoint, directory)
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": greedy[k]})
    )
    return directory, k


def run(engine: LLMEngine, rid: str, prompt: list[int], params: SamplingParams) -> list:
    engine.add_request(rid, prompt, params)
    outputs: list[RequestOutput] = []
    while not outputs or not outputs[-1].finished:
        outputs += [o for o in engine.step() if o.request_id == rid]
    return outputs


def assert_untouched(engine: LLMEngine, num_requests: int = 0) -> None:
    assert engine.num_requests == num_requests
    assert len(engine.scheduler.waiting) == num_requests
    assert engine.scheduler.running == []
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    assert engine.events.next_seq == 0
    engine.pool.check_integrity()


# ----------------------------------------------------------------- bad requests
@pytest.mark.parametrize(
    ("prompt", "params", "field", "detail"),
    [
        ([], SamplingParams(), "prompt", "is empty"),
        (list(range(3, 3 + MAX_LEN)), SamplingParams(), "prompt", "has 64 tokens"),
        (PROMPT, SamplingParams(max_tokens=0), "max_tokens", "at least 1, got 0"),
        (PROMPT, SamplingParams(max_tokens=-1), "max_tokens", "at least 1, got -1"),
        (PROMPT, SamplingParams(top_p=0.0), "top_p", "(0, 1], got 0.0"),
        (PROMPT, SamplingParams(top_p=1.5), "top_p", "(0, 1], got 1.5"),
        (PROMPT, SamplingParams(temperature=-1.0), "temperature", "got -1.0"),
        (PROMPT, SamplingParams(temperature=float("nan")), "temperature", "got nan"),
        (PROMPT, SamplingParams(top_k=-1), "top_k", "got -1"),
        (PROMPT, SamplingParams(max_tokens=2, min_tokens=3), "min_tokens", "got 3"),
        (PROMPT, SamplingParams(seed=-1), "seed", "got -1"),
        (PROMPT, SamplingParams(stop=("ok", "")), "stop", "must not be empty"),
        (PROMPT, SamplingParams(stop=("s",) * 17), "stop", "at most 16"),
        (PROMPT, SamplingParams(stop=("x" * 1025,)), "stop", "at most 1024"),
        ([*PROMPT, VOCAB], SamplingParams(), "prompt_token_ids", "token id 4096"),
        ([-1, *PROMPT], SamplingParams(), "prompt_token_ids", "token id -1"),
        ([*PROMPT, 5.0], SamplingParams(), "prompt_token_ids", "integers, got float 5.0"),
        ([True, *PROMPT], SamplingParams(), "prompt_token_ids", "integers, got bool True"),
        # a full block of them: hashing it raised struct.error after the request was
        # registered, which then never finished and kept its id for ever
        ([float(t) for t in range(3, 11)], SamplingParams(), "prompt_token_ids", "got float"),
    ],
)
def test_bad_requests_raise_and_change_nothing(
    engine: LLMEngine, prompt: list[int], params: SamplingParams, field: str, detail: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("bad", prompt, params)
    assert info.value.field == field
    assert info.value.grpc_code == "INVALID_ARGUMENT"
    assert str(info.value).startswith(f"{field}: ")
    assert detail in str(info.value)
    assert_untouched(engine)
    # The engine still serves a good request afterwards.
    (done,) = engine.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0.0))
    assert done.usage.completion_tokens == 2


@pytest.mark.parametrize(
    ("first", "params", "field", "detail"),
    [
        (VOCAB, SamplingParams(max_tokens=4), "first_token_id", "token id 4096"),
        (-1, SamplingParams(max_tokens=4), "first_token_id", "token id -1"),
        (7, SamplingParams(max_tokens=1), "max_tokens", "nothing left to decode"),
    ],
)
def test_a_bad_handed_over_first_token_is_refused_by_its_own_name(
    engine: LLMEngine, first: int, params: SamplingParams, field: str, detail: str
) -> None:
    """A decode worker's request carries the token its prefill sampled: a bad one is named
    as that field, and max_tokens=1 (that token was the whole completion) is refused
    rather than decoded past (it streamed a second token, completion_tokens 2)."""
    with pytest.raises(InvalidRequestError) as info:
        engine.add_transferred_request("bad", PROMPT, first, params)
    assert info.value.field == field and detail in str(info.value)
    assert_untouched(engine)


def test_generate_with_a_bad_prompt_adds_none_of_them(engine: LLMEngine) -> None:
    """It added prompts one by one: the ones before a bad prompt kept running, holding
    blocks, and the next generate() failed with a KeyError on their outputs."""
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with pytest.raises(InvalidRequestError, match="prompt: is empty"):
        engine.generate([PROMPT, [5, 6, 7], []], greedy)
    assert_untouched(engine)
    (done,) = engine.generate([PROMPT], greedy)
    assert done.usage.completion_tokens == 4


def test_the_longest_prompt_the_context_admits(engine: LLMEngine) -> None:
    prompt = list(range(3, 3 + MAX_LEN - 1))
    out = run(engine, "r", prompt, SamplingParams(max_tokens=10, temperature=0.0))
    # One token fits: the context is then full.
    assert [o.token_ids for o in out] == [out[-1].token_ids]
    assert out[-1].finish_reason == FinishReason.LENGTH
    assert out[-1].usage == Usage(MAX_LEN - 1, 1, 0)


def test_duplicate_request_id(engine: LLMEngine) -> None:
    engine.add_request("same", PROMPT, SamplingParams())
    with pytest.raises(InvalidRequestError, match="request_id: 'same' is already running"):
        engine.add_request("same", [3, 4], SamplingParams())
    assert_untouched(engine, num_requests=1)
    assert engine.scheduler.waiting[0].token_ids == PROMPT


def test_a_request_larger_than_the_pool(checkpoint: Path) -> None:
    engine = make_engine(checkpoint, num_blocks=4)  # 16 tokens of KV
    with pytest.raises(OutOfBlocksError, match=r"needs 5 KV blocks \(17 tokens\) .* holds 4") as e:
        engine.add_request("big", PROMPT, SamplingParams(max_tokens=10))
    assert isinstance(e.value, TandemError)
    assert e.value.grpc_code == "RESOURCE_EXHAUSTED"
    assert_untouched(engine)
    # Exactly the pool's size is fine.
    engine.add_request("fits", PROMPT, SamplingParams(max_tokens=9))
    assert engine.num_requests == 1


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_model_len": 1}, "max_model_len"),
        ({"max_model_len": 513}, "max_model_len"),  # the checkpoint holds 512 positions
        ({"dtype": "float64"}, "dtype"),
        ({"num_blocks": None, "kv_cache_gib": 1e-9}, "kv_cache_gib"),
    ],
)
def test_bad_engine_config(checkpoint: Path, overrides: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        make_engine(checkpoint, **overrides)
    assert info.value.field == field


# ---------------------------------------------------------------- bad checkpoints
def test_unknown_model_name(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"unknown model .*no-such-model") as info:
        make_engine(tmp_path / "no-such-model")
    assert info.value.grpc_code == "NOT_FOUND"


def broken_copy(checkpoint: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "broken"
    shutil.copytree(checkpoint, directory)
    return directory


def edit_weights(directory: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")


def edit_config(directory: Path, **changes: object) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_checkpoint_without_config_json(checkpoint: Path, tmp_path: Path) -> None:
    directory = broken_copy(checkpoint, tmp_path)
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape("missing config.json")) as info:
        make_engine(directory)
    assert info.value.grpc_code == "FAILED_PRECONDITION"


def test_checkpoint_without_tokenizer_json(checkpoint: Path, tmp_path: Path) -> None:
    directory = broken_copy(checkpoint, tmp_path)
    (directory / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape("missing tokenizer.json")):
        make_engine(directory)


def test_checkpoint_with_invalid_json(checkpoint: Path, tmp_path: Path) -> None:
    directory = broken_copy(checkpoint, tmp_path)
    (directory / "config.json").write_text('{"model_type": "llama",')
    path = re.escape(str(directory / "config.json"))
    with pytest.raises(CheckpointError, match=f"{path} is not valid JSON"):
        make_engine(directory)


def test_checkpoint_with_an_unsupported_model_type(checkpoint: Path, tmp_path: Path) -> None:
    directory = broken_copy(checkpoint, tmp_path)
    edit_config(directory, model_type="gpt2")
    with pytest.raises(
        CheckpointError, match=re.escape("config.json: model_type 'gpt2' is not supported")
    ):
        make_engine(directory)


def test_checkpoint_without_safetensors(checkpoint: Path, tmp_path: Path) -> None:
    directory = broken_copy(checkpoint, tmp_path)
    (directory / "model.safetensors").rename(directory / "model.bin")
    with pytest.raises(CheckpointError, match=r"missing \*\.safetensors"):
        make_engine(directory)


def test_checkpoint_with_a_corrupt_safetensors_file(checkpoint: Path, tmp_path: Path) -> None:
    directory = broken_copy(checkpoint, tmp_path)
    (directory / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(
        CheckpointError, match=re.escape("model.safetensors is not a readable safetensors")
    ):
        make_engine(directory)


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",  # one part of a fused projection
        "lm_head.weight",
    ],
)
def test_checkpoint_missing_a_tensor(checkpoint: Path, tmp_path: Path, name: str) -> None:
    directory = broken_copy(checkpoint, tmp_path)
    edit_weights(directory, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"weight '{re.escape(name)}' is missing"):
        make_engine(directory)


def test_checkpoint_with_a_misshapen_tensor(checkpoint: Path, tmp_path: Path) -> None:
    directory = broken_copy(checkpoint, tmp_path)
    edit_weights(directory, lambda t: t.update({"model.norm.weight": torch.ones(32)}))
    with pytest.raises(
        CheckpointError,
        match=re.escape("model.norm.weight has shape (32,), config.json implies (64,)"),
    ):
        make_engine(directory)


def test_checkpoint_with_a_foreign_tensor(checkpoint: Path, tmp_path: Path) -> None:
    directory = broken_copy(checkpoint, tmp_path)
    edit_weights(directory, lambda t: t.update({"model.layers.9.extra": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"1 tensors do not belong .*model\.layers\.9\.extra"):
        make_engine(directory)


def test_checkpoint_config_that_disagrees_with_the_weights(
    checkpoint: Path, tmp_path: Path
) -> None:
    directory = broken_copy(checkpoint, tmp_path)
    edit_config(directory, intermediate_size=96)
    with pytest.raises(
        CheckpointError, match=re.escape("mlp.gate_up_proj.weight has shape (256, 64)")
    ):
        make_engine(directory)


# -------------------------------------------------------------- how requests end
def test_abort_a_running_request(engine: LLMEngine) -> None:
    engine.add_request("r", PROMPT, GREEDY)
    engine.step()
    engine.step()
    assert engine.pool.num_free_blocks == NUM_BLOCKS - 2
    out = engine.abort("r")
    assert out == RequestOutput("r", (), "", FinishReason.CANCELLED, Usage(7, 2, 0))
    assert engine.num_requests == 0
    assert not engine.scheduler.has_work()
    assert engine.pool.num_free_blocks == NUM_BLOCKS
    engine.pool.check_integrity()
    assert engine.abort("r") is None
    assert engine.step() == []


def test_abort_a_waiting_request(engine: LLMEngine) -> None:
    engine.add_request("r", PROMPT, GREEDY)
    out = engine.abort("r")
    assert (out.finish_reason, out.usage) == (FinishReason.CANCELLED, Usage(7, 0, 0))
    assert_untouched(engine)


def test_max_tokens_ends_with_length(engine: LLMEngine, greedy: list[int]) -> None:
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    out = run(engine, "r", PROMPT, params)
    assert [t for o in out for t in o.token_ids] == greedy[:5]
    assert [o.finish_reason for o in out] == [None] * 4 + [FinishReason.LENGTH]
    assert out[-1].usage == Usage(7, 5, 0)
    assert "".join(o.text for o in out) == engine.tokenizer.decode(greedy[:5])
    assert engine.pool.num_free_blocks == NUM_BLOCKS


def test_the_first_token_says_what_the_prefill_found_cached(engine: LLMEngine) -> None:
    """The first delta carries usage too (its cached tokens are known then: a router
    resuming a stream that died before its final still learns them); the middle ones none."""
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    cold = run(engine, "a", PROMPT, params)
    warm = run(engine, "b", PROMPT, params)
    assert [o.usage for o in cold] == [Usage(7, 1, 0), None, Usage(7, 3, 0)]
    assert [o.usage for o in warm] == [Usage(7, 1, 4), None, Usage(7, 3, 4)]  # one block


def test_context_limit_ends_with_length(engine: LLMEngine) -> None:
    prompt = list(range(100, 160))  # 60 of 64 positions
    out = run(engine, "r", prompt, SamplingParams(max_tokens=100, temperature=0.0))
    assert out[-1].finish_reason == FinishReason.LENGTH
    assert out[-1].usage == Usage(60, 4, 0)


def test_eos_ends_with_stop(eos_case: tuple[Path, int], greedy: list[int]) -> None:
    directory, k = eos_case
    engine = make_engine(directory)
    out = run(engine, "r", PROMPT, SamplingParams(max_tokens=24, temperature=0.0))
    # The EOS token is returned and counted; its text is not.
    assert [t for o in out for t in o.token_ids] == greedy[: k + 1]
    assert out[-1].finish_reason == FinishReason.STOP
    assert out[-1].usage == Usage(7, k + 1, 0)
    assert "".join(o.text for o in out) == engine.tokenizer.decode(greedy[:k])
    assert engine.pool.num_free_blocks == NUM_BLOCKS


def test_ignore_eos_generates_past_it(eos_case: tuple[Path, int], greedy: list[int]) -> None:
    directory, _ = eos_case
    (done,) = make_engine(directory).generate([PROMPT], GREEDY)
    assert list(done.token_ids) == greedy
    assert done.finish_reason == FinishReason.LENGTH


def test_min_tokens_prevents_an_early_eos(eos_case: tuple[Path, int], greedy: list[int]) -> None:
    directory, k = eos_case
    engine = make_engine(directory)
    eos = greedy[k]
    params = SamplingParams(max_tokens=24, min_tokens=k + 3, temperature=0.0)
    out = run(engine, "r", PROMPT, params)
    tokens = [t for o in out for t in o.token_ids]
    # Up to position k the greedy path is unchanged; there EOS is suppressed.
    assert tokens[:k] == greedy[:k]
    assert eos not in tokens[: k + 3]
    assert len(tokens) >= k + 3
    assert out[-1].finish_reason == (
        FinishReason.STOP if tokens[-1] == eos else FinishReason.LENGTH
    )


def test_eos_with_stop_strings_flushes_the_held_back_text(
    eos_case: tuple[Path, int], greedy: list[int]
) -> None:
    directory, k = eos_case
    engine = make_engine(directory)
    params = SamplingParams(max_tokens=24, temperature=0.0, stop=("never appears",))
    out = run(engine, "r", PROMPT, params)
    assert out[-1].finish_reason == FinishReason.STOP
    assert "".join(o.text for o in out) == engine.tokenizer.decode(greedy[:k])


def test_a_stop_string_ends_generation_and_is_not_returned(
    engine: LLMEngine, greedy: list[int]
) -> None:
    tokenizer = engine.tokenizer
    texts = [tokenizer.decode(greedy[:i]) for i in range(len(greedy) + 1)]
    # A stop string made of the last 2 characters of one token's text and the first of
    # the next, so it completes across a token boundary.
    j = next(
        i
        for i in range(2, len(greedy))
        if len(texts[i]) >= 2
        and len(texts[i + 1]) > len(texts[i])
        and texts[i + 1].startswith(texts[i])
        and "\ufffd" not in texts[i + 1][len(texts[i]) - 2 : len(texts[i]) + 1]
    )
    stop = texts[j + 1][len(texts[j]) - 2 : len(texts[j]) + 1]
    # Generation stops at the first token whose text contains it.
    first = next(i for i in range(len(greedy) + 1) if stop in texts[i])
    out = run(engine, "r", PROMPT, SamplingParams(max_tokens=24, temperature=0.0, stop=(stop,)))
    assert [t for o in out for t in o.token_ids] == greedy[:first]
    assert out[-1].finish_reason == FinishReason.STOP
    text = "".join(o.text for o in out)
    assert text == texts[first][: texts[first].index(stop)]
    assert stop not in text
    assert engine.pool.num_free_blocks == NUM_BLOCKS
