"""``tandem router``: run the router (worker registry + the Inference API) until stopped.

Workers (``tandem prefill`` / ``tandem decode``) register with it; clients, or the
gateway in front, call tandem.v1.Inference on it.
"""

from __future__ import annotations

import argparse

from services.cli import arg_types
from services.cli.drain_args import add_drain_arg
from services.cli.telemetry_args import add_tracing_arg
from services.cli.telemetry_args import configure as configure_tracing
from services.cli.tls_args import add_service_tls_args, metrics_client_ca, service_tls
from services.router.config import DEFAULT_POLICY, RouterConfig

POLICY_NAMES = ("kv-aware", "least-loaded", "round-robin")
"""services.router.policies.POLICIES' names, copied so that --help imports no grpc
(tests/router/test_cli.py checks that they agree)."""
_DEFAULTS = RouterConfig()
DEFAULT_HEARTBEAT_INTERVAL_MS = round(_DEFAULTS.heartbeat_interval_s * 1000)
DEFAULT_MAX_RETRIES = _DEFAULTS.max_retries
DEFAULT_PREFILL_TIMEOUT_MS = round(_DEFAULTS.prefill_timeout_s * 1000)
DEFAULT_DECODE_WAIT_MS = round(_DEFAULTS.decode_wait_s * 1000)
DEFAULT_LOCAL_PREFILL_MAX_TOKENS = _DEFAULTS.local_prefill_max_tokens
DEFAULT_LOCAL_PREFILL_MIN_CACHED = _DEFAULTS.local_prefill_min_cached


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "router",
        help="run the router: worker registry, placement and the Inference API",
        description="Run the router until SIGINT/SIGTERM. Prefill and decode workers register "
        "and heartbeat here; clients (or the gateway) call tandem.v1.Inference here. Each "
        "request is tokenized, placed on a prefill and a decode worker by the policy, and "
        "resumed on another worker if one dies mid-stream.",
    )
    parser.add_argument(
        "--port",
        type=arg_types.port,
        required=True,
        metavar="P",
        help="port to listen on (0 picks a free one and logs it)",
    )
    parser.add_argument(
        "--host",
        default=_DEFAULTS.host,
        metavar="H",
        help="interface to listen on; 0.0.0.0 accepts other machines (default %(default)s)",
    )
    parser.add_argument(
        "--policy",
        choices=POLICY_NAMES,
        default=DEFAULT_POLICY,
        help="how to pick a worker from a pool: kv-aware picks the least estimated work "
        "(prefill: uncached prompt tokens + queued prefill tokens; decode: load, credit for "
        "a cached prefix) and may skip the prefill pool; round-robin rotates through "
        "workers; least-loaded picks the fewest in-flight + running + waiting requests; "
        f"ties at random (default {DEFAULT_POLICY})",
    )
    parser.add_argument(
        "--policy-seed",
        type=arg_types.non_negative_int,
        default=None,
        metavar="N",
        help="seed of the policy's random tie-breaking, to replay a placement (default: a "
        "fresh one per process, logged at start, so replicas do not all pick alike)",
    )
    parser.add_argument(
        "--local-prefill-max-tokens",
        type=arg_types.non_negative_int,
        default=DEFAULT_LOCAL_PREFILL_MAX_TOKENS,
        metavar="N",
        help="kv-aware: the decode worker prefills locally (no prefill worker) when the part "
        "of the prompt it does not hold is at most N tokens, unless the prefill already "
        "queued on it would delay the first token by more than N tokens' worth beyond the "
        f"least busy prefill worker (default {DEFAULT_LOCAL_PREFILL_MAX_TOKENS})",
    )
    parser.add_argument(
        "--local-prefill-min-cached",
        type=_non_negative_float,
        default=DEFAULT_LOCAL_PREFILL_MIN_CACHED,
        metavar="F",
        help="kv-aware: the decode worker prefills locally when it already holds at least "
        f"this share of the prompt; above 1: never (default {DEFAULT_LOCAL_PREFILL_MIN_CACHED})",
    )
    parser.add_argument(
        "--heartbeat-interval-ms",
        type=arg_types.positive_int,
        default=DEFAULT_HEARTBEAT_INTERVAL_MS,
        metavar="MS",
        help=f"how often workers are told to heartbeat (default {DEFAULT_HEARTBEAT_INTERVAL_MS})",
    )
    parser.add_argument(
        "--heartbeat-timeout-ms",
        type=arg_types.positive_int,
        metavar="MS",
        help="silence after which a worker is removed and its requests resume elsewhere; "
        "must exceed the interval (default 3 × --heartbeat-interval-ms)",
    )
    parser.add_argument(
        "--max-retries",
        type=arg_types.non_negative_int,
        default=DEFAULT_MAX_RETRIES,
        metavar="N",
        help="most times one request moves to another worker after a failure before it "
        f"fails with UNAVAILABLE (default {DEFAULT_MAX_RETRIES})",
    )
    parser.add_argument(
        "--prefill-timeout-ms",
        type=arg_types.positive_int,
        default=DEFAULT_PREFILL_TIMEOUT_MS,
        metavar="MS",
        help="longest wait for one prefill; a worker slower than this counts as hung and "
        f"the request is retried on another (default {DEFAULT_PREFILL_TIMEOUT_MS})",
    )
    parser.add_argument(
        "--decode-wait-ms",
        type=arg_types.non_negative_int,
        default=DEFAULT_DECODE_WAIT_MS,
        metavar="MS",
        help="how long a request whose client already has tokens waits for a decode worker "
        "when none is left (one restarting) before ending with UNAVAILABLE; requests that "
        f"sent nothing fail at once, safe to retry (default {DEFAULT_DECODE_WAIT_MS}; 0: "
        "never wait)",
    )
    parser.add_argument(
        "--metrics-port",
        type=arg_types.port,
        default=0,
        help="serve Prometheus /metrics (TTFT, inter-token latency, retries) on this port "
        "(default 0: off); HTTPS with the router's --tls-cert, asking scrapers for a "
        "certificate signed by --metrics-client-ca, else by --tls-ca when given",
    )
    add_drain_arg(
        parser,
        "new calls are refused (NOT_SERVING to health checks) and the streams already "
        "running are relayed to their end",
    )
    add_tracing_arg(parser)
    add_service_tls_args(parser)
    parser.set_defaults(handler=run)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def router_config(args: argparse.Namespace) -> RouterConfig:
    """The RouterConfig the flags describe; ValueError names a bad combination."""
    timeout_ms = args.heartbeat_timeout_ms
    return RouterConfig(
        host=args.host,
        port=args.port,
        policy=args.policy,
        policy_seed=args.policy_seed,
        heartbeat_interval_s=args.heartbeat_interval_ms / 1000,
        heartbeat_timeout_s=None if timeout_ms is None else timeout_ms / 1000,
        max_retries=args.max_retries,
        prefill_timeout_s=args.prefill_timeout_ms / 1000,
        decode_wait_s=args.decode_wait_ms / 1000,
        metrics_port=args.metrics_port,
        drain_timeout_s=args.drain_timeout_s,
        local_prefill_max_tokens=args.local_prefill_max_tokens,
        local_prefill_min_cached=args.local_prefill_min_cached,
        tls=service_tls(args),
        metrics_client_ca=metrics_client_ca(args),
    )


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    from services.router.server import serve
    from services.rpc import event_loop

    try:
        config = router_config(args)
    except ValueError as exc:
        print(f"tandem router: error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("services.router").setLevel(logging.INFO)
    configure_tracing(args, "tandem-router")
    try:
        event_loop.run(serve(config))
    except OSError as exc:  # the port is taken, or the host is not this machine's
        print(f"tandem router: error: {exc}", file=sys.stderr)
        return 1
    return 0
