"""Routing policies side by side on a shared-prefix workload (issue 4's benchmark).

    python bench/kv_routing/compare.py [--groups 16 --per-group 8 --prefix-len 1024
                                        --suffix-len 64 --output-len 32 --request-rate 2]

For each variant (round-robin, least-loaded, kv-aware, and kv-aware with the
decode worker's local-prefill shortcut off) a fresh cluster of 3
prefill + 1 decode workers (one CPU thread each) serves the same seeded
workload: G groups × M prompts, each group sharing a long system prefix, with
Poisson arrivals. Reports per policy the measured prefix hit rate against the
workload's theoretical maximum, TTFT p50/p99, and each worker's share of the
requests; writes <policy>.json / .png and summary.md.

Theoretical maximum hit rate: only a group's first prompt must compute its
prefix; every later one could reuse all of its full blocks:
(M − 1) × ⌊P / block⌋ × block / (M × (P + S)) over prompt tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services.bench.cluster_run import run_serve_bench
from services.launcher.local import ClusterConfig, free_port

# name → (router policy, extra router flags)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "round-robin": ("round-robin", ()),
    "least-loaded": ("least-loaded", ()),
    "kv-aware": ("kv-aware", ()),
    # kv-aware placement, but every prompt goes through the prefill pool: the
    # decode worker never takes the short-prompt / cached-prefix shortcut.
    "kv-aware-always-disagg": (
        "kv-aware",
        ("--local-prefill-max-tokens", "0", "--local-prefill-min-cached", "2"),
    ),
}
BLOCK = 16


def theoretical_hit_rate(per_group: int, prefix: int, suffix: int) -> float:
    cacheable = (prefix // BLOCK) * BLOCK
    return (per_group - 1) * cacheable / (per_group * (prefix + suffix))


def run_policy(variant: str, args: argparse.Namespace) -> dict:
    policy, router_args = VARIANTS[variant]
    config = ClusterConfig(
        port=free_port(), prefill=3, decode=1, policy=policy, router_args=router_args,
        worker_args=("--num-threads", "1", "--kv-cache-gib", "0.5"),
    )  # fmt: skip
    serve_args = [
        "--workload", "shared-prefix", "--num-groups", str(args.groups),
        "--num-prompts", str(args.groups * args.per_group),
        "--prefix-len", str(args.prefix_len), "--input-len", str(args.suffix_len),
        "--output-len", str(args.output_len), "--request-rate", str(args.request_rate),
        "--seed", str(args.seed),
    ]  # fmt: skip
    return run_serve_bench(config, serve_args, args.out / f"{variant}.json")


def summarize(results: dict[str, dict], theoretical: float) -> str:
    lines = [
        f"theoretical maximum prefix hit rate: {theoretical:.1%}",
        "",
        "| policy | hit rate | of max | TTFT p50 ms | TTFT mean ms | TTFT p99 ms | prefill shares "
        "| TTFT p50 / mean vs round-robin |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rr = results["round-robin"]["metrics"]["ttft"]
    for policy, r in results.items():
        m = r["metrics"]
        hit = m["cache_hit_rate"]
        shares = m.get("prefill_workers") or {}
        total = sum(shares.values()) or 1
        share_text = ", ".join(f"{w} {n / total:.0%}" for w, n in sorted(shares.items()))
        lines.append(
            f"| {policy} | {hit:.1%} | {hit / theoretical:.0%} | {m['ttft']['p50_ms']:.0f} | "
            f"{m['ttft']['mean_ms']:.0f} | {m['ttft']['p99_ms']:.0f} | {share_text} | "
            f"{rr['p50_ms'] / m['ttft']['p50_ms']:.2f}x / "
            f"{rr['mean_ms'] / m['ttft']['mean_ms']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--groups",
        type=int,
        default=16,
        help="prompt groups, each sharing one system prefix (default 16)",
    )
    p.add_argument("--per-group", type=int, default=8, help="prompts per group (default 8)")
    p.add_argument(
        "--prefix-len",
        type=int,
        default=1024,
        help="tokens of each group's shared prefix (default 1024)",
    )
    p.add_argument(
        "--suffix-len",
        type=int,
        default=64,
        help="tokens of each prompt's own suffix after the prefix (default 64)",
    )
    p.add_argument(
        "--output-len", type=int, default=32, help="tokens generated per request (default 32)"
    )
    p.add_argument(
        "--request-rate",
        type=float,
        default=2.0,
        help="mean Poisson arrival rate in requests/s (default 2.0)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the workload (prompts and arrival times), the same for every policy "
        "(default 0)",
    )
    p.add_argument(
        "--policies",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="variants to run, one fresh cluster each (default: all)",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="read the JSON of variants not run now from --out instead of skipping them",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/kv_routing"),
        help="directory for <policy>.json, <policy>.png and summary.md (default bench/kv_routing)",
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for variant in VARIANTS:
        if variant in args.policies:
            results[variant] = run_policy(variant, args)
        elif args.reuse and (args.out / f"{variant}.json").exists():
            results[variant] = json.loads((args.out / f"{variant}.json").read_text())
    table = summarize(
        results, theoretical_hit_rate(args.per_group, args.prefix_len, args.suffix_len)
    )
    (args.out / "summary.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
