"""``tandem bench``: benchmarks, one sub-subcommand each (``throughput``, ``serve``).

The measuring lives in services.bench; this module only turns flags into its
configuration and writes what it returns (table on stdout, optional JSON and plot).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from services.cli import arg_types
from services.cli.engine_args import add_engine_args, add_model_arg, engine_config
from services.cli.tls_args import add_client_tls_args, client_tls

if TYPE_CHECKING:
    from services.rpc.tls import TlsConfig

ANSWER_PROBE_S = 2.0
"""After a failed start: how long the target gets to accept a connection, for the hint."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure Tandem (offline throughput, online serving)",
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
        type=arg_types.output_file(),
        metavar="FILE",
        help="write every figure, the configuration and the environment to FILE as JSON",
    )
    output.add_argument(
        "--plot",
        type=arg_types.output_file(".png"),
        metavar="FILE.png",
        help="write a bar chart of output tokens/s (tandem vs the baseline) to FILE.png",
    )
    output.add_argument(
        "--profile",
        type=arg_types.output_file(),
        metavar="FILE",
        help="run the timed engine pass under torch.profiler (CPU) and write the top 25 "
        "operators by self CPU time to FILE; the profiler slows the pass it measures",
    )
    add_engine_args(parser, batching=True)
    parser.set_defaults(handler=run_throughput)


def _register_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="latency and throughput of a running Inference service under load",
        description="Online serving benchmark: NUM_PROMPTS requests sent to a running "
        "tandem.v1.Inference service (a gateway or a router) on a seeded Poisson "
        "schedule, open loop, after one untimed warm-up request. Prompts are token ids; "
        "every request is greedy with EOS ignored and exactly OUTPUT_LEN tokens. Reports "
        "TTFT, TPOT, ITL and E2E latency (mean, p50, p90, p99), request and token "
        "throughput, goodput under --goodput SLOs, failures by status code, requested vs "
        "achieved rate, per-worker shares and prefix-cache hits. Latencies start when "
        "each request is sent (as vLLM's benchmark measures them); time it waited in the "
        "client first (for a --max-concurrency slot, or behind a client that fell "
        "behind its schedule) is reported apart, as the send delay.",
    )
    parser.add_argument(
        "--target",
        required=True,
        type=arg_types.host_port,
        metavar="HOST:PORT",
        help="the Inference service to load",
    )
    parser.add_argument(
        "--model",
        default="tandem-tiny",
        metavar="ID",
        help="model id to ask for, as ListModels names it (tandem-tiny)",
    )
    workload = parser.add_argument_group("workload")
    workload.add_argument(
        "--workload",
        choices=("random", "shared-prefix"),
        default="random",
        help="random: distinct random prompts; shared-prefix: NUM_GROUPS random prefixes "
        "of PREFIX_LEN tokens, each prompt one of them plus INPUT_LEN unique tokens, "
        "groups interleaved in a seeded shuffle (random)",
    )
    workload.add_argument(
        "--num-prompts",
        type=arg_types.positive_int,
        required=True,
        metavar="N",
        help="number of requests",
    )
    workload.add_argument(
        "--input-len",
        type=arg_types.positive_int,
        required=True,
        metavar="I",
        help="prompt tokens (random ids, special ids 0-2 avoided); with shared-prefix, "
        "the unique tokens after the prefix",
    )
    workload.add_argument(
        "--output-len",
        type=arg_types.positive_int,
        required=True,
        metavar="O",
        help="tokens generated per request (min_tokens = max_tokens = O, EOS ignored)",
    )
    workload.add_argument(
        "--num-groups",
        type=arg_types.positive_int,
        metavar="G",
        help="shared-prefix: number of distinct prefixes (required with it)",
    )
    workload.add_argument(
        "--prefix-len",
        type=arg_types.positive_int,
        metavar="P",
        help="shared-prefix: tokens in each prefix (required with it)",
    )
    workload.add_argument(
        "--seed",
        type=arg_types.non_negative_int,
        default=0,
        metavar="S",
        help="seed of the prompts and arrival times; against a warm server, a seed it has "
        "seen before hits its prefix cache (0)",
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--request-rate",
        type=_request_rate,
        required=True,
        metavar="R|inf",
        help="mean requests/s of Poisson arrivals (exponential gaps, mean 1/R); "
        "inf sends every request at once",
    )
    load.add_argument(
        "--max-concurrency",
        type=arg_types.positive_int,
        metavar="C",
        help="most requests in flight; the rest wait in the client, a wait reported as "
        "the send delay, not in their latency (default: no cap)",
    )
    load.add_argument(
        "--timeout",
        type=arg_types.positive_float,
        default=300.0,
        metavar="S",
        help="deadline of each request in seconds, from when it is sent (300)",
    )
    load.add_argument(
        "--api-key",
        metavar="KEY",
        help="API key (or access token) sent as 'authorization: Bearer KEY' on every request, "
        "needed by a gateway (default: $TANDEM_API_KEY); never printed, and kept out of the "
        "--json file's config and command line",
    )
    add_client_tls_args(load)
    output = parser.add_argument_group("output")
    output.add_argument(
        "--goodput",
        type=_slos,
        default={},
        metavar="ttft_ms=X,tpot_ms=Y",
        help="SLOs for goodput (requests/s meeting all of them); keys ttft_ms, tpot_ms, e2e_ms",
    )
    output.add_argument(
        "--json",
        type=arg_types.output_file(),
        metavar="FILE",
        help="write the configuration, environment, every figure and every request's "
        "raw timings to FILE as JSON",
    )
    output.add_argument(
        "--plot",
        type=arg_types.output_file(".png"),
        metavar="FILE.png",
        help="write CDFs of TTFT and inter-token latency to FILE.png",
    )
    parser.set_defaults(handler=run_serve)


