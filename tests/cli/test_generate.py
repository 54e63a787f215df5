"""`tandem generate`: JSON output, streaming, determinism and agreement with the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli.main import main
from services.engine.engine import EngineConfig, LLMEngine
from services.engine.sampling_params import SamplingParams

PROMPT = "the quick brown fox"


def _generate_json(
    capsys: pytest.CaptureFixture[str], model: Path, flags: list[str], *args: str
) -> dict:
    assert main(["generate", "--model", str(model), *flags, "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_output_is_greedy_deterministic_and_matches_the_engine(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, engine_flags: list[str]
) -> None:
    args = ("--prompt", PROMPT, "--temperature", "0", "--max-tokens", "12", "--ignore-eos")
    first = _generate_json(capsys, tiny_model_dir, engine_flags, *args)
    second = _generate_json(capsys, tiny_model_dir, engine_flags, *args)
    assert first == second
    assert set(first) == {"token_ids", "text", "finish_reason", "usage"}
    assert first["finish_reason"] == "length"
    assert len(first["token_ids"]) == 12

    engine = LLMEngine(str(tiny_model_dir), EngineConfig(device="cpu", kv_cache_gib=0.05))
    prompt = engine.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    [expected] = engine.generate([prompt], params)
    assert first["token_ids"] == list(expected.token_ids)
    assert first["text"] == expected.text
    assert first["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": 12,
        "cached_tokens": 0,
    }


def test_prompt_token_ids_are_sent_as_given(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, engine_flags: list[str]
) -> None:
    args = ["--prompt-token-ids", "5, 6,7", "--max-tokens", "3", "--temperature", "0"]
    out = _generate_json(capsys, tiny_model_dir, engine_flags, *args)
    assert out["usage"]["prompt_tokens"] == 3
    assert len(out["token_ids"]) == out["usage"]["completion_tokens"] <= 3


def test_streamed_text_equals_the_json_text(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, engine_flags: list[str]
) -> None:
    args = ["--prompt", PROMPT, "--temperature", "0", "--max-tokens", "10", "--ignore-eos"]
    expected = _generate_json(capsys, tiny_model_dir, engine_flags, *args)["text"]
    assert main(["generate", "--model", str(tiny_model_dir), *engine_flags, *args]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_stop_string_ends_generation_before_it(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, engine_flags: list[str]
) -> None:
    args = ["--prompt", PROMPT, "--temperature", "0", "--max-tokens", "12", "--ignore-eos"]
    full = _generate_json(capsys, tiny_model_dir, engine_flags, *args)["text"]
    stop = full[len(full) // 2 :][:3]
    out = _generate_json(capsys, tiny_model_dir, engine_flags, *args, "--stop", stop)
    assert out["finish_reason"] == "stop"
    assert out["text"] == full[: full.index(stop)]


def test_seeded_sampling_repeats(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, engine_flags: list[str]
) -> None:
    args = ["--prompt", PROMPT, "--temperature", "0.8", "--top-p", "0.9", "--top-k", "50"]
    args += ["--seed", "1234", "--max-tokens", "8", "--ignore-eos"]
    first = _generate_json(capsys, tiny_model_dir, engine_flags, *args)
    assert first == _generate_json(capsys, tiny_model_dir, engine_flags, *args)
    assert len(first["token_ids"]) == 8


def test_min_tokens_holds_off_eos(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, engine_flags: list[str]
) -> None:
    args = ["--prompt", PROMPT, "--temperature", "0", "--max-tokens", "6", "--min-tokens", "6"]
    out = _generate_json(capsys, tiny_model_dir, engine_flags, *args)
    assert len(out["token_ids"]) == 6
