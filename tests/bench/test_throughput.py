"""Offline throughput at tiny sizes: exact token counts, the baseline, JSON, plot, profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from services.bench import report
from services.bench.throughput import ThroughputConfig, ThroughputResult, measure_throughput
from services.bench.workload import FIRST_ORDINARY_ID, random_workload
from services.cli.main import main
from services.engine.engine import EngineConfig, default_dtype

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 2, 8, 4


@pytest.fixture(scope="module")
def result(tiny_model_dir: Path) -> ThroughputResult:
    config = ThroughputConfig(
        model=str(tiny_model_dir),
        num_prompts=NUM_PROMPTS,
        input_len=INPUT_LEN,
        output_len=OUTPUT_LEN,
        engine=EngineConfig(device="cpu", kv_cache_gib=0.05),
        baseline="transformers",
        show_progress=False,
    )
    return measure_throughput(config)


def test_token_counts_are_exact_for_both(result: ThroughputResult) -> None:
    assert result.baseline is not None
    for figures in (result.tandem, result.baseline):
        assert figures.num_requests == NUM_PROMPTS
        assert figures.prompt_tokens == NUM_PROMPTS * INPUT_LEN
        assert figures.output_tokens == NUM_PROMPTS * OUTPUT_LEN
        assert figures.wall_s > 0
        assert figures.output_tokens_per_s == pytest.approx(figures.output_tokens / figures.wall_s)
    expected = result.tandem.output_tokens_per_s / result.baseline.output_tokens_per_s
    assert result.output_throughput_ratio == pytest.approx(expected)
    # The engine's default for this bfloat16 checkpoint on this CPU, used by both passes.
    assert result.dtype == default_dtype("bfloat16", torch.device("cpu"))
    assert not result.profiled


def test_table_shows_both_runs_and_the_ratio(result: ThroughputResult) -> None:
    table = report.format_table(result)
    assert "tandem" in table
    assert "transformers" in table
    assert "output tok/s, tandem / transformers:" in table


def test_json_holds_figures_config_and_environment(
    result: ThroughputResult, tmp_path: Path
) -> None:
    path = tmp_path / "out" / "results.json"
    report.write_json(path, report.result_dict(result, {"cpu_model": "x"}))
    data = json.loads(path.read_text())
    assert data["tandem"]["output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    assert data["baseline"]["output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    assert data["tandem"]["output_tokens_per_s"] > 0
    assert data["config"]["engine"]["kv_cache_gib"] == 0.05
    assert data["environment"] == {"cpu_model": "x"}


def test_cli_writes_json_plot_and_profile(
    capsys: pytest.CaptureFixture[str],
    tiny_model_dir: Path,
    engine_flags: list[str],
    tmp_path: Path,
) -> None:
    files = {name: tmp_path / name for name in ("r.json", "t.png", "profile.txt")}
    argv = ["bench", "throughput", "--model", str(tiny_model_dir), *engine_flags]
    argv += ["--num-prompts", "2", "--input-len", "8", "--output-len", "4", "--seed", "3"]
    argv += ["--baseline", "transformers", "--max-num-seqs", "1"]
    argv += ["--json", str(files["r.json"]), "--plot", str(files["t.png"])]
    argv += ["--profile", str(files["profile.txt"])]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "output tok/s, tandem / transformers:" in out

    data = json.loads(files["r.json"].read_text())
    assert data["tandem"]["output_tokens"] == data["baseline"]["output_tokens"] == 8
    assert data["profiled"] is True
    env = data["environment"]
    assert {"torch_version", "torch_threads", "cpu_model", "date", "command_line"} <= set(env)
    assert env["command_line"].startswith("tandem bench throughput --model ")
    assert files["t.png"].read_bytes().startswith(PNG_MAGIC)
    assert "Self CPU" in files["profile.txt"].read_text()


def test_too_long_for_the_context_exits_2(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: Path, engine_flags: list[str]
) -> None:
    argv = ["bench", "throughput", "--model", str(tiny_model_dir), *engine_flags]
    argv += ["--num-prompts", "1", "--input-len", "4000", "--output-len", "200"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is 4200 tokens but the model's context holds 4096" in err


def test_bad_sizes_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "throughput", "--model", "tandem-tiny", "--input-len", "8", "--output-len"]
    assert main([*argv, "4", "--num-prompts", "0"]) == 2
    assert "argument --num-prompts: must be at least 1, got 0" in capsys.readouterr().err


def test_workload_is_seeded_and_avoids_special_ids() -> None:
    a = random_workload(4, 16, vocab_size=100, seed=7)
    assert a == random_workload(4, 16, vocab_size=100, seed=7)
    assert a != random_workload(4, 16, vocab_size=100, seed=8)
    assert all(len(p) == 16 for p in a.prompts)
    ids = [t for p in [*a.prompts, a.warmup_prompt] for t in p]
    assert min(ids) >= FIRST_ORDINARY_ID and max(ids) < 100
    assert a.warmup_prompt not in a.prompts
