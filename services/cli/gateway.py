"""``tandem gateway``: run the policy gateway in front of a router until stopped.

Clients call tandem.v1.Inference here with ``authorization: Bearer <API key or Keycloak
token>``; the gateway authenticates, authorizes the model (policy file), admits (rate limits
and quotas), forwards to the router, meters and audits. Admin (API keys) and UsageService
are served on the same port. ``tandem keys`` and ``tandem audit`` (``services/cli/keys.py``)
work on the same store without a running gateway.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from services.cli import arg_types
from services.cli.drain_args import add_drain_arg
from services.cli.telemetry_args import add_tracing_arg
from services.cli.telemetry_args import configure as configure_tracing
from services.cli.tls_args import add_service_tls_args, gateway_tls, metrics_client_ca

DEFAULT_STORE = "sqlite:tandem-gateway.db"
DEFAULT_AUDIENCE = "tandem-gateway"
DEFAULT_CLIENTS = ("tandem-cli",)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gateway",
        help="run the policy gateway (authn, authz, limits, metering, audit) before a router",
        description="Run the gateway until SIGINT/SIGTERM: tandem.v1.Inference (relayed to the "
        "router after authentication, authorization and admission), tandem.v1.Admin and "
        "tandem.v1.UsageService on one gRPC port.",
    )
    parser.add_argument(
        "--port",
        type=arg_types.port,
        required=True,
        metavar="P",
        help="port clients connect to (0 picks a free one and logs it)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="H",
        help="interface to listen on; 0.0.0.0 accepts other machines (default %(default)s)",
    )
    parser.add_argument(
        "--router",
        required=True,
        type=arg_types.host_port,
        metavar="HOST:PORT",
        help="the router requests are forwarded to",
    )
    parser.add_argument(
        "--policy",
        type=Path,
        required=True,
        metavar="FILE",
        help="TOML policy: which roles and teams may use which model, the admin role, default "
        "limits per key/user/team (format: deploy/policy.example.toml)",
    )
    parser.add_argument(
        "--store",
        default=DEFAULT_STORE,
        metavar="sqlite:PATH|postgresql://…",
        help="where API keys, the usage ledger and the audit log live: a SQLite file (one "
        "replica) or PostgreSQL (shared by replicas) (default %(default)s)",
    )
    parser.add_argument(
        "--oidc-issuer",
        metavar="URL",
        help="Keycloak realm URL whose access tokens are accepted, e.g. "
        "https://keycloak/realms/tandem (default: none; only API keys are accepted and a "
        "token is refused UNAUTHENTICATED)",
    )
    parser.add_argument(
        "--audience",
        default=DEFAULT_AUDIENCE,
        metavar="AUD",
        help="the 'aud' a token must carry; '' skips the check (default %(default)s)",
    )
    parser.add_argument(
        "--allowed-client",
        action="append",
        metavar="ID",
        help="OIDC client ('azp') whose tokens are accepted; repeat for several "
        f"(default: {', '.join(DEFAULT_CLIENTS)})",
    )
    parser.add_argument(
        "--redis",
        metavar="redis://…",
        default=os.environ.get("TANDEM_REDIS_URL") or None,
        help="keep rate-limit and quota counters in Redis, shared by every gateway replica "
        "(default: $TANDEM_REDIS_URL, which keeps a password in the URL off the command "
        "line; unset: in this process, right for one replica only)",
    )
    parser.add_argument(
        "--limits-on-store-failure",
        choices=("open", "closed"),
        default="open",
        help="when Redis is unreachable: 'open' admits without limits (logged warning), "
        "'closed' refuses requests UNAVAILABLE; identity checks always fail closed "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--metrics-port",
        type=arg_types.port,
        default=0,
        metavar="P",
        help="serve Prometheus /metrics (requests, tokens, decisions, limit rejections per "
        "team and model) on this port (default 0: off); HTTPS with --tls-cert, asking "
        "scrapers for a certificate signed by --metrics-client-ca, else by --tls-ca when "
        "given (internal figures: not public)",
    )
    parser.add_argument(
        "--http-port",
        type=arg_types.port,
        default=0,
        metavar="P",
        help="also serve the OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
        "/v1/chat/completions) on this port, same credentials and policy as gRPC "
        "(default 0: off)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="let browser pages from ORIGIN (e.g. https://chat.example.com; * for any) call "
        "the HTTP API: CORS headers and preflights; repeat for several (default: none, so "
        "browsers let no page read the answers)",
    )
    parser.add_argument(
        "--usage-max-period-days",
        type=arg_types.positive_int,
        metavar="DAYS",
        help="the longest period one UsageService/GetUsage request may cover (default 366): "
        "each page of a report sums every ledger row of its period, so this bounds what one "
        "request costs the store; a longer one is INVALID_ARGUMENT",
    )
    parser.add_argument(
        "--max-streams",
        type=arg_types.positive_int,
        metavar="N",
        help="Generate streams relayed at once, gRPC and HTTP together (default 4096); one "
        "more is refused UNAVAILABLE with RetryInfo (HTTP 503 + Retry-After) and audited, so "
        "a flood of long streams cannot starve the ones running; the metric "
        "tandem_gateway_streams shows how close the gateway runs",
    )
    add_drain_arg(
        parser,
        "new calls are refused (NOT_SERVING to health checks; the HTTP API stops "
        "listening), the ones in flight finish, gRPC and HTTP; a call cut at the end is "
        "metered for what it sent",
    )
    add_tracing_arg(parser)
    tls = add_service_tls_args(
        parser,
        ca_help="PEM CA bundle that signs the router: verifies it, and the gateway presents "
        "--tls-cert to it (mTLS between gateway and router)",
    )
    tls.add_argument(
        "--client-ca",
        metavar="FILE",
        help="public port: clients must present a certificate this PEM CA signed, on top of "
        "their API key or token (default: none asked for; with --tls-cert the public port is "
        "TLS that authenticates the server only)",
    )
    parser.set_defaults(handler=run)


def gateway_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The GatewayConfig the flags describe."""
    from services.gateway.server import GatewayConfig

    public_tls, router_tls = gateway_tls(args)
    return GatewayConfig(
        router_address=args.router,
        policy_path=args.policy,
        store_url=args.store,
        issuer_url=args.oidc_issuer or None,
        audience=args.audience or None,
        allowed_clients=frozenset(args.allowed_client or DEFAULT_CLIENTS),
        host=args.host,
        port=args.port,
        redis_url=args.redis or None,
        limits_on_store_failure=args.limits_on_store_failure,
        metrics_port=args.metrics_port or None,
        metrics_client_ca=metrics_client_ca(args),
        http_port=args.http_port or None,
        http_host=args.host,
        cors_origins=tuple(args.cors_origin or ()),
        tls=public_tls,
        router_tls=router_tls,
        drain_timeout_s=args.drain_timeout_s,
        **_optional(usage_max_period_days=args.usage_max_period_days, max_streams=args.max_streams),
    )


