"""Distributions of a serving run: TTFT and inter-token latency as CDFs, side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.bench.serve import ServeResult
from services.bench.serve_metrics import LatencySummary


def plot_latency_cdfs(result: ServeResult, path: Path) -> None:
    """Write a PNG: one panel per latency, the p50 and p99 marked, the TTFT SLO if given."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    done = [r for r in result.records if r.ok]
    ttfts = [r.ttft_s * 1000 for r in done if r.ttft_s is not None]
    itls = [gap * 1000 for r in done for gap in r.itls_s]
    m = result.metrics
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    try:
        ttft_slo = m.goodput.slos_ms.get("ttft_ms") if m.goodput else None
        _cdf(left, ttfts, m.ttft, "time to first token (ms)", "requests", ttft_slo)
        _cdf(right, itls, m.itl, "inter-token latency (ms)", "token gaps", None)
        c = result.config
        rate = "all at once" if np.isinf(c.request_rate) else f"{c.request_rate:g} req/s"
        fig.suptitle(
            f"{c.model} at {c.target}: {m.num_requests} {c.workload} requests, "
            f"{c.prompt_len} in / {c.output_len} out, {rate}, "
            f"concurrency {c.max_concurrency or 'unlimited'}; {m.completed} OK",
            fontsize=10,
        )
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def _cdf(
    ax,  # matplotlib Axes; untyped so matplotlib loads only when plotting
    values_ms: Sequence[float],
    summary: LatencySummary | None,
    xlabel: str,
    counted: str,
    slo_ms: float | None,
) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"fraction of {counted} at or below")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if not values_ms or summary is None:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    xs = np.sort(np.asarray(values_ms))
    ys = np.arange(1, len(xs) + 1) / len(xs)
    # From 0 at the smallest value: without that first rise one value drew no curve.
    xs, ys = np.r_[xs[0], xs], np.r_[0.0, ys]
    ax.step(xs, ys, where="post", color="tab:blue", label=f"{len(xs) - 1} {counted}")
    for value, name, style in ((summary.p50_ms, "p50", "--"), (summary.p99_ms, "p99", ":")):
        ax.axvline(value, color="tab:gray", linestyle=style, label=f"{name} {value:.1f} ms")
    if slo_ms is not None:
        ax.axvline(slo_ms, color="tab:red", label=f"SLO {slo_ms:g} ms")
    ax.legend(loc="lower right", fontsize=8)
