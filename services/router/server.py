"""Start the router: one gRPC server with Inference and Registry, plus the expiry sweep."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable

from services.router.admission import TokenizerCache
from services.router.config import RouterConfig
from services.router.kv_state import RouterKVState
from services.router.metrics import RouterMetrics
from services.router.orchestrator import Orchestrator
from services.router.policies import make_policy
from services.router.registry import WorkerRegistry
from services.router.service import InferenceService, RegistryService
from services.rpc.drain import CallGate, drain_server, drained_unless, why_cut
from services.rpc.metrics_http import MetricsServer, serve_metrics
from services.rpc.server import RunningServer, Servicer, start_server
from services.rpc.shutdown import serve_until_signalled
from services.stubs.tandem.v1 import inference_pb2_grpc, worker_pb2_grpc

log = logging.getLogger(__name__)


class Router:
    """A running router; ``stop()`` drains it."""

    def __init__(
        self,
        config: RouterConfig,
        server: RunningServer,
        registry: WorkerRegistry,
        orchestrator: Orchestrator,
        gate: CallGate,
        kv_state: RouterKVState | None = None,
        metrics_server: MetricsServer | None = None,
    ) -> None:
        self.config = config
        self.metrics_server = metrics_server
        """/metrics (``--metrics-port``), closed by ``stop``; None when off."""
        self.gate = gate
        """Admits Generate calls (InferenceService's) until the router drains."""
        self.server = server
        self.registry = registry
        self.orchestrator = orchestrator
        self.kv_state = kv_state if kv_state is not None else RouterKVState()
        """Prefix indices fed by the workers' KV event streams."""
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        """host:port to reach it from this machine."""
        return self.server.address

    async def stop(
        self, grace: float | None = None, interrupt: asyncio.Event | None = None
    ) -> None:
        """Drain: refuse new Generate calls (UNAVAILABLE) and NOT_SERVING to health checks,
        relay the streams in flight for up to ``grace`` s (None: the config's drain timeout)
        or until ``interrupt`` is set, while workers keep heartbeating, then close (the
        streams still running end CANCELLED, and their workers release what they hold)."""
        grace = self.config.drain_timeout_s if grace is None else grace
        drain = drain_server(self.server, self.gate, grace)
        if not await drained_unless(drain, interrupt):
            log.warning(
                "router stopping with %d streams still in flight (%s)",
                self.gate.active,
                why_cut(interrupt),
            )
        self._sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sweeper
        await self.server.stop(0)
        await self.orchestrator.close()
        if self.metrics_server is not None:  # else its port stayed bound, still answering
            await asyncio.to_thread(self.metrics_server.close)

    async def _sweep_forever(self) -> None:
        # Lookups sweep too, so this only bounds how long a silent worker's in-flight
        # calls wait before being abandoned and resumed elsewhere.
        period = min(self.config.heartbeat_interval_s, self.registry.heartbeat_timeout_s / 3)
        while True:
            await asyncio.sleep(period)
            self.registry.sweep()


async def start_router(
    config: RouterConfig,
    tokenizers: TokenizerCache | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Router:
    """Start serving on config.host:config.port (0: a free port, see Router.port).

    ``tokenizers`` and ``clock`` are for tests (a model directory built elsewhere,
    a fake clock); raises ValueError for an unknown policy name.
    """
    if config.policy_seed is None:  # drawn here, kept in the Router's config (logged)
        config = dataclasses.replace(config, policy_seed=secrets.randbits(32))
    policy = make_policy(config.policy, config.policy_seed)
    registry = WorkerRegistry(config.effective_heartbeat_timeout_s, clock=clock)
    orchestrator = Orchestrator(registry, policy, config, tokenizers)
    metrics = RouterMetrics()
    kv_state = RouterKVState(metrics.indexed_blocks)
    registry.add_remove_listener(kv_state.on_worker_removed)
    orchestrator.kv_state = kv_state
    gate = CallGate("the router")
    server = await start_server(
        [
            Servicer(
                InferenceService(orchestrator, metrics, gate),
                inference_pb2_grpc.add_InferenceServicer_to_server,
                "tandem.v1.Inference",
            ),
            Servicer(
                RegistryService(registry, config.heartbeat_interval_s, kv_state),
                worker_pb2_grpc.add_RegistryServicer_to_server,
                "tandem.v1.Registry",
            ),
        ],
        host=config.host,
        port=config.port,
        tls=config.tls,
    )
    metrics_server = None
    if config.metrics_port:
        try:
            metrics_server = serve_metrics(
                metrics.registry,
                config.metrics_port,
                config.host,
                config.tls,
                config.metrics_client_ca,
            )
        except BaseException:
            await server.stop(0)  # nothing half-started is left bound
            raise
    return Router(config, server, registry, orchestrator, gate, kv_state, metrics_server)


async def serve(config: RouterConfig) -> None:
    """Run the router until SIGINT or SIGTERM, then shut down gracefully."""
    router = await start_router(config)
    log.info(
        "router listening on %s:%d (policy %s, tie-breaking seed %d, heartbeat every %g s, "
        "timeout %g s)",
        config.host,
        router.port,
        config.policy,
        router.config.policy_seed,
        config.heartbeat_interval_s,
        config.effective_heartbeat_timeout_s,
    )
    await serve_until_signalled(
        lambda interrupt: router.stop(interrupt=interrupt),
        log,
        "router draining: refusing new calls, relaying the streams it has",
        config.drain_timeout_s,
    )
