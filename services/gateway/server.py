"""Start the gateway: the Inference servicer in front of a router, on one gRPC server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc.aio

from services.gateway.api_keys import ApiKeys
from services.gateway.audit import AuditLog
from services.gateway.auth import Authenticator
from services.gateway.identity import OidcVerifier
from services.gateway.ledger import Ledger
from services.gateway.limits import Admission, InProcessAdmission
from services.gateway.policy import load_policy
from services.gateway.service import GatewayService
from services.gateway.store import Store, open_store
from services.rpc.server import RunningServer, Servicer, client_channel, start_server
from services.stubs.tandem.v1 import inference_pb2_grpc


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway needs to start."""

    router_address: str
    """host:port of the router it forwards to."""
    policy_path: Path
    """The TOML policy file (models and default limits)."""
    store_url: str
    """``sqlite:PATH`` or ``postgresql://…`` for keys, ledger and audit log."""
    issuer_url: str
    """The OIDC realm URL, e.g. ``https://keycloak/realms/tandem``."""
    audience: str | None = "tandem-gateway"
    """Required ``aud`` of access tokens (None: not checked)."""
    allowed_clients: frozenset[str] = frozenset({"tandem-cli"})
    """OIDC clients (``azp``) whose tokens are accepted."""
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port (see ``RunningServer.port``)."""


class Gateway(RunningServer):
    """A running gateway; ``stop()`` drains it and closes the router channel and store."""

    def __init__(
        self,
        running: RunningServer,
        service: GatewayService,
        channel: grpc.aio.Channel,
        verifier: OidcVerifier,
        store: Store,
    ) -> None:
        super().__init__(running.server, running.port, running.health)
        self.service = service
        self.store = store
        self._channel = channel
        self._verifier = verifier

    async def stop(self, grace: float = 5.0) -> None:
        await super().stop(grace)
        await self._channel.close()
        self._verifier.close()
        self.store.close()


async def start_gateway(config: GatewayConfig, admission: Admission | None = None) -> Gateway:
    """Start serving; ``admission`` defaults to in-process counters (one replica)."""
    policy = load_policy(Path(config.policy_path))
    store = open_store(config.store_url)
    verifier = OidcVerifier(config.issuer_url, config.audience, config.allowed_clients)
    channel = client_channel(config.router_address)
    service = GatewayService(
        inference_pb2_grpc.InferenceStub(channel),
        Authenticator(verifier, ApiKeys(store)),
        policy,
        admission if admission is not None else InProcessAdmission(),
        Ledger(store),
        AuditLog(store),
    )
    try:
        running = await start_server(
            [
                Servicer(
                    service,
                    inference_pb2_grpc.add_InferenceServicer_to_server,
                    "tandem.v1.Inference",
                )
            ],
            host=config.host,
            port=config.port,
        )
    except BaseException:
        await channel.close()
        verifier.close()
        store.close()
        raise
    return Gateway(running, service, channel, verifier, store)
