"""One worker process: engine, engine thread, gRPC server, registration, shutdown.

The prefill and decode servers differ only in the servicers they mount; this
module holds everything else so neither role imports the other.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.engine.engine import EngineConfig, LLMEngine
from services.kv_transfer.transport import KVTransport
from services.rpc.drain import (
    DEFAULT_DRAIN_TIMEOUT_S,
    CallGate,
    drain_server,
    drained_unless,
    why_cut,
)
from services.rpc.metrics_http import MetricsServer
from services.rpc.server import RunningServer, Servicer, start_server
from services.rpc.shutdown import first_of, shutdown_signals
from services.rpc.tls import TlsConfig
from services.stubs.tandem.v1 import worker_pb2 as wpb
from services.telemetry.tracing import shutdown_tracing
from services.worker.engine_loop import EngineLoop
from services.worker.gpu import GpuMonitor
from services.worker.kv_publisher import publish_kv_events
from services.worker.metrics import WorkerMetrics
from services.worker.registration import register_and_heartbeat

log = logging.getLogger(__name__)


STOP_GRACE_S = 2.0
"""How long calls still running may take to end when the worker stops without a drain
(the router refused it, or a drain found it idle)."""


@dataclass(frozen=True)
class WorkerConfig:
    model: str = "tandem-tiny"
    """Model name or Hugging Face directory to serve."""
    host: str = "127.0.0.1"
    """Address to listen on (gRPC and /metrics); also the advertised one when ``advertise``
    is None."""
    advertise: str | None = None
    """Host name or address the router and peer workers dial this worker at: registered with
    the router, which hands it to peers for KV reads. None: ``host``. Set it when ``host`` is
    a wildcard (0.0.0.0) or when TLS peers must verify a name the certificate holds: a
    Kubernetes pod's certificate can name its stable DNS name, never its IP."""
    port: int = 0
    """gRPC port; 0 picks a free one."""
    router: str | None = None
    """Router address (host:port) to register with; None runs unregistered (tests)."""
    worker_id: str | None = None
    """Stable id; None makes one from the host name and a random suffix."""
    kv_transport: str = "auto"
    """KV transfer between workers: nixl, grpc, or auto (nixl when it works)."""
    lease_s: float = 30.0
    """Prefill: how long prompt blocks stay pinned without a release, and the longest a
    caller may ask for (PrefillRequest.lease_ms is cut to it): it bounds how long a caller
    can pin this worker's KV pool."""
    kv_timeout_s: float = 10.0
    """Decode: deadline for reading a prompt's KV before prefilling locally."""
    kv_room_wait_s: float = 10.0
    """Decode: how long a prefilled request may wait for room in the KV pool to receive its
    KV (first come first served) before it is prefilled here instead; 0 never waits. Keep
    it below the prefill workers' lease, which pins the KV meanwhile."""
    metrics_port: int = 0
    """Prometheus /metrics port; 0 disables it."""
    metrics_client_ca: Path | None = None
    """PEM CA bundle that signs the scrapers' certificates: /metrics requires one it signed
    and accepts no other (``tls.ca``'s neither), while the gRPC port keeps trusting
    ``tls.ca`` alone. Needs ``tls`` with a certificate. None: /metrics follows ``tls``."""
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    """On SIGTERM/SIGINT: how long to keep serving the requests already here (and the KV
    reads of prefills held for decode workers) while refusing new ones, before stopping
    anyway. Keep it below the supervisor's kill timeout (Kubernetes' default grace period
    is 30 s). 0 stops at once; a second signal does too."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Engine settings (KV pool size, batch limits, dtype, device)."""
    tls: TlsConfig | None = None
    """TLS on the worker's port (mTLS when it requires client certificates: the router and
    peer workers must present ones signed by its CA) and the identity it presents when it
    dials the router and peers (registration, KV events, KV handshake and reads). None:
    plaintext."""


