"""Start an asyncio gRPC server the way every Tandem service does.

Every server also serves ``grpc.health.v1.Health`` (SERVING once started,
NOT_SERVING while draining) and server reflection, listens on the given
address (port 0 picks a free port, which tests use), and shuts down
gracefully: new calls are refused, in-flight ones get ``grace`` seconds.

Without a ``TlsConfig`` servers and channels are plaintext (development, tests); with one they
are TLS, and mTLS when it requires client certificates (``services.rpc.tls``). A configured
TLS never falls back to plaintext.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from services.engine.errors import TandemError
from services.rpc.channel_options import RECONNECT_OPTIONS
from services.rpc.renewing_channel import RenewingChannel
from services.rpc.tls import TlsConfig, channel_credentials, server_credentials
from services.telemetry.tracing import client_interceptors, server_interceptors

MAX_MESSAGE_BYTES = 64 * 2**20
"""Largest message either way: KV chunks and long prompts fit well under it."""

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


@dataclass(frozen=True)
class Servicer:
    """One service to mount: its implementation, the generated add_* function, its full name."""

    impl: object
    add_to_server: Callable[[object, grpc.aio.Server], None]
    service_name: str


class RunningServer:
    def __init__(
        self, server: grpc.aio.Server, port: int, health_servicer: health_aio.HealthServicer
    ):
        self.server = server
        self.port = port
        self._health = health_servicer

    @property
    def health(self) -> health_aio.HealthServicer:
        return self._health

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float = 5.0) -> None:
        """Mark NOT_SERVING, refuse new calls, let in-flight calls finish within ``grace`` s."""
        await self._health.enter_graceful_shutdown()
        await self.server.stop(grace)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


class ListenError(TandemError, OSError):
    """A server could not bind its address: a message for the operator, no traceback."""

    grpc_code = "UNAVAILABLE"


async def start_server(
    servicers: Sequence[Servicer],
    host: str = "127.0.0.1",
    port: int = 0,
    tls: TlsConfig | None = None,
) -> RunningServer:
    """Start serving ``servicers`` plus health and reflection on host:port.

    ``tls``: serve TLS with its certificate (mTLS when it requires client certificates); its
    files are checked before anything listens (TlsError names a bad one). None: plaintext.
    """
    # Before the server exists, so a bad file leaves nothing half-started behind.
    credentials = server_credentials(tls) if tls is not None else None
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=server_interceptors())
    # The asyncio servicer: a sync one breaks under async interceptors (tracing).
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for s in servicers:
        s.add_to_server(s.impl, server)
    names = [s.service_name for s in servicers]
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        if credentials is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", credentials)
    except RuntimeError:  # grpcio raises where it used to return 0
        bound = 0
    if bound == 0:
        raise ListenError(
            f"cannot listen on {host}:{port}: the port is taken, or {host} is not an address "
            "of this machine; pick another --port (or --host)"
        )
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, bound, health_servicer)


def client_channel(
    address: str, api_key: str | None = None, tls: TlsConfig | None = None
) -> grpc.aio.Channel:
    """A channel to ``address`` with Tandem's message limits.

    ``api_key`` (an API key or access token) is sent as ``authorization: Bearer …`` on
    every call (``services.rpc.bearer``). ``tls``: verify the server against its CA and
    present its certificate, if any (mTLS), following the files' renewals
    (``RenewingChannel``); None: plaintext.
    """
    interceptors = list(client_interceptors())
    if api_key:
        from services.rpc.bearer import bearer_interceptors

        interceptors += bearer_interceptors(api_key)
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        *RECONNECT_OPTIONS,
    ]
    if tls is None:
        return grpc.aio.insecure_channel(address, interceptors=interceptors, options=options)
    return RenewingChannel(
        tls,
        lambda: grpc.aio.secure_channel(
            address, channel_credentials(tls), interceptors=interceptors, options=options
        ),
    )
