"""Start the gateway: Inference in front of a router, plus Admin and UsageService, on one
gRPC server (and Prometheus ``/metrics`` when ``metrics_port`` is set)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc.aio

from services.gateway.admin_service import AdminService
from services.gateway.api_keys import ApiKeys
from services.gateway.audit import AuditLog
from services.gateway.auth import Authenticator
from services.gateway.call_auth import CallGuard
from services.gateway.identity import OidcVerifier
from services.gateway.ledger import Ledger
from services.gateway.limits import Admission, InProcessAdmission
from services.gateway.metrics import METRICS
from services.gateway.openai_http import HttpServer, start_http
from services.gateway.pipeline import MAX_STREAMS
from services.gateway.policy import load_policy
from services.gateway.service import GatewayService
from services.gateway.store import Store, open_store
from services.gateway.usage_service import MAX_PERIOD_DAYS, UsageService
from services.rpc.drain import (
    DEFAULT_DRAIN_TIMEOUT_S,
    drain_server,
    drained_unless,
    interrupted,
    why_cut,
)
from services.rpc.metrics_http import MetricsServer, serve_metrics
from services.rpc.server import RunningServer, Servicer, client_channel, start_server
from services.rpc.tls import TlsConfig, load, server_ssl_context
from services.stubs.tandem.v1 import admin_pb2_grpc, inference_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway needs to start."""

    router_address: str
    """host:port of the router it forwards to."""
    policy_path: Path
    """The TOML policy file (models and default limits)."""
    store_url: str
    """``sqlite:PATH`` or ``postgresql://…`` for keys, ledger and audit log."""
    issuer_url: str | None = None
    """The OIDC realm URL, e.g. ``https://keycloak/realms/tandem``; None accepts API keys only
    (a JWT is then refused UNAUTHENTICATED, saying OIDC is not configured)."""
    audience: str | None = "tandem-gateway"
    """Required ``aud`` of access tokens (None: not checked)."""
    allowed_clients: frozenset[str] = frozenset({"tandem-cli"})
    """OIDC clients (``azp``) whose tokens are accepted."""
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port (see ``RunningServer.port``)."""
    redis_url: str | None = None
    """``redis://…`` for rate limits and quotas shared by every replica (``RedisAdmission``);
    None keeps the counters in this process (one replica only)."""
    limits_on_store_failure: Literal["open", "closed"] = "open"
    """When Redis cannot be reached: ``open`` admits without limits (logged), ``closed``
    refuses requests UNAVAILABLE. In-process counters cannot fail, so this is Redis only."""
    metrics_port: int | None = None
    """Serve Prometheus ``/metrics`` (the metering counters) on this port and ``host``; None
    or 0: off. Over TLS with the gateway's cluster identity (``router_tls``): a scraper
    needs a certificate from ``metrics_client_ca``, else from the cluster CA when there is
    one."""
    metrics_client_ca: Path | None = None
    """PEM CA bundle that signs the scrapers' certificates: /metrics requires one it signed
    and accepts no other (the cluster CA's neither). Needs a certificate (``router_tls`` or
    ``tls``). None: /metrics asks what the cluster's ports ask."""
    http_port: int | None = None
    """Serve the OpenAI-compatible HTTP API (``/v1/models``, ``/v1/completions``,
    ``/v1/chat/completions``) on this port; None: off, 0: a free port (``Gateway.http_port``)."""
    http_host: str | None = None
    """Address the HTTP API listens on; None: the same as ``host``."""
    cors_origins: tuple[str, ...] = ()
    """Origins whose browser pages may call the HTTP API (``*``: any); none by default."""
    tls: TlsConfig | None = None
    """TLS on the public ports (gRPC, and the HTTP API as https) with this certificate.
    Client certificates are required only when it says so (``--client-ca``): public
    clients authenticate with bearer tokens. None: plaintext."""
    router_tls: TlsConfig | None = None
    """How the gateway dials the router: the router's CA, and the gateway's certificate as
    its client identity (mTLS). None: plaintext."""
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    """On SIGINT/SIGTERM: how long the calls in flight (gRPC and HTTP streams) get to finish
    while new ones are refused; what is cut after it is metered for what was sent."""
    max_streams: int = MAX_STREAMS
    """Generate streams relayed at once, gRPC and HTTP together; one more is refused
    UNAVAILABLE with RetryInfo (HTTP 503 + Retry-After: 1) and audited as ``gateway at
    capacity`` (``tandem_gateway_streams`` shows how close it runs)."""
    usage_max_period_days: int = MAX_PERIOD_DAYS
    """The longest period one ``UsageService.GetUsage`` request may cover, in days: each page
    of a report sums every ledger row of its period (longer is INVALID_ARGUMENT)."""


