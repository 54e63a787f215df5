"""``tandem up``: the whole system on this machine, one process per service.

The gateway is the door: it listens on ``--port``, the router on a free loopback port behind
it, with a SQLite store in the run's state directory and the repo's example policy
(``deploy/policy.example.toml``) unless ``--policy`` names another. At start an admin API key
is minted into that store and printed once, on the terminal only (never to a log file, never
on a child's command line); the previous run's ``tandem up`` key in the same store is revoked
first. ``--no-gateway`` serves the router on ``--port`` directly (development only: no
authentication, limits or metering).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from services.cli import arg_types, up_ray
from services.cli.drain_args import add_drain_arg
from services.cli.telemetry_args import add_tracing_arg
from services.cli.up_preflight import (
    check_public_ports,
    forget_temporary_state,
    lock_state_dir,
    start_failed,
)
from services.engine.errors import InvalidRequestError
from services.launcher.supervise import interrupt_on_sigterm, supervise

if TYPE_CHECKING:
    from services.launcher.local import Child, ClusterConfig, GatewaySpec

SUMMARY = "run the gateway, router and prefill/decode workers as local processes"
ROUTING_POLICIES = ("kv-aware", "round-robin", "least-loaded")
EXAMPLE_POLICY = Path(__file__).resolve().parents[2] / "deploy" / "policy.example.toml"
"""The documented example policy, in the source tree (``pip install -e .`` keeps it there)."""
UP_KEY_CREATOR = "tandem-up"
"""``created_by`` of the admin keys ``tandem up`` mints (the previous one is revoked)."""
UP_KEY_TEAM = "platform"
UP_DRAIN_TIMEOUT_S = 5.0
"""Ctrl-C on a development cluster should not take the services' 25 s default."""


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
        help="port clients connect to: the gateway's (the router's with --no-gateway); "
        "0 picks a free one (the start line says which); default 50051",
    )
    parser.add_argument(
        "--http-port",
        type=arg_types.port,
        default=8000,
        metavar="P",
        help="port of the gateway's OpenAI-compatible HTTP API (http://127.0.0.1:P/v1); "
        "0 turns it off (default 8000; none with --no-gateway)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="let browser pages from ORIGIN (* for any) call the HTTP API; repeat for several "
        "(default: none; see tandem gateway --help)",
    )
    parser.add_argument(
        "--policy",
        dest="policy_file",
        metavar="FILE",
        help="the gateway's TOML policy (models, roles, limits) (default: the repo's "
        "deploy/policy.example.toml)",
    )
    parser.add_argument(
        "--routing-policy",
        dest="policy",
        default="kv-aware",
        choices=ROUTING_POLICIES,
        help="how the router places requests (default kv-aware)",
    )
    parser.add_argument(
        "--no-gateway",
        action="store_true",
        help="development only: no gateway; clients call the router on --port without "
        "credentials, limits or metering",
    )
    parser.add_argument(
        "--kv-transport",
        choices=("auto", "nixl", "grpc"),
        default="auto",
        help="how KV blocks move between workers (default auto: NIXL when available)",
    )
    parser.add_argument(
        "--state-dir",
        "--log-dir",
        dest="log_dir",
        type=Path,
        metavar="DIR",
        help="the run's state: each service's log DIR/<service>.log and the gateway's store "
        "DIR/gateway.db (default: a new temporary directory); with --ray only the store "
        "(the services log to this terminal, the actors to Ray's logs)",
    )
    parser.add_argument(
        "--kv-cache-gib",
        type=arg_types.positive_float,
        metavar="GIB",
        help="KV cache memory per worker in GiB (default 1.0)",
    )
    add_tracing_arg(parser)  # passed on to every child: one trace per request
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="give every service (gateway, router, each worker) a Prometheus /metrics "
        "endpoint on a free loopback port and print where, after the line saying where to "
        "connect (default: off); over https with --tls",
    )
    parser.add_argument(
        "--startup-timeout",
        type=arg_types.positive_float,
        default=180.0,
        metavar="S",
        help="seconds every service gets to start serving and a worker to register the "
        "model (default %(default)s); raise it for a large model loading from a slow disk",
    )
    parser.add_argument(
        "--worker-restarts",
        type=arg_types.non_negative_int,
        default=3,
        metavar="N",
        help="start a prefill or decode worker that exits again, on its port and id, up to N "
        "times a minute; past that, or when the router or gateway exits, everything stops "
        "(default 3; 0: stop at the first exit; with --ray, Ray restarts its actors)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="development TLS: mint a throwaway CA in the state directory (DIR/tls/ca.pem), "
        "give every service a certificate, serve TLS on the public ports (gRPC and https) "
        "and mTLS between gateway, router and workers (without it, any user of this "
        "machine can call the router and workers on their loopback ports, past the gateway)",
    )
    add_drain_arg(
        parser,
        "every service gets it; the gateway stops taking requests and finishes (and meters) "
        "the streams in flight, the workers finish theirs (Ray actors too); a second Ctrl-C "
        "ends the local drains at once; a service still running 5 s after S is killed",
        default=UP_DRAIN_TIMEOUT_S,
    )
    up_ray.add_ray_arg(parser)
    parser.set_defaults(handler=_up)


