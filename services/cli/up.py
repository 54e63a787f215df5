"""``tandem up``: the whole system on this machine, one process per service."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

from services.cli import arg_types

SUMMARY = "run the router and its prefill/decode workers as local processes"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("up", help=SUMMARY, description=SUMMARY)
    parser.add_argument(
        "--model",
        default="tandem-tiny",
        metavar="DIR|tandem-tiny",
        help="model every worker serves (default: the built-in tandem-tiny)",
    )
    parser.add_argument(
        "--prefill",
        type=arg_types.non_negative_int,
        default=1,
        metavar="N",
        help="prefill workers (default 1); 0 runs the decode workers aggregated",
    )
    parser.add_argument(
        "--decode",
        type=arg_types.positive_int,
        default=1,
        metavar="M",
        help="decode workers (default 1)",
    )
    parser.add_argument(
        "--port",
        type=arg_types.port,
        default=50051,
        help="port clients connect to (the router's; default 50051)",
    )
    parser.add_argument(
        "--policy",
        default="kv-aware",
        choices=("kv-aware", "round-robin", "least-loaded"),
        help="how the router places requests (default kv-aware)",
    )
    parser.add_argument(
        "--kv-transport",
        choices=("auto", "nixl", "grpc"),
        default="auto",
        help="how KV blocks move between workers (default auto: NIXL when available)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        help="write each service's log to DIR/<service>.log (default: a temporary directory)",
    )
    parser.add_argument(
        "--kv-cache-gib",
        type=arg_types.positive_float,
        metavar="GIB",
        help="KV cache memory per worker in GiB (default 1.0)",
    )
    parser.set_defaults(handler=_up)


def _up(args: argparse.Namespace) -> int:
    from services.engine.model_source import resolve_model
    from services.launcher.local import ClusterConfig, LocalCluster

    # SIGTERM (from a supervisor or `timeout`) stops the children like Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    resolve_model(args.model)  # build tandem-tiny once here, not in every worker at once
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="tandem-up-"))
    worker_args = ("--kv-cache-gib", str(args.kv_cache_gib)) if args.kv_cache_gib else ()
    cluster = LocalCluster(
        ClusterConfig(
            model=args.model,
            prefill=args.prefill,
            decode=args.decode,
            port=args.port,
            policy=args.policy,
            kv_transport=args.kv_transport,
            worker_args=worker_args,
            log_dir=log_dir,
        )
    )
    print(
        f"starting {args.prefill} prefill + {args.decode} decode workers (logs in {log_dir}) ...",
        file=sys.stderr,
    )
    cluster.start()
    mode = "aggregated" if args.prefill == 0 else "disaggregated"
    print(
        f"Tandem is up ({mode}, model {args.model}): connect to {cluster.address} "
        f"(tandem.v1.Inference); try: tandem generate --target {cluster.address} "
        f"--prompt 'Hello' --max-tokens 16. Ctrl-C stops everything.",
        flush=True,
    )
    try:
        while not (dead := cluster.dead_children()):
            time.sleep(0.5)
        names = ", ".join(f"{c.name} (status {c.process.returncode})" for c in dead)
        print(f"error: {names} stopped unexpectedly; logs in {log_dir}. Stopping.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping ...", file=sys.stderr)
        return 0
    finally:
        cluster.stop()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
