"""Run `tandem bench serve` against a fresh local cluster and return its results.

The comparison benchmarks under bench/ (disaggregated vs aggregated, routing
policies) are each a loop over cluster configurations calling this, so every
configuration meets the same workload, seed and measuring code.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from services.launcher.local import ClusterConfig, LocalCluster


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """``--device``: where every worker of a benchmark cluster runs (see ``device_args``)."""
    parser.add_argument(
        "--device",
        metavar="cpu|cuda[:N]",
        help="where every worker's engine and KV pool live (default: the workers' own "
        "default, cuda when available); on one GPU all workers share it",
    )


def device_args(device: str | None) -> tuple[str, ...]:
    """Worker flags placing the engine (and KV pool) on ``device``; none for the default."""
    return ("--device", device) if device else ()


def run_serve_bench(config: ClusterConfig, serve_args: list[str], out_json: Path) -> dict:
    """Start ``config``'s cluster, drive it with ``tandem bench serve serve_args``
    (target, --json and a PNG beside the JSON are added here), stop it, return the JSON."""
    if config.log_dir is None:
        from dataclasses import replace

        config = replace(config, log_dir=Path(tempfile.mkdtemp(prefix="tandem-bench-")))
    cluster = LocalCluster(config)
    cluster.start()
    try:
        subprocess.run(
            [sys.executable, "-m", "services.cli.main", "bench", "serve",
             "--target", cluster.address, *serve_args,
             "--json", str(out_json), "--plot", str(out_json.with_suffix(".png"))],
            check=True,
        )  # fmt: skip
    finally:
        cluster.stop()
    return json.loads(out_json.read_text())


def compare_runs(
    out: Path,
    names: Iterable[str],
    run: Callable[[str], dict],
    summarize: Callable[[dict[str, dict]], str],
) -> dict[str, dict]:
    """Run each named configuration in turn (``run(name)`` writes ``out/<name>.json``), then
    write ``summarize(results)`` to ``out/summary.md`` and print it."""
    out.mkdir(parents=True, exist_ok=True)
    results = {name: run(name) for name in names}
    table = summarize(results)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    return results