def _up(args: argparse.Namespace) -> int:
    for flag in ("tls", "metrics"):
        if getattr(args, flag) and args.ray is not None:
            raise InvalidRequestError(
                f"--{flag}", "is not supported with --ray yet; drop one of them"
            )
    if args.ray is not None:
        return up_ray.run(args)
    from services.engine.model_source import resolve_model
    from services.launcher.local import LocalCluster
    from services.launcher.progress import StartProgress

    # SIGTERM (from a supervisor or `timeout`) stops the children like Ctrl-C does.
    interrupt_on_sigterm()
    policy = None if args.no_gateway else _policy_file(args)  # fail before building anything
    check_public_ports(args.port, args.http_port, gateway=policy is not None)
    resolve_model(args.model)  # build tandem-tiny once here, not in every worker at once
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="tandem-up-"))
    state_lock = lock_state_dir(log_dir)  # noqa: F841 - held open until this process ends
    tls_dir = _dev_ca(log_dir) if args.tls else None
    gateway, secret = (
        (None, None)
        if policy is None
        else _gateway(policy, log_dir, args.model, args.http_port, args.cors_origin or ())
    )
    # Loading a model can take minutes: say what is awaited (a bar on a terminal).
    progress = StartProgress(sys.stderr)
    cluster = LocalCluster(cluster_config(args, log_dir, gateway, tls_dir), progress=progress)
    front = "" if gateway is None else "a gateway, "
    kept = "" if args.log_dir else ", removed at a clean stop"
    print(
        f"starting {front}{args.prefill} prefill + {args.decode} decode workers "
        f"(state and logs in {log_dir}{kept}) ...",
        file=sys.stderr,
    )
    try:
        cluster.start()
    except RuntimeError as exc:  # a child exited or timed out starting: say which, and why
        raise start_failed(exc) from exc
    print(_where_to_connect(args, cluster.address, secret, tls_dir), flush=True)
    if args.metrics:
        print(_metrics_endpoints(cluster.children, tls_dir is not None), flush=True)
    if tls_dir is not None:
        print(
            f"TLS: the public port serves TLS and every internal hop is mTLS; clients verify "
            f"with the throwaway CA {tls_dir / 'ca.pem'} (tandem --tls-ca, curl --cacert); "
            "do not trust it beyond this run.",
            file=sys.stderr,
        )
    if gateway is not None:
        print(
            f"mint more keys: tandem keys create --store {gateway.store} --team T --model "
            f"{args.model}  (or tandem.v1.Admin with the key above)",
            file=sys.stderr,
        )

    def dead() -> str:
        for line in cluster.restart_dead_workers():
            print(f"warning: {line}", file=sys.stderr, flush=True)
        gone = cluster.dead_children()
        names = ", ".join(f"{c.name} (status {c.process.returncode})" for c in gone)
        return f"{names} (logs in {log_dir})" if gone else ""

    status = supervise(dead, cluster.stop)
    if args.log_dir is None:
        forget_temporary_state(log_dir, status)
    return status


def cluster_config(
    args: argparse.Namespace,
    log_dir: Path,
    gateway: GatewaySpec | None = None,
    tls_dir: Path | None = None,
) -> ClusterConfig:
    """The local cluster ``tandem up``'s flags describe."""
    from services.launcher.local import ClusterConfig, free_port

    worker_args = ("--kv-cache-gib", str(args.kv_cache_gib)) if args.kv_cache_gib else ()
    return ClusterConfig(
        model=args.model,
        prefill=args.prefill,
        decode=args.decode,
        port=args.port or free_port(),  # the launcher waits on this port: never 0
        policy=args.policy,
        kv_transport=args.kv_transport,
        worker_args=worker_args,
        log_dir=log_dir,
        gateway=gateway,
        trace_exporter=args.trace_exporter,
        tls_dir=tls_dir,
        metrics=args.metrics,
        worker_restarts=args.worker_restarts,
        drain_timeout_s=args.drain_timeout_s,
        startup_timeout_s=args.startup_timeout,
    )