BENCHMARKS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _register_throughput,
    _register_serve,
)


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


def run_serve(args: argparse.Namespace) -> int:
    from services.bench.serve import ServeBenchError, ServeConfig, measure_serving
    from services.bench.serve_report import format_table, result_dict
    from services.cli.generate import api_key_from

    config = ServeConfig(
        target=args.target,
        model=args.model,
        workload=args.workload,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        num_groups=args.num_groups,
        prefix_len=args.prefix_len,
        slos_ms=args.goodput,
        timeout_s=args.timeout,
        api_key=api_key_from(args),
        tls=client_tls(args),
    )
    try:
        result = measure_serving(config)
    except ServeBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if (hint := _serve_hint(args, str(exc))) is not None:
            print(f"hint: {hint}", file=sys.stderr)
        return 1
    print(format_table(result))
    if args.json:
        from services.bench.environment import describe_environment
        from services.bench.report import write_json

        argv = redact_api_key(args.argv, args.api_key)
        environment = describe_environment(["tandem", *argv])
        write_json(args.json, result_dict(result, environment))
        print(f"wrote {args.json}")
    if args.plot:
        from services.bench.serve_plots import plot_latency_cdfs

        plot_latency_cdfs(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _serve_hint(args: argparse.Namespace, message: str) -> str | None:
    """``tandem generate``'s hint for a ServeBenchError's "...: CODE: details"."""
    from services.cli.generate import CallFailure

    status = re.search(r": ([A-Z_]{4,}): (.*)", message, re.DOTALL)
    if status is None:
        return None
    failure = CallFailure.of(args, status.group(1), status.group(2))
    # The error is all that is left of the call here: ask the target whether it answers.
    return failure.hint(lambda: _answers(args.target, client_tls(args)))


def _answers(target: str, tls: TlsConfig | None) -> bool:
    """Whether a channel to ``target`` connects (TLS included) within a couple of seconds."""
    import grpc

    from services.rpc.tls import channel_credentials

    channel = (
        grpc.insecure_channel(target)
        if tls is None
        else grpc.secure_channel(target, channel_credentials(tls))
    )
    with channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=ANSWER_PROBE_S)
        except grpc.FutureTimeoutError:
            return False
    return True


def redact_api_key(argv: list[str], secret: str | None) -> list[str]:
    """``argv`` with the API key ``secret`` replaced wherever it appears, for the recorded
    command line: by value, since argparse takes the flag however it is abbreviated
    (``--api tdm_…``, ``--api-k=tdm_…``)."""
    if not secret:
        return list(argv)
    return [arg.replace(secret, "***") for arg in argv]


def _request_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not rate > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected requests/s above 0, or inf; got {text!r}")
    return rate


def _slos(text: str) -> dict[str, float]:
    """``ttft_ms=500,tpot_ms=50`` → {"ttft_ms": 500.0, "tpot_ms": 50.0}."""
    from services.bench.serve_metrics import SLO_METRICS

    slos: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in SLO_METRICS:
            raise argparse.ArgumentTypeError(
                f"expected NAME=MILLISECONDS pairs with NAME in {', '.join(SLO_METRICS)}, "
                f"such as ttft_ms=500,tpot_ms=50; got {item!r}"
            )
        slos[name] = arg_types.positive_float(value)
    return slos