def _optional(**fields: object) -> dict[str, object]:
    """The fields given on the command line; the others keep GatewayConfig's defaults."""
    return {name: value for name, value in fields.items() if value is not None}


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    from services.rpc import event_loop

    logging.getLogger("services.gateway").setLevel(logging.INFO)
    # before the server and the router channel exist: both take their interceptors then
    configure_tracing(args, "tandem-gateway")
    try:
        event_loop.run(serve(gateway_config(args)))
    except OSError as exc:  # the port is taken, or the host is not this machine's
        print(f"tandem gateway: error: {exc}", file=sys.stderr)
        return 1
    return 0


async def serve(config) -> None:  # type: ignore[no-untyped-def]
    """Run the gateway until SIGINT or SIGTERM, then drain in-flight calls."""
    import logging

    from services.gateway.server import start_gateway
    from services.rpc.shutdown import serve_until_signalled

    log = logging.getLogger("services.gateway")
    gateway = await start_gateway(config)
    log.info(
        "gateway listening on %s:%d → router %s (OIDC %s, limits %s)",
        config.host,
        gateway.port,
        config.router_address,
        config.issuer_url or "off: API keys only",
        "Redis" if config.redis_url else "in-process",
    )
    await serve_until_signalled(
        lambda interrupt: gateway.stop(interrupt=interrupt),
        log,
        "gateway draining: refusing new calls, finishing the ones in flight",
        config.drain_timeout_s,
    )
