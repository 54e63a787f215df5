"""Disaggregated vs aggregated serving on the same machine, same workload, back to back.

    python bench/disagg/compare.py [--num-prompts 40 --input-len 1024 --output-len 64
                                    --request-rate 1.0] --out bench/disagg

Runs two clusters one after the other, each with two workers and the
round-robin router: 1 prefill + 1 decode (disaggregated) and 2 decode workers
that prefill for themselves (aggregated). Each worker gets one of the
machine's cores (--num-threads 1). The load is `tandem bench serve` with
Poisson arrivals of long prompts, so new prompts arrive while others decode:
the case disaggregation is for. Writes <mode>.json and <mode>.png per run and
summary.md with the ratios.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.bench.cluster_run import (
    add_device_arg,
    compare_runs,
    device_args,
    run_serve_bench,
)
from services.launcher.local import ClusterConfig, free_port

MODES = {"disaggregated": (1, 1), "aggregated": (0, 2)}


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    prefill, decode = MODES[mode]
    config = ClusterConfig(
        port=free_port(), prefill=prefill, decode=decode, policy="round-robin",
        worker_args=("--num-threads", "1", "--kv-cache-gib", "0.5", *device_args(args.device)),
    )  # fmt: skip
    serve_args = [
        "--workload", "random", "--num-prompts", str(args.num_prompts),
        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--request-rate", str(args.request_rate), "--seed", str(args.seed),
        "--goodput", args.goodput,
    ]  # fmt: skip
    return run_serve_bench(config, serve_args, args.out / f"{mode}.json")


def summarize(results: dict[str, dict]) -> str:
    def fig(mode: str, metric: str, stat: str) -> float:
        return results[mode]["metrics"][metric][f"{stat}_ms"]

    rows = [
        ("TTFT p50 ms", "ttft", "p50"),
        ("TTFT p99 ms", "ttft", "p99"),
        ("ITL p50 ms", "itl", "p50"),
        ("ITL p99 ms", "itl", "p99"),
        ("TPOT p50 ms", "tpot", "p50"),
        ("E2E p50 ms", "e2e", "p50"),
    ]
    lines = ["| figure | disaggregated | aggregated | disagg / agg |", "|---|---|---|---|"]
    for label, metric, stat in rows:
        d, a = fig("disaggregated", metric, stat), fig("aggregated", metric, stat)
        lines.append(f"| {label} | {d:.1f} | {a:.1f} | {d / a:.2f}x |")
    gd = results["disaggregated"]["metrics"]["goodput"]["requests_per_s"]
    ga = results["aggregated"]["metrics"]["goodput"]["requests_per_s"]
    lines.append(
        f"| goodput req/s | {gd:.3f} | {ga:.3f} | {gd / ga if ga else float('inf'):.2f}x |"
    )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--num-prompts", type=int, default=40, help="requests sent to each cluster (default 40)"
    )
    p.add_argument(
        "--input-len", type=int, default=1024, help="prompt length in tokens (default 1024)"
    )
    p.add_argument(
        "--output-len", type=int, default=64, help="tokens generated per request (default 64)"
    )
    p.add_argument(
        "--request-rate",
        type=float,
        default=1.0,
        help="mean Poisson arrival rate in requests/s (default 1.0)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the workload (prompts and arrival times), the same for both modes "
        "(default 0)",
    )
    p.add_argument(
        "--goodput",
        default="ttft_ms=2000,tpot_ms=100",
        help="SLOs a request must meet to count towards goodput; keys ttft_ms, tpot_ms, "
        "e2e_ms (default ttft_ms=2000,tpot_ms=100)",
    )
    add_device_arg(p)
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/disagg"),
        help="directory for <mode>.json, <mode>.png and summary.md (default bench/disagg)",
    )
    args = p.parse_args()
    compare_runs(args.out, MODES, lambda mode: run_mode(mode, args), summarize)
    return 0


if __name__ == "__main__":
    sys.exit(main())
