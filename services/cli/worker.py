"""``tandem prefill`` and ``tandem decode``: run one worker process."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from services.cli import arg_types
from services.cli.drain_args import add_drain_arg
from services.cli.engine_args import add_engine_args, engine_config
from services.cli.telemetry_args import add_tracing_arg
from services.cli.telemetry_args import configure as configure_tracing
from services.cli.tls_args import add_service_tls_args, metrics_client_ca, service_tls
from services.rpc import event_loop

if TYPE_CHECKING:
    from services.worker.host import WorkerConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    for role, summary in (
        ("prefill", "run a prefill worker: prompts in, KV blocks handed to decode workers"),
        ("decode", "run a decode worker: reads prompt KV, streams tokens (or prefills itself)"),
    ):
        parser = subparsers.add_parser(role, help=summary, description=summary)
        _add_flags(parser, role)
        parser.set_defaults(handler=_handler(role))


def _add_flags(parser: argparse.ArgumentParser, role: str) -> None:
    parser.add_argument(
        "--model",
        default="tandem-tiny",
        metavar="DIR|tandem-tiny",
        help="model to serve: a Hugging Face-format directory or 'tandem-tiny' (default)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (0.0.0.0: every interface); also advertised without --advertise",
    )
    parser.add_argument(
        "--advertise",
        metavar="HOST",
        help="name the router and other workers dial this worker at, registered with the "
        "router (default: --host); with TLS, a name in this worker's certificate",
    )
    parser.add_argument(
        "--port", type=arg_types.port, default=0, help="gRPC port (default 0: pick a free one)"
    )
    parser.add_argument(
        "--router",
        type=arg_types.host_port,
        metavar="HOST:PORT",
        help="router to register with and heartbeat to",
    )
    parser.add_argument("--worker-id", help="stable worker id (default: host name + random)")
    parser.add_argument(
        "--kv-transport",
        choices=("auto", "nixl", "grpc"),
        default="auto",
        help="how KV blocks move between workers: NIXL (UCX), the gRPC byte stream, "
        "or auto (NIXL when it initialises, else gRPC)",
    )
    parser.add_argument(
        "--metrics-port",
        type=arg_types.port,
        default=0,
        help="serve Prometheus /metrics on this port (default 0: off); HTTPS with the "
        "worker's --tls-cert, asking scrapers for a certificate signed by "
        "--metrics-client-ca, else by --tls-ca when given",
    )
    add_drain_arg(
        parser,
        "new requests are refused (the router sends them elsewhere), the ones here "
        "finish, and so do the KV reads of prefills held for decode workers; a second "
        "signal stops at once",
    )
    if role == "prefill":
        parser.add_argument(
            "--lease-s",
            type=arg_types.positive_float,
            default=30.0,
            help="seconds a prompt's KV stays pinned for its decode worker (default 30), "
            "and the most a caller may ask for: a longer PrefillRequest.lease_ms is cut to it",
        )
    else:
        parser.add_argument(
            "--kv-timeout-s",
            type=arg_types.positive_float,
            default=10.0,
            help="deadline for reading a prompt's KV before prefilling locally (default 10)",
        )
        parser.add_argument(
            "--kv-room-wait-s",
            type=arg_types.non_negative_float,
            default=10.0,
            help="how long a prefilled request may wait, first come first served, for room "
            "in this worker's KV pool to receive its KV before it is prefilled here instead "
            "(default 10; 0: never wait); keep it below the prefill workers' --lease-s",
        )
    add_engine_args(parser, batching=True)
    add_tracing_arg(parser)
    add_service_tls_args(parser)


def worker_config(args: argparse.Namespace, **overrides: Any) -> WorkerConfig:
    """The WorkerConfig ``tandem prefill|decode`` flags describe; ``overrides`` replace
    fields (the Ray launcher sets the host, router and id it chose)."""
    from services.worker.host import WorkerConfig

    fields: dict[str, Any] = dict(
        model=args.model,
        host=args.host,
        advertise=args.advertise,
        port=args.port,
        router=args.router,
        worker_id=args.worker_id,
        kv_transport=args.kv_transport,
        lease_s=getattr(args, "lease_s", 30.0),
        kv_timeout_s=getattr(args, "kv_timeout_s", 10.0),
        kv_room_wait_s=getattr(args, "kv_room_wait_s", 10.0),
        metrics_port=args.metrics_port,
        metrics_client_ca=metrics_client_ca(args),
        drain_timeout_s=args.drain_timeout_s,
        engine=engine_config(args),
    )
    return WorkerConfig(**{**fields, **overrides})


def _handler(role: str) -> Callable[[argparse.Namespace], int]:
    def handle(args: argparse.Namespace) -> int:
        tls = service_tls(args)  # a half-given set fails before the model loads
        logging.getLogger().setLevel(logging.INFO)
        from services.worker.host import default_worker_id

        # Chosen here, so the spans name the replica by the id it registers under.
        args.worker_id = args.worker_id or default_worker_id()
        configure_tracing(args, f"tandem-{role}", args.worker_id)
        config = worker_config(args, tls=tls)
        if role == "prefill":
            from services.prefill.server import run
        else:
            from services.decode.server import run
        return event_loop.run(run(config))

    return handle