def default_worker_id() -> str:
    """A worker id when none is given: the host name and a random suffix."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


class WorkerHost:
    def __init__(self, config: WorkerConfig, role: int) -> None:
        self.config = config
        self.role = role
        self.worker_id = config.worker_id or default_worker_id()
        self.instance = uuid.uuid4().hex
        """This process, to the router (RegisterRequest.instance)."""
        self.metrics = WorkerMetrics("prefill" if role == wpb.WORKER_ROLE_PREFILL else "decode")
        self.engine: LLMEngine | None = None
        self.loop: EngineLoop | None = None
        self.server: RunningServer | None = None
        self._stop = asyncio.Event()
        self.gate = CallGate(f"worker {self.worker_id}")
        """Admits Prefill and Decode calls until the worker begins to drain."""
        self._draining = asyncio.Event()
        self._drain_cut_short = False
        """The drain ended with calls in flight (its timeout, a second signal)."""
        self._registration: asyncio.Task[None] | None = None
        self._kv_publisher: asyncio.Task[None] | None = None
        self._metrics_server: MetricsServer | None = None  # /metrics, closed by stop
        self._gpu = GpuMonitor()
        self._latest_load: Callable[[], wpb.WorkerLoad] | None = None
        self.transport: KVTransport | None = None
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self.refused: BaseException | None = None
        """Why registration ended, if it did: the router refused this worker, or its engine
        thread died (the process then exits with 1)."""

    @property
    def address(self) -> str:
        """host:port others reach this worker at (the advertised name, the bound port)."""
        if self.server is None:
            raise RuntimeError("the worker has not started")
        return f"{self.config.advertise or self.config.host}:{self.server.port}"

    async def start(self, servicers: Callable[[WorkerHost], list[Servicer]]) -> None:
        """Load the model, start the engine thread and the server, then register and
        publish KV events to the router (when one is configured)."""
        from services.rpc.metrics_http import scrape_tls, serve_metrics
        from services.rpc.tls import load

        scrape = scrape_tls(self.config.tls, self.config.metrics_client_ca)
        for tls in (self.config.tls, scrape):
            if tls is not None:
                load(tls)  # a bad certificate file fails now, not after the model loads
        self.engine = await asyncio.to_thread(LLMEngine, self.config.model, self.config.engine)
        self.loop = EngineLoop(self.engine)
        self.loop.on_tick(self._expire_leases)
        metrics = self.metrics

        def engine_load(engine: LLMEngine) -> wpb.WorkerLoad:
            # The gauges follow every step, heartbeats or not: set where the heartbeat
            # read them, they stayed 0 on a worker without --router and froze while it
            # could not reach one.
            load = _engine_load(engine)
            metrics.running.set(load.running)
            metrics.waiting.set(load.waiting)
            metrics.free_blocks.set(load.free_blocks)
            return load

        self._latest_load = self.loop.watch(engine_load)
        self.loop.start()
        self.server = await start_server(
            servicers(self), self.config.host, self.config.port, tls=self.config.tls
        )
        if self.config.metrics_port:
            c = self.config
            self._metrics_server = serve_metrics(
                self.metrics.registry, c.metrics_port, c.host, c.tls, c.metrics_client_ca
            )
        if self.config.router:
            self._registration = asyncio.create_task(
                register_and_heartbeat(
                    self.config.router,
                    self.registration(),
                    self.load,
                    self._stop,
                    tls=self.config.tls,
                    draining=self._draining,
                )
            )
            self._registration.add_done_callback(self._registration_ended)
            # Streams prefix-cache changes to the router's KV index. The router refuses
            # the stream until the registration above lands; the publisher retries.
            self._kv_publisher = asyncio.create_task(
                publish_kv_events(
                    self.config.router,
                    self.worker_id,
                    self.loop,
                    self._stop,
                    tls=self.config.tls,
                    instance=self.instance,
                )
            )
        log.info(
            "%s worker %s serving %s on %s (listening on %s)",
            self.metrics.role,
            self.worker_id,
            self.config.model,
            self.address,
            self.config.host,
        )

    def registration(self) -> wpb.RegisterRequest:
        from services.kv_transfer.layout import describe

        engine = self.engine
        return wpb.RegisterRequest(
            worker_id=self.worker_id,
            role=self.role,
            address=self.address,
            model=self.config.model,
            layout=describe(engine.runner.kv_cache, engine.model_id),
            max_context_length=engine.max_model_len,
            vocab_size=engine.model_config.vocab_size,
            instance=self.instance,
        )

    async def load(self) -> wpb.WorkerLoad:
        """What the heartbeat reports: the engine's figures as of its last step (never
        waiting for the step under way), GPU memory and utilisation. Raises once the engine
        thread has died, which ends the heartbeats (and the worker)."""
        assert self._latest_load is not None, "the worker has not started"
        figures = wpb.WorkerLoad()
        figures.CopyFrom(self._latest_load())
        gpu = self._gpu.read()
        figures.gpu_memory_used_bytes = gpu.memory_used_bytes
        figures.gpu_memory_total_bytes = gpu.memory_total_bytes
        figures.gpu_utilization_percent = gpu.utilization_percent
        return figures

    async def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM (then drain and stop) or until the router refuses this
        worker (then stop at once)."""
        async with shutdown_signals() as signalled:
            await first_of(signalled.wait(), self._stop.wait())
            if signalled.is_set():
                signalled.clear()  # a second signal cuts the drain short
                await self.drain(interrupt=signalled)
        await self.stop()

    async def drain(self, interrupt: asyncio.Event | None = None) -> bool:
        """Refuse new Prefill/Decode calls, tell the router, and wait until the calls in
        flight and the prefills held for decode workers are done, for at most
        ``drain_timeout_s`` or until ``interrupt`` is set. True when it ended idle."""
        assert self.server is not None, "the worker has not started"
        timeout = self.config.drain_timeout_s
        self._draining.set()  # the heartbeat tells the router at once
        self.metrics.draining.set(1)
        log.info(
            "draining: refusing new requests, finishing %d in flight (at most %g s; "
            "signal again to stop now)",
            self.gate.active,
            timeout,
        )
        idle = drain_server(self.server, self.gate, timeout, self._holds_work)
        done = await drained_unless(idle, interrupt)
        self._drain_cut_short = not done
        if done:
            log.info("drained: every request finished; stopping")
        else:
            log.warning(
                "stopping with %d calls still in flight (%s); the router resumes them elsewhere",
                self.gate.active,
                why_cut(interrupt),
            )
        return done

    async def _holds_work(self) -> bool:
        """Whether the engine still runs requests or pins prefills for a reader."""
        if self.loop is None:
            return False
        try:
            return await self.loop.call(lambda e: e.has_unfinished() or e.num_held > 0)
        except RuntimeError:  # the engine thread died: nothing left to finish
            return False

    def on_stop(self, close: Callable[[], Awaitable[None]]) -> None:
        """Await ``close()`` at stop, once the server no longer runs calls and while the
        engine loop and the KV transport still run: for what a servicer holds beyond its
        calls (channels to peers, background tasks). The last registered closes first."""
        self._closers.append(close)

    async def stop(self) -> None:
        """Stop serving, then close the servicers, the engine and the KV transport. Calls
        still running get STOP_GRACE_S to end, none after a drain cut short: that drain was
        their grace, and the router resumes them elsewhere at once (with the grace they ran
        up to 2 s past --drain-timeout-s, and one ending meanwhile finished here after
        all, which a rolling update's termination period must then cover)."""
        self._stop.set()
        for task in (self._registration, self._kv_publisher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.server is not None:
            await self.server.stop(grace=0.0 if self._drain_cut_short else STOP_GRACE_S)
        await self._close_servicers()
        if self.loop is not None:
            await self.loop.stop()
        if self.transport is not None:
            await self.transport.close()
        if self._metrics_server is not None:  # a Ray actor's process outlives its host
            await asyncio.to_thread(self._metrics_server.close)
            self._metrics_server = None
        shutdown_tracing()

    async def _close_servicers(self) -> None:
        closers, self._closers = self._closers, []
        for close in reversed(closers):
            try:
                await close()
            except Exception:  # logged; the rest (engine, transport) must close all the same
                log.exception("closing a servicer failed")

    def _registration_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self.refused = error = task.exception()
        if isinstance(error, grpc.aio.AioRpcError):
            log.error("the router refused this worker, stopping: %s", error)
        else:  # the engine thread died, say
            log.error("heartbeats ended, stopping the worker: %s", error)
        self._stop.set()

    def _expire_leases(self, engine: LLMEngine) -> None:
        expired = engine.expire_held()
        if expired:
            self.metrics.lease_expiries.inc(len(expired))
            log.warning("released %d unread prefills at lease end", len(expired))


def _engine_load(engine: LLMEngine) -> wpb.WorkerLoad:
    sched = engine.scheduler
    return wpb.WorkerLoad(
        running=len(sched.running),
        waiting=len(sched.waiting) + len(sched.awaiting_room),
        free_blocks=engine.pool.num_free_blocks,
        total_blocks=engine.pool.num_blocks,
        queued_prefill_tokens=sched.queued_prefill(),
    )


async def run_worker(
    config: WorkerConfig, role: int, servicers: Callable[[WorkerHost], list[Servicer]]
) -> int:
    """Start a worker of ``role`` mounting ``servicers`` and serve until SIGINT/SIGTERM."""
    host = WorkerHost(config, role)
    await host.start(servicers)
    await host.serve_forever()
    return 1 if host.refused is not None else 0
