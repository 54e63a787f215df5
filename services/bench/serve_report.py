"""A serving benchmark result as a readable table and as JSON."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from google.protobuf.message import Message

from services.bench.serve import ServeResult
from services.bench.serve_metrics import RequestRecord, ServeMetrics

CLIENT_LAG_NOTE_MS = 50.0
"""Without --max-concurrency, a p99 send delay above this means the client fell behind."""


def format_table(result: ServeResult) -> str:
    config, m = result.config, result.metrics
    lines = [
        f"{m.num_requests} requests to {config.target} ({config.model}): {_workload(result)}",
        f"arrivals: {_arrivals(config.request_rate)}, seed {config.seed}, "
        f"max concurrency {config.max_concurrency or 'none'}",
        "",
        f"completed          {m.completed} OK, {m.num_requests - m.completed} failed"
        + ("".join(f", {code} {n}" for code, n in m.failures.items()) if m.failures else ""),
        f"duration           {m.duration_s:.2f} s",
        f"rate               requested {_rate(m.requested_rate)}"
        # With every request due at once, sends per second only measure the client.
        + ("" if math.isinf(m.requested_rate) else f", achieved {_rate(m.achieved_rate)} (sent)"),
        f"throughput         {m.request_throughput:.2f} req/s, "
        f"{m.output_token_throughput:.1f} output tok/s, {m.total_token_throughput:.1f} total tok/s",
    ]
    if m.goodput is not None:
        slos = ", ".join(f"{k} <= {v:g}" for k, v in m.goodput.slos_ms.items())
        lines.append(
            f"goodput            {m.goodput.requests_per_s:.2f} req/s "
            f"({m.goodput.attainment:.0%} of requests met {slos})"
        )
    lines += ["", *_latency_table(m)]
    lines += _serving_lines(m)
    lines += _notes(result)
    return "\n".join(lines)


def _workload(result: ServeResult) -> str:
    c = result.config
    shape = f"{c.input_len} in / {c.output_len} out"
    if c.workload == "shared-prefix":
        shape = f"{c.num_groups} groups x {c.prefix_len}-token prefix + {shape}"
    return f"{c.workload} workload, {shape}"


def _arrivals(rate: float) -> str:
    return "all at once" if math.isinf(rate) else f"Poisson at {rate:g} req/s"


def _rate(rate: float | None) -> str:
    if rate is None:
        return "n/a"
    return "inf (all at once)" if math.isinf(rate) else f"{rate:.2f} req/s"


def _latency_table(m: ServeMetrics) -> list[str]:
    rows = [("latency (ms)", "mean", "p50", "p90", "p99", "n")]
    for name, s in (
        ("TTFT", m.ttft),
        ("TPOT", m.tpot),
        ("ITL", m.itl),
        ("E2E", m.e2e),
        ("send delay", m.send_delay),
    ):
        if s is None:
            rows.append((name, "-", "-", "-", "-", "0"))
        else:
            cells = (s.mean_ms, s.p50_ms, s.p90_ms, s.p99_ms)
            rows.append((name, *(f"{v:.2f}" for v in cells), str(s.count)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(_cells(r, widths)) for r in rows]


def _cells(row: tuple[str, ...], widths: list[int]) -> list[str]:
    # Name column left-aligned, numbers right-aligned.
    return [
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, w) in enumerate(zip(row, widths, strict=True))
    ]


def _serving_lines(m: ServeMetrics) -> list[str]:
    lines = [""]
    for role, counts in (("decode", m.decode_workers), ("prefill", m.prefill_workers)):
        total = sum(counts.values())
        if total:
            shares = ", ".join(f"{w} {n} ({n / total:.0%})" for w, n in counts.items())
            lines.append(f"{role} workers".ljust(19) + shares)
    if m.cache_hit_rate is not None:
        lines.append(
            f"prefix cache       {m.cached_tokens} of {m.prompt_tokens} prompt tokens cached "
            f"({m.cache_hit_rate:.1%})"
        )
    return lines if len(lines) > 1 else []


def _notes(result: ServeResult) -> list[str]:
    config, m = result.config, result.metrics
    notes = []
    if result.short_outputs:
        notes.append(
            f"note: {result.short_outputs} OK requests did not return exactly "
            f"{config.output_len} tokens; token figures mislead"
        )
    lag = m.send_delay
    if config.max_concurrency is None and lag is not None and lag.p99_ms > CLIENT_LAG_NOTE_MS:
        notes.append(
            f"note: p99 send delay {lag.p99_ms:.0f} ms: the client fell behind its schedule "
            "and may be the bottleneck (run it on its own core)"
        )
    if config.workload == "random" and m.cached_tokens:
        notes.append(
            "note: a random workload hit the prefix cache; a warm server that saw this --seed "
            "before inflates the figures (use a new --seed)"
        )
    return ["", *notes] if notes else []


def result_dict(result: ServeResult, environment: dict[str, Any]) -> dict[str, Any]:
    """Configuration, environment, every figure and every request's raw record.

    Times in records are seconds since the run started; summaries are milliseconds.
    An infinite rate is written as the string "inf" (JSON has no infinity).
    """
    m = result.metrics
    return _finite(
        {
            "benchmark": "serve",
            # the API key stays out of result files; TLS is recorded as on or off
            "config": {
                **{
                    k: v
                    for k, v in dataclasses.asdict(result.config).items()
                    if k not in ("api_key", "tls")
                },
                "tls": result.config.tls is not None,
            },
            "model_card": {
                "id": result.config.model,
                "vocab_size": result.vocab_size,
                "max_context_length": result.max_context_length,
            },
            "metrics": dataclasses.asdict(m),
            "worker_shares": {
                "decode": _shares(m.decode_workers),
                "prefill": _shares(m.prefill_workers),
            },
            "short_outputs": result.short_outputs,
            "environment": environment,
            "requests": [record_dict(r) for r in result.records],
        }
    )


def record_dict(record: RequestRecord) -> dict[str, Any]:
    out = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    out["token_times_s"] = list(record.token_times_s)
    out["token_counts"] = list(record.token_counts)
    out["usage"] = message_dict(record.usage) if record.usage else None
    out["serving"] = message_dict(record.serving) if record.serving else None
    return out


def message_dict(message: Message) -> dict[str, Any]:
    """A flat proto message as a dict, every field present and ints kept as numbers."""
    return {f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields}


def _shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {w: n / total for w, n in counts.items()} if total else {}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
