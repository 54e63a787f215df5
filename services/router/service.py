"""gRPC servicers: tandem.v1.Inference (clients) and tandem.v1.Registry (workers).

Thin: they translate between gRPC and the orchestrator / registry, and map
errors to statuses. Prompt text never reaches a log line.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from services.engine.errors import TandemError
from services.router.errors import RouteError
from services.router.metrics import RouterMetrics
from services.router.orchestrator import Orchestrator
from services.router.registry import WorkerRegistry
from services.rpc.status import abort_with
from services.stubs.tandem.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

log = logging.getLogger(__name__)


class InferenceService(inference_pb2_grpc.InferenceServicer):
    """Generate and ListModels, served by the orchestrator."""

    def __init__(self, orchestrator: Orchestrator, metrics: RouterMetrics | None = None) -> None:
        self._orchestrator = orchestrator
        self._metrics = metrics or RouterMetrics()

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        stream = self._metrics.observe(
            self._orchestrator.generate(request, timeout=context.time_remaining())
        )
        try:
            async with aclosing(stream) as messages:
                async for message in messages:
                    yield message
        except RouteError as error:
            await context.abort(error.code, str(error))
        except TandemError as error:
            await abort_with(context, error)
        except Exception as error:  # a router bug: say so rather than UNKNOWN
            log.exception("request %r failed inside the router", request.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"router error: {error!r}")

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        return self._orchestrator.list_models()


class RegistryService(worker_pb2_grpc.RegistryServicer):
    """Register and Heartbeat, kept in the WorkerRegistry."""

    def __init__(self, registry: WorkerRegistry, heartbeat_interval_s: float) -> None:
        self._registry = registry
        self._interval_ms = max(1, round(heartbeat_interval_s * 1000))

    async def Register(
        self, request: worker_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.RegisterResponse:
        try:
            self._registry.register(request)
        except TandemError as error:
            log.warning("refused worker %r: %s", request.worker_id, error)
            await abort_with(context, error)
        return worker_pb2.RegisterResponse(heartbeat_interval_ms=self._interval_ms)

    async def Heartbeat(
        self, request: worker_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.HeartbeatResponse:
        try:
            self._registry.heartbeat(request.worker_id, request.load)
        except TandemError as error:
            await abort_with(context, error)
        return worker_pb2.HeartbeatResponse()
