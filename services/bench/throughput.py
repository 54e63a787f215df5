"""Offline throughput: a batch of random prompts through the engine, timed end to end.

Every prompt is submitted at once and the engine batches them (continuous batching
under its token budget). Greedy decoding with EOS ignored fixes every output at
exactly ``output_len`` tokens, so runs compare like for like; the optional
transformers baseline runs the same prompts in the same process right after, because
these machines are noisy and only side-by-side ratios are trustworthy.
"""

from __future__ import annotations

import gc
import importlib.util
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from services.bench.figures import Figures
from services.bench.profiling import cpu_profile
from services.bench.workload import WARMUP_OUTPUT_LEN, Workload, random_workload
from services.engine.engine import EngineConfig, LLMEngine
from services.engine.errors import InvalidRequestError, TandemError
from services.engine.outputs import FinishReason
from services.engine.sampling_params import SamplingParams

BASELINES = ("transformers",)


class BenchmarkError(TandemError):
    """A benchmark run could not produce trustworthy figures (failed requests, short outputs)."""


@dataclass(frozen=True)
class ThroughputConfig:
    """One offline throughput run."""

    model: str
    """Model directory or "tandem-tiny"."""
    num_prompts: int
    """Requests, all submitted at once."""
    input_len: int
    """Prompt length in tokens."""
    output_len: int
    """Tokens generated per request (EOS ignored)."""
    seed: int = 0
    """Seed of the prompt generator."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Engine configuration; its max_num_seqs also caps the baseline's batch size."""
    baseline: str | None = None
    """"transformers" to also time transformers' generate(); None for tandem only."""
    profile_path: Path | None = None
    """Profile the timed tandem pass and write the operator table here."""
    show_progress: bool = True
    """Draw a tqdm progress bar on stderr while requests complete."""


@dataclass(frozen=True)
class ThroughputResult:
    """Figures of a run and what they were measured on."""

    config: ThroughputConfig
    model_dir: str
    """The resolved model directory."""
    dtype: str
    """dtype both passes ran in, e.g. "bfloat16"."""
    device: str
    tandem: Figures
    baseline: Figures | None
    preemptions: int
    """Sequences the engine's scheduler preempted (KV pool full) during the timed pass."""
    profiled: bool
    """True when the tandem pass ran under the profiler, which slows it."""

    @property
    def output_throughput_ratio(self) -> float | None:
        """tandem output tokens/s ÷ baseline output tokens/s (None without a baseline)."""
        if self.baseline is None:
            return None
        return self.tandem.output_tokens_per_s / self.baseline.output_tokens_per_s


def measure_throughput(config: ThroughputConfig) -> ThroughputResult:
    """Run the workload through tandem, then (optionally) the baseline; return both figures."""
    _check_config(config)
    engine = LLMEngine(config.model, config.engine)
    _check_fits(config, engine)
    workload = random_workload(
        config.num_prompts, config.input_len, engine.model_config.vocab_size, config.seed
    )
    tandem = _run_tandem(engine, workload, config)
    facts = {
        "model_dir": str(engine.model_dir),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "device": str(engine.device),
        # The one-request warm-up cannot be preempted, so this counts the timed pass.
        "preemptions": engine.scheduler.num_preemptions,
    }
    baseline = None
    if config.baseline:
        model_dir, dtype, device = engine.model_dir, engine.dtype, engine.device
        batch_size = engine.config.max_num_seqs
        del engine  # free the engine's weights and KV pool before loading a second copy
        gc.collect()
        baseline = _run_baseline(model_dir, dtype, device, workload, config, batch_size)
    profiled = config.profile_path is not None
    return ThroughputResult(config, tandem=tandem, baseline=baseline, profiled=profiled, **facts)


def _run_tandem(engine: LLMEngine, workload: Workload, config: ThroughputConfig) -> Figures:
    warmup = SamplingParams(max_tokens=WARMUP_OUTPUT_LEN, temperature=0.0, ignore_eos=True)
    engine.generate([workload.warmup_prompt], warmup)
    params = SamplingParams(max_tokens=config.output_len, temperature=0.0, ignore_eos=True)
    title = (
        f"tandem: {config.num_prompts} prompts x {config.input_len} in / {config.output_len} out"
    )
    with _progress("tandem", config) as bar, cpu_profile(config.profile_path, title):
        start = time.perf_counter()
        completions = engine.generate(workload.prompts, params, on_progress=bar.update)
        wall = time.perf_counter() - start
    failed = [c for c in completions if c.finish_reason is FinishReason.ERROR]
    if failed:
        raise BenchmarkError(
            f"{len(failed)} of {len(completions)} requests ended with an engine error "
            "(see the log above); no figures reported"
        )
    output_tokens = sum(len(c.token_ids) for c in completions)
    prompt_tokens = sum(c.usage.prompt_tokens for c in completions)
    _check_output_tokens("tandem", output_tokens, config)
    return Figures("tandem", len(completions), prompt_tokens, output_tokens, wall)


def _run_baseline(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    workload: Workload,
    config: ThroughputConfig,
    batch_size: int,
) -> Figures:
    from services.bench import hf_baseline

    model = hf_baseline.load_transformers(model_dir, dtype, device)
    hf_baseline.warm_up(model, workload.warmup_prompt)
    with _progress(hf_baseline.NAME, config) as bar:
        figures = hf_baseline.time_generate(
            model, workload.prompts, config.output_len, batch_size, on_progress=bar.update
        )
    _check_output_tokens(figures.name, figures.output_tokens, config)
    return figures


def _progress(name: str, config: ThroughputConfig) -> tqdm:
    return tqdm(
        total=config.num_prompts,
        desc=name,
        unit="req",
        file=sys.stderr,
        disable=not config.show_progress,
    )


def _check_config(config: ThroughputConfig) -> None:
    for name in ("num_prompts", "input_len", "output_len"):
        value = getattr(config, name)
        if value < 1:
            raise InvalidRequestError(name, f"must be at least 1, got {value}")
    if config.baseline is not None and config.baseline not in BASELINES:
        raise InvalidRequestError(
            "baseline", f"must be one of {', '.join(BASELINES)}, got {config.baseline!r}"
        )
    # Fail before the tandem pass, not after it, when the baseline cannot run.
    if config.baseline == "transformers" and importlib.util.find_spec("transformers") is None:
        raise InvalidRequestError(
            "baseline", "transformers is not installed; pip install 'tandem[test]' or drop it"
        )


def _check_fits(config: ThroughputConfig, engine: LLMEngine) -> None:
    # The engine quietly caps a request at the context length; a benchmark must not,
    # or it would report fewer tokens than asked for.
    total = config.input_len + config.output_len
    if total > engine.max_model_len:
        raise InvalidRequestError(
            "--input-len + --output-len",
            f"is {total} tokens but the model's context holds {engine.max_model_len}; "
            "shorten --input-len or --output-len",
        )


def _check_output_tokens(name: str, counted: int, config: ThroughputConfig) -> None:
    expected = config.num_prompts * config.output_len
    if counted != expected:
        raise BenchmarkError(
            f"{name} generated {counted} tokens, expected {expected} "
            f"({config.num_prompts} prompts x {config.output_len}); its figures would mislead"
        )