def _policy_file(args: argparse.Namespace) -> Path:
    """The gateway policy to use; PolicyError (exit 2, with the fix) when it is missing."""
    from services.gateway.policy import PolicyError

    if args.policy_file in ROUTING_POLICIES and not Path(args.policy_file).exists():
        # `tandem up --policy kv-aware` predates the gateway: keep it working.
        print(f"note: --policy {args.policy_file} is now --routing-policy", file=sys.stderr)
        args.policy, args.policy_file = args.policy_file, None
    path = Path(args.policy_file) if args.policy_file else EXAMPLE_POLICY
    if not path.is_file():
        where = "given with --policy" if args.policy_file else "the repo's example policy"
        raise PolicyError(
            f"gateway policy {path} ({where}) does not exist; pass --policy FILE "
            "(format: deploy/policy.example.toml in the Tandem repository; an install other "
            "than `pip install -e .` does not ship it), or --no-gateway for development"
        )
    return path


def _gateway(  # type: ignore[no-untyped-def]
    policy: Path,
    state_dir: Path,
    model: str,
    http_port: int = 0,
    cors_origins: Sequence[str] = (),
):
    """The GatewaySpec for this run and a fresh admin key's secret (the last run's revoked)."""
    from services.cli.keys import audit_cli
    from services.gateway.api_keys import ApiKeys
    from services.gateway.store import open_store
    from services.launcher.local import GatewaySpec

    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the store and TLS keys
    store_url = f"sqlite:{state_dir / 'gateway.db'}"
    http_args = ("--http-port", str(http_port)) if http_port else ()
    for origin in cors_origins if http_port else ():
        http_args += ("--cors-origin", origin)
    with open_store(store_url) as store:
        keys = ApiKeys(store)
        for old in keys.list():
            if old.created_by == UP_KEY_CREATOR and not old.revoked:
                keys.revoke(old.key_id)
                audit_cli(store, f"tandem up: revoked the last run's admin key {old.key_id}")
        minted = keys.mint(
            UP_KEY_TEAM,
            [model],
            created_by=UP_KEY_CREATOR,
            admin=True,
            description="tandem up admin key (revoked by the next tandem up on this store)",
        )
        key = minted.key
        audit_cli(store, f"tandem up: admin key {key.key_id} for team {key.team}", key.team)
    return GatewaySpec(policy=policy, store=store_url, args=http_args), minted.secret


def _dev_ca(state_dir: Path) -> Path:
    """A fresh throwaway CA in ``state_dir/tls`` (the launcher issues each child's
    certificate from it); a CA left by an earlier run there is replaced."""
    from services.rpc.tls_dev_ca import DevCa

    return DevCa.create(state_dir / "tls").directory


def _metrics_endpoints(children: list[Child], https: bool) -> str:
    """The line naming each service's Prometheus endpoint (loopback, as every child binds)."""
    scheme = "https" if https else "http"
    endpoints = ", ".join(
        f"{c.name} {scheme}://127.0.0.1:{c.metrics_port}/metrics"
        for c in children
        if c.metrics_port
    )
    return f"Prometheus metrics: {endpoints}"


def _where_to_connect(
    args: argparse.Namespace, address: str, secret: str | None, tls_dir: Path | None = None
) -> str:
    """The one line saying where to connect (and, with a gateway, the key to use)."""
    mode = "aggregated" if args.prefill == 0 else "disaggregated"
    try_it = f"tandem generate --target {address} --prompt 'Hello' --max-tokens 16"
    scheme = "http"
    if tls_dir is not None:
        scheme = "https"
        try_it += f" --tls-ca {tls_dir / 'ca.pem'}"
        if secret is None:  # the router itself is the door: it requires a client certificate
            from services.rpc.tls_dev_ca import DevCa

            client = DevCa(tls_dir).issue("client")
            try_it += f" --tls-cert {client.cert} --tls-key {client.key}"
    host = address.rsplit(":", 1)[0]
    http = (
        f" (OpenAI-compatible HTTP API: {scheme}://{host}:{args.http_port}/v1)"
        if args.http_port
        else ""
    )
    if secret is None:
        return (
            f"Tandem is up ({mode}, model {args.model}, no gateway): connect to {address} "
            f"(tandem.v1.Inference, no credentials); try: {try_it}. Ctrl-C stops everything."
        )
    return (
        f"Tandem is up ({mode}, model {args.model}): connect to {address} (tandem.v1.Inference "
        f"through the gateway, with an API key); admin key, shown only now: "
        f"export TANDEM_API_KEY={secret} ; then try: {try_it}{http}. Ctrl-C stops everything."
    )
