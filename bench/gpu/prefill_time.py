"""Seconds to prefill one prompt of N tokens (max_tokens 1, prefix caching off).

    python bench/gpu/prefill_time.py --device cuda --tokens 2048 --json FILE

The denominator of the KV-transfer target ("transfer time under 10% of that prompt's
prefill time"): the median of --reps timed prefills after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from services.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from services.engine.kv_cache import KV_LAYOUTS  # noqa: E402
from services.engine.sampling_params import SamplingParams  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="bfloat16", help="engine dtype (default bfloat16)")
    p.add_argument("--tokens", type=int, default=2048, help="prompt length (default 2048)")
    p.add_argument("--reps", type=int, default=5, help="timed prefills (default 5)")
    p.add_argument(
        "--kv-layout",
        choices=KV_LAYOUTS,
        default="slot-major",
        help="the KV pool's dimension order (default slot-major, as workers)",
    )
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    engine = LLMEngine(
        "tandem-tiny",
        EngineConfig(
            device=args.device,
            dtype=args.dtype,
            enable_prefix_caching=False,
            kv_layout=args.kv_layout,
        ),
    )
    rng = random.Random(0)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for rep in range(args.reps + 1):
        prompt = [rng.randrange(3, 4096) for _ in range(args.tokens)]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.generate([prompt], params)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if rep:  # the first is the warm-up
            times.append(time.perf_counter() - start)
    figures = {
        "device": args.device,
        "dtype": args.dtype,
        "kv_layout": args.kv_layout,
        "prompt_tokens": args.tokens,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": times,
    }
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
