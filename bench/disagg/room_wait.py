"""A full decode pool: prefilled requests wait for room, or are prefilled again there.

    python bench/disagg/room_wait.py [--num-prompts 40 --input-len 512 --output-len 64
                                      --request-rate 2 --decode-kv-cache-gib 0.03]
                                     --out bench/disagg/room-wait

Runs the same disaggregated cluster (1 prefill + 1 decode worker, round-robin router) twice
on the same seeded workload, back to back: with ``--kv-room-wait-s 0`` (a request whose KV
does not fit the decode worker's pool is queued to be prefilled there again, the behaviour
before 2026-11-26) and with the default wait (it waits, first come first served, for room,
and its KV is read in). The decode worker's pool is kept small so that it fills. Writes
<mode>.json and <mode>.png per run and summary.md: per mode, how many requests had their
KV read versus recomputed on the decode worker, and the latency figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.bench.cluster_run import (
    add_device_arg,
    compare_runs,
    device_args,
    run_serve_bench,
)
from services.launcher.local import ClusterConfig, free_port

MODES = {"prefill-again": "0", "wait-for-room": "10"}
"""Mode name → the decode worker's --kv-room-wait-s."""


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    config = ClusterConfig(
        port=free_port(), prefill=1, decode=1, policy="round-robin",
        worker_args=("--num-threads", "1", "--dtype", "float32", *device_args(args.device)),
        decode_args=("--kv-cache-gib", str(args.decode_kv_cache_gib),
                     "--kv-room-wait-s", MODES[mode]),
    )  # fmt: skip
    serve_args = [
        "--workload", "random", "--num-prompts", str(args.num_prompts),
        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--request-rate", str(args.request_rate), "--seed", str(args.seed),
    ]  # fmt: skip
    return run_serve_bench(config, serve_args, args.out / f"{mode}.json")


def kv_read_share(result: dict) -> tuple[int, int]:
    """(requests whose KV was read from the prefill worker, requests in all)."""
    requests = result["requests"]
    read = sum(1 for r in requests if r.get("serving", {}).get("kv_transfer_bytes", 0) > 0)
    return read, len(requests)


def summarize(results: dict[str, dict]) -> str:
    lines = [
        "| figure | " + " | ".join(MODES) + " |",
        "|---|" + "---|" * len(MODES),
    ]
    shares = [kv_read_share(results[m]) for m in MODES]
    lines.append("| KV read / requests | " + " | ".join(f"{r} / {n}" for r, n in shares) + " |")
    for label, metric, stat in (
        ("TTFT p50 ms", "ttft", "p50"),
        ("TTFT p99 ms", "ttft", "p99"),
        ("ITL p50 ms", "itl", "p50"),
        ("ITL p99 ms", "itl", "p99"),
        ("TPOT p50 ms", "tpot", "p50"),
        ("E2E p50 ms", "e2e", "p50"),
        ("E2E p99 ms", "e2e", "p99"),
    ):
        cells = [f"{results[m]['metrics'][metric][f'{stat}_ms']:.1f}" for m in MODES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = [f"{results[m]['metrics']['output_token_throughput']:.1f}" for m in MODES]
    lines.append("| output tok/s | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--num-prompts", type=int, default=40, help="requests per run (default 40)")
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--output-len", type=int, default=64, help="output tokens (default 64)")
    p.add_argument(
        "--request-rate", type=float, default=2.0, help="Poisson arrivals per second (default 2)"
    )
    p.add_argument("--seed", type=int, default=0, help="workload seed, both runs (default 0)")
    p.add_argument(
        "--decode-kv-cache-gib",
        type=float,
        default=0.03,
        help="the decode worker's KV pool in GiB, small so that it fills (default 0.03: "
        "~1,900 tokens of float32 tandem-tiny, three 576-token requests)",
    )
    add_device_arg(p)
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/disagg/room-wait"),
        help="directory for <mode>.json, <mode>.png and summary.md",
    )
    args = p.parse_args()
    compare_runs(args.out, MODES, lambda mode: run_mode(mode, args), summarize)
    return 0


if __name__ == "__main__":
    sys.exit(main())
