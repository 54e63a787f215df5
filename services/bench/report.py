"""A throughput result as a readable table and as JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from services.bench.figures import Figures
from services.bench.throughput import ThroughputResult

_COLUMNS = ("", "requests/s", "output tok/s", "total tok/s", "wall s", "output tokens")


def format_table(result: ThroughputResult) -> str:
    config = result.config
    rows = [_row(f) for f in (result.tandem, result.baseline) if f is not None]
    widths = [max(len(r[i]) for r in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    lines = [
        f"{config.num_prompts} prompts x {config.input_len} in / {config.output_len} out, "
        f"{result.dtype} on {result.device}, model {result.model_dir}",
        *(_line(r, widths) for r in [_COLUMNS, *rows]),
    ]
    ratio = result.output_throughput_ratio
    if ratio is not None:
        lines.append(f"output tok/s, tandem / {result.baseline.name}: {ratio:.2f}x")
    if result.preemptions:
        lines.append(f"note: the engine preempted {result.preemptions} sequences (KV pool full)")
    if result.profiled:
        lines.append("note: the tandem pass ran under torch.profiler, which slows it")
    return "\n".join(lines)


def _line(cells: tuple[str, ...], widths: list[int]) -> str:
    # Name column left-aligned, numbers right-aligned.
    padded = [
        c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    ]
    return "  ".join(padded)


def _row(f: Figures) -> tuple[str, ...]:
    return (
        f.name,
        f"{f.requests_per_s:.2f}",
        f"{f.output_tokens_per_s:.1f}",
        f"{f.total_tokens_per_s:.1f}",
        f"{f.wall_s:.2f}",
        str(f.output_tokens),
    )


def result_dict(result: ThroughputResult, environment: dict[str, Any]) -> dict[str, Any]:
    """Every figure (raw counts and derived rates), the configuration and the environment."""
    config = dataclasses.asdict(result.config)
    config["profile_path"] = str(result.config.profile_path) if result.config.profile_path else None
    return {
        "benchmark": "throughput",
        "config": config,
        "model_dir": result.model_dir,
        "dtype": result.dtype,
        "device": result.device,
        "tandem": _figures(result.tandem),
        "baseline": _figures(result.baseline) if result.baseline else None,
        "output_throughput_ratio": result.output_throughput_ratio,
        "preemptions": result.preemptions,
        "profiled": result.profiled,
        "environment": environment,
    }


def _figures(f: Figures) -> dict[str, Any]:
    return {**dataclasses.asdict(f), **f.rates()}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