class Gateway(RunningServer):
    """A running gateway; ``stop()`` drains it and closes the router channel and store."""

    def __init__(
        self,
        running: RunningServer,
        service: GatewayService,
        channel: grpc.aio.Channel,
        verifier: OidcVerifier | None,
        store: Store,
        metrics_server: MetricsServer | None = None,
        redis_client: Any = None,
        http: HttpServer | None = None,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
    ) -> None:
        super().__init__(running.server, running.port, running.health)
        self._http = http
        self._drain_timeout_s = drain_timeout_s
        self.service = service
        self.store = store
        self._channel = channel
        self._verifier = verifier
        self._metrics_server = metrics_server
        self._redis = redis_client

    @property
    def http_port(self) -> int | None:
        """The port the OpenAI HTTP API is bound to; None when it is off."""
        return self._http.port if self._http is not None else None

    async def _drain_grpc(self, grace: float, interrupt: asyncio.Event | None) -> None:
        """Refuse new Generate calls (UNAVAILABLE, which clients retry elsewhere) while the
        server still listens, finish the ones in flight (until ``interrupt`` is set), then
        stop the server (cutting what still runs: metered as cancelled)."""
        gate = self.service.gate
        if not await drained_unless(drain_server(self, gate, grace), interrupt):
            log.warning(
                "gateway stopping with %d calls still in flight (%s)",
                gate.active,
                why_cut(interrupt),
            )
        await super().stop(0 if interrupted(interrupt) else min(grace, 1.0))  # Admin, Usage

    async def stop(
        self, grace: float | None = None, interrupt: asyncio.Event | None = None
    ) -> None:
        """Drain for ``grace`` s (None: the config's drain timeout; HTTP streams always get
        the config's) or until ``interrupt`` is set (a second SIGTERM: every call still in
        flight is cut and metered for what it sent), then close the router channel, the
        settler and the store."""
        # Both drain at once; the router channel stays open until both are done.
        http = self._http.stop(interrupt) if self._http is not None else asyncio.sleep(0)
        grace = self._drain_timeout_s if grace is None else grace
        await asyncio.gather(self._drain_grpc(grace, interrupt), http)
        await self.service.pipeline.close()  # writes the settles still queued
        # Then the limiter: Redis settles still waiting get one last try.
        await asyncio.to_thread(self.service.pipeline.admission.close)
        await self._channel.close()
        _close_extras(self._verifier, self._metrics_server, self._redis)
        self.store.close()


async def start_gateway(config: GatewayConfig, admission: Admission | None = None) -> Gateway:
    """Start serving; ``admission`` overrides the one the config describes (tests)."""
    for tls in (config.tls, config.router_tls):
        if tls is not None:
            load(tls)  # a bad certificate file fails the start before the store opens
    policy = load_policy(Path(config.policy_path))
    METRICS.label_models(policy.models)  # a name the policy does not list is no label
    store = open_store(config.store_url)
    verifier = (
        OidcVerifier(config.issuer_url, config.audience, config.allowed_clients)
        if config.issuer_url
        else None
    )
    redis_client = None
    if admission is None:
        admission, redis_client = _admission(config)
    channel = client_channel(config.router_address, tls=config.router_tls)
    authenticator = Authenticator(verifier, ApiKeys(store), policy.admin_role)
    audit = AuditLog(store)
    service = GatewayService(
        inference_pb2_grpc.InferenceStub(channel),
        authenticator,
        policy,
        admission,
        Ledger(store),
        audit,
        config.max_streams,
    )
    guard = CallGuard(authenticator, audit)
    servicers = [
        Servicer(
            service, inference_pb2_grpc.add_InferenceServicer_to_server, "tandem.v1.Inference"
        ),
        Servicer(
            AdminService(guard, policy, ApiKeys(store)),
            admin_pb2_grpc.add_AdminServicer_to_server,
            "tandem.v1.Admin",
        ),
        Servicer(
            UsageService(
                guard,
                policy,
                Ledger(store),
                service.pipeline.settled,
                max_period_days=config.usage_max_period_days,
            ),
            admin_pb2_grpc.add_UsageServiceServicer_to_server,
            "tandem.v1.UsageService",
        ),
    ]
    metrics_server = None
    http = None
    running = None
    try:
        running = await start_server(servicers, host=config.host, port=config.port, tls=config.tls)
        if config.metrics_port:
            metrics_server = serve_metrics(
                METRICS.registry,
                config.metrics_port,
                config.host,
                _metrics_tls(config),
                config.metrics_client_ca,
            )
        if config.http_port is not None:
            host = config.http_host or config.host
            ssl_context = server_ssl_context(config.tls) if config.tls is not None else None
            http = await start_http(
                service.pipeline,
                host,
                config.http_port,
                ssl_context,
                config.drain_timeout_s,
                config.cors_origins,
            )
    except BaseException:
        if running is not None:
            await running.stop(0)
        await service.pipeline.close()
        await channel.close()
        _close_extras(verifier, metrics_server, redis_client)
        store.close()
        raise
    return Gateway(
        running,
        service,
        channel,
        verifier,
        store,
        metrics_server,
        redis_client,
        http,
        config.drain_timeout_s,
    )


def _admission(config: GatewayConfig) -> tuple[Admission, Any]:
    """In-process counters, or Redis ones (and the client to close) when ``redis_url`` is set."""
    if not config.redis_url:
        return InProcessAdmission(), None
    import redis

    from services.gateway.limits_redis import RedisAdmission

    # Short socket timeouts: with fail-open, an unreachable Redis must cost a request
    # about a second, not the OS's connect timeout.
    client = redis.Redis.from_url(config.redis_url, socket_connect_timeout=1.0, socket_timeout=1.0)
    on_error = "fail-open" if config.limits_on_store_failure == "open" else "fail-closed"
    return RedisAdmission(client, on_store_error=on_error), client


def _metrics_tls(config: GatewayConfig) -> TlsConfig | None:
    """/metrics (usage per team and model) is for the cluster's scraper, not the public: it
    takes the gateway's cluster identity, so with the cluster CA (--tls-ca) a scraper needs
    a certificate that CA signed, as on the router and the workers (one from
    ``metrics_client_ca`` instead when that is set: ``serve_metrics``)."""
    internal = config.router_tls
    if internal is None or internal.cert is None:
        return config.tls
    return TlsConfig(
        internal.cert, internal.key, internal.ca, require_client_auth=internal.ca is not None
    )


def _close_extras(
    verifier: OidcVerifier | None, metrics_server: MetricsServer | None, redis_client: Any
) -> None:
    if verifier is not None:
        verifier.close()
    if metrics_server is not None:
        metrics_server.close()
    if redis_client is not None:
        redis_client.close()
