"""Router prefix-index scale benchmark (issue 4, item 2).

Simulates W workers and P distinct prefixes of D blocks each (default 1,000 ×
10,000 × 100 = 1,000,000 indexed blocks). Prefix popularity is Zipf-like: the
prefix of rank r is held by max(1, round(HOT / r**0.6)) random workers, each
holding a leading run of uniform [MIN_DEPTH, D] blocks (LRU eviction drops tails
first), except the first holder, which holds all D, so every block is indexed.
The index is built through ``KVIndex.apply`` with ``BlockStored`` events, as
the router would. Requests pick a prefix with probability ∝ 1/r
(10% are cold: an unknown prefix), have 64–128 blocks (blocks past the
prefix's D are unique) and are timed one ``longest_prefix`` call each with
``time.perf_counter_ns``.

Also measured: bytes per entry (``KVIndex.approx_bytes``, a ``sys.getsizeof``
walk, cross-checked with tracemalloc on a second build), build time,
``remove_worker`` time, the cost of hashing a 128-block prompt (for context),
and int bitsets against frozensets as the holder representation.

    python bench/router_index/bench_index.py [--workers N] [--no-tracemalloc]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from services.engine.block_hash import hash_prefix_blocks  # noqa: E402
from services.engine.kv_events import BlockStored  # noqa: E402
from services.router.kv_index import KEY_BYTES, KVIndex  # noqa: E402

BLOCK_SIZE = 16
HOT = 300  # holders of the most popular prefix
MIN_DEPTH = 20


def make_cluster(rng: random.Random, workers: int, prefixes: int, depth: int):
    chains = [[rng.randbytes(32) for _ in range(depth)] for _ in range(prefixes)]
    placements = []  # (worker id, prefix rank, depth held)
    for rank in range(prefixes):
        k = min(workers, max(1, round(HOT / (rank + 1) ** 0.6)))
        for i, w in enumerate(rng.sample(range(workers), k)):
            held = depth if i == 0 else rng.randint(MIN_DEPTH, depth)  # one holds it all
            placements.append((f"worker-{w:04d}", rank, held))
    rng.shuffle(placements)
    return chains, placements


def build(chains, placements) -> tuple[KVIndex, float]:
    index = KVIndex(block_size=BLOCK_SIZE)
    seqs: dict[str, int] = {}
    t0 = time.perf_counter()
    for worker, rank, held in placements:
        seq = seqs.get(worker, 0)
        index.apply(worker, BlockStored(seq, None, tuple(chains[rank][:held]), BLOCK_SIZE))
        seqs[worker] = seq + 1
    return index, time.perf_counter() - t0


def make_requests(rng: random.Random, chains, n: int) -> list[list[bytes]]:
    ranks = range(len(chains))
    weights = [1.0 / (r + 1) for r in ranks]
    picks = rng.choices(ranks, weights=weights, k=n)
    requests = []
    for rank in picks:
        length = rng.randint(64, 128)
        base = chains[rank] if rng.random() >= 0.1 else []  # 10% cold
        head = base[:length]
        requests.append(head + [rng.randbytes(32) for _ in range(length - len(head))])
    return requests


def percentiles_us(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)

    def q(p: float) -> float:
        return round(s[min(len(s) - 1, int(p * len(s)))] / 1000, 2)

    return {
        "p50_us": q(0.50),
        "p90_us": q(0.90),
        "p99_us": q(0.99),
        "max_us": round(s[-1] / 1000, 2),
        "mean_us": round(statistics.fmean(s) / 1000, 2),
    }


def time_lookups(fn, requests) -> tuple[list[int], list]:
    clock = time.perf_counter_ns
    samples, results = [], []
    for req in requests:
        t0 = clock()
        r = fn(req)
        samples.append(clock() - t0)
        results.append(r)
    return samples, results


def frozenset_lookup(holders: dict[int, frozenset[int]]):
    """The same walk with frozensets of worker slots as holder sets."""

    def longest(hashes) -> dict[int, int]:
        result: dict[int, int] = {}
        alive = holders.get(int.from_bytes(hashes[0][:KEY_BYTES], "big"))
        if not alive:
            return result
        for depth in range(1, len(hashes)):
            nxt = alive & holders.get(int.from_bytes(hashes[depth][:KEY_BYTES], "big"), EMPTY)
            for w in alive - nxt:
                result[w] = depth
            if not nxt:
                return result
            alive = nxt
        for w in alive:
            result[w] = len(hashes)
        return result

    return longest


EMPTY: frozenset[int] = frozenset()


def values_bytes(values) -> int:
    seen: set[int] = set()
    total = 0
    for v in values:
        if id(v) not in seen:
            seen.add(id(v))
            total += sys.getsizeof(v)
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=1000, help="simulated workers (default 1000)")
    ap.add_argument(
        "--prefixes", type=int, default=10_000, help="distinct prefixes indexed (default 10000)"
    )
    ap.add_argument(
        "--depth", type=int, default=100, help="blocks per prefix, 16 tokens each (default 100)"
    )
    ap.add_argument(
        "--lookups", type=int, default=20_000, help="timed longest_prefix requests (default 20000)"
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="seed of the simulated cluster and requests (default 0)"
    )
    ap.add_argument(
        "--no-tracemalloc",
        action="store_true",
        help="skip the second, tracemalloc-traced build that cross-checks bytes per entry",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).with_name("results.json"),
        help="where to write the results JSON (default results.json beside this script)",
    )
    args = ap.parse_args()
    t_start = time.perf_counter()
    rng = random.Random(args.seed)

    chains, placements = make_cluster(rng, args.workers, args.prefixes, args.depth)
    index, build_s = build(chains, placements)
    gc.collect()
    entries, pairs = index.num_entries, index.num_pairs
    approx = index.approx_bytes()
    print(
        f"built {entries:,} entries, {pairs:,} (worker, block) pairs, "
        f"{index.num_workers} workers in {build_s:.2f} s; getsizeof walk {approx / 1e6:.1f} MB"
    )

    requests = make_requests(rng, chains, args.lookups)
    for req in requests[:500]:  # warm-up
        index.longest_prefix(req)
    samples, results = time_lookups(index.longest_prefix, requests)
    lookup = percentiles_us(samples)
    matched = [len(r) for r in results]
    best = [max(r.values(), default=0) for r in results]
    print(f"longest_prefix over {len(samples):,} requests: {lookup}")

    hot = [chains[0][: args.depth] + [rng.randbytes(32) for _ in range(28)] for _ in range(2000)]
    hot_samples, hot_results = time_lookups(index.longest_prefix, hot)
    hot_stats = percentiles_us(hot_samples)
    hot_stats["workers_matched"] = len(hot_results[0])
    print(f"hottest prefix (128 blocks, {len(hot_results[0])} holders): {hot_stats}")

    # Holder representation: int bitsets (used) against frozensets of slots.
    slot = index._slot
    fs_holders: dict[int, frozenset[int]] = {}
    for worker, keys in index._keys.items():
        s = slot[worker]
        for k in keys:
            fs_holders.setdefault(k, set()).add(s)  # type: ignore[arg-type]
    fs_holders = {k: frozenset(v) for k, v in fs_holders.items()}
    fs_fn = frozenset_lookup(fs_holders)
    for req in requests[:500]:
        fs_fn(req)
    fs_samples, _ = time_lookups(fs_fn, requests)
    compare = {
        "bitset_value_bytes_per_entry": round(values_bytes(index._holders.values()) / entries, 1),
        "frozenset_value_bytes_per_entry": round(values_bytes(fs_holders.values()) / entries, 1),
        "bitset_lookup": {k: lookup[k] for k in ("p50_us", "p99_us")},
        "frozenset_lookup": {k: percentiles_us(fs_samples)[k] for k in ("p50_us", "p99_us")},
    }
    del fs_holders, fs_fn
    print(f"holders: {compare}")

    # remove_worker: the biggest worker, then a median one.
    sizes = sorted(((len(k), w) for w, k in index._keys.items()), reverse=True)
    removals = {}
    for label, (n, w) in (("largest", sizes[0]), ("median", sizes[len(sizes) // 2])):
        t0 = time.perf_counter()
        index.remove_worker(w)
        removals[label] = {"pairs": n, "ms": round((time.perf_counter() - t0) * 1000, 3)}
    print(f"remove_worker: {removals}")

    prompt = [rng.randrange(32000) for _ in range(128 * BLOCK_SIZE)]
    t0 = time.perf_counter()
    for _ in range(50):
        hash_prefix_blocks(prompt, BLOCK_SIZE, "tandem-tiny")
    hash_us = (time.perf_counter() - t0) / 50 * 1e6

    traced = None
    if not args.no_tracemalloc:
        del index
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        index2, _ = build(chains, placements)
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        del index2
        print(f"tracemalloc: {traced / 1e6:.1f} MB ({traced / entries:.0f} B/entry)")

    results_doc = {
        "command": "python bench/router_index/bench_index.py",
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "config": {
            "workers": args.workers,
            "prefixes": args.prefixes,
            "blocks_per_prefix": args.depth,
            "block_size": BLOCK_SIZE,
            "holders_of_rank_r": f"max(1, round({HOT} / r**0.6))",
            "depth_held": f"one holder {args.depth}, others uniform [{MIN_DEPTH}, {args.depth}]",
            "request_blocks": "uniform [64, 128]",
            "request_popularity": "P(rank r) ∝ 1/r, 10% cold",
            "lookups": len(samples),
            "seed": args.seed,
        },
        "index": {
            "entries": entries,
            "worker_block_pairs": pairs,
            "workers": args.workers,
            "build_s": round(build_s, 2),
            "build_us_per_pair": round(build_s / pairs * 1e6, 3),
            "approx_bytes_getsizeof": approx,
            "bytes_per_entry_getsizeof": round(approx / entries, 1),
            "bytes_per_pair_getsizeof": round(approx / pairs, 1),
            "tracemalloc_bytes": traced,
            "bytes_per_entry_tracemalloc": round(traced / entries, 1) if traced else None,
        },
        "longest_prefix": {
            **lookup,
            "mean_workers_matched": round(statistics.fmean(matched), 1),
            "mean_best_depth": round(statistics.fmean(best), 1),
        },
        "longest_prefix_hottest": hot_stats,
        "holders_bitset_vs_frozenset": compare,
        "remove_worker": removals,
        "hash_prefix_blocks_128_blocks_us": round(hash_us, 1),
        "total_run_s": round(time.perf_counter() - t_start, 1),
    }
    args.out.write_text(json.dumps(results_doc, indent=2) + "\n")
    print(f"wrote {args.out} in {results_doc['total_run_s']} s")


if __name__ == "__main__":
    main()
