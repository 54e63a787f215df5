"""``tandem bench``: benchmarks, one sub-subcommand each (``throughput`` so far).

The measuring lives in services.bench; this module only turns flags into its
configuration and writes what it returns (table on stdout, optional JSON and plot).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from services.cli import arg_types
from services.cli.engine_args import add_engine_args, add_model_arg, engine_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure Tandem (throughput, ...)",
        description="Benchmarks. Each one has its own --help.",
    )
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for register_benchmark in BENCHMARKS:
        register_benchmark(benchmarks)


def _register_throughput(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "throughput",
        help="offline throughput of the engine, optionally against transformers",
        description="Offline throughput: NUM_PROMPTS random prompts of INPUT_LEN token ids "
        "run to exactly OUTPUT_LEN tokens each (greedy, EOS ignored) through an in-process "
        "engine after one untimed warm-up request. Reports requests/s, output tokens/s, "
        "total tokens/s and wall time.",
    )
    add_model_arg(parser)
    workload = parser.add_argument_group("workload")
    workload.add_argument(
        "--num-prompts",
        type=arg_types.positive_int,
        required=True,
        metavar="N",
        help="number of requests, all submitted at once",
    )
    workload.add_argument(
        "--input-len",
        type=arg_types.positive_int,
        required=True,
        metavar="I",
        help="prompt length in tokens (random ids, special ids 0-2 avoided)",
    )
    workload.add_argument(
        "--output-len",
        type=arg_types.positive_int,
        required=True,
        metavar="O",
        help="tokens generated per request (EOS ignored, so exactly O)",
    )
    workload.add_argument(
        "--seed",
        type=arg_types.non_negative_int,
        default=0,
        metavar="S",
        help="seed of the prompt generator; the same seed gives the same prompts (0)",
    )
    output = parser.add_argument_group("comparison and output")
    output.add_argument(
        "--baseline",
        choices=("transformers",),
        help="also run the same prompts through transformers' generate() on the same "
        "weights and dtype, in batches of at most --max-num-seqs, and report the ratio",
    )
    output.add_argument(
        "--json",
        type=Path,
        metavar="FILE",
        help="write every figure, the configuration and the environment to FILE as JSON",
    )
    output.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="write a bar chart of output tokens/s (tandem vs the baseline) to FILE.png",
    )
    output.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="run the timed engine pass under torch.profiler (CPU) and write the top 25 "
        "operators by self CPU time to FILE; the profiler slows the pass it measures",
    )
    add_engine_args(parser, batching=True)
    parser.set_defaults(handler=run_throughput)


BENCHMARKS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_register_throughput,)


def run_throughput(args: argparse.Namespace) -> int:
    from services.bench import report
    from services.bench.environment import describe_environment
    from services.bench.throughput import ThroughputConfig, measure_throughput

    config = ThroughputConfig(
        model=args.model,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        seed=args.seed,
        engine=engine_config(args),
        baseline=args.baseline,
        profile_path=args.profile,
    )
    result = measure_throughput(config)
    print(report.format_table(result))
    if args.json:
        environment = describe_environment(["tandem", *args.argv])
        report.write_json(args.json, report.result_dict(result, environment))
        print(f"wrote {args.json}")
    if args.plot:
        from services.bench.plots import plot_output_throughput

        plot_output_throughput(result, args.plot)
        print(f"wrote {args.plot}")
    if args.profile:
        print(f"wrote {args.profile}")
    return 0
