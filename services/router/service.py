"""gRPC servicers: tandem.v1.Inference (clients) and tandem.v1.Registry (workers).

Thin: they translate between gRPC and the orchestrator / registry, and map
errors to statuses. Prompt text never reaches a log line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import aclosing

import grpc

from services.engine.errors import TandemError
from services.router.errors import RouteError, SupersededWorkerError
from services.router.kv_state import NeedsSnapshot, RouterKVState
from services.router.metrics import RouterMetrics
from services.router.orchestrator import Orchestrator
from services.router.registry import WorkerRegistry, WorkerState, check_instance
from services.rpc.drain import CallGate
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

    def __init__(
        self,
        orchestrator: Orchestrator,
        metrics: RouterMetrics | None = None,
        gate: CallGate | None = None,
    ) -> None:
        self._orchestrator = orchestrator
        self._metrics = metrics or RouterMetrics()
        self._gate = gate if gate is not None else CallGate("the router")

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        async for message in self._gate.stream(context, self._generate(request, context)):
            yield message  # the gate: UNAVAILABLE once the router drains

    async def _generate(
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
            # Not the exception's text: it reaches callers through the gateway as it is.
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"router error ({type(error).__name__}); the router's log has the traceback",
            )

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        return self._orchestrator.list_models()


class RegistryService(worker_pb2_grpc.RegistryServicer):
    """Register and Heartbeat, kept in the WorkerRegistry; PublishKVEvents, in RouterKVState."""

    def __init__(
        self,
        registry: WorkerRegistry,
        heartbeat_interval_s: float,
        kv_state: RouterKVState | None = None,
    ) -> None:
        self._registry = registry
        self._interval_ms = max(1, round(heartbeat_interval_s * 1000))
        self._kv_state = kv_state

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
            self._registry.heartbeat(
                request.worker_id, request.load, request.draining, request.instance
            )
        except TandemError as error:
            await abort_with(context, error)
        return worker_pb2.HeartbeatResponse()

    async def PublishKVEvents(
        self,
        request_iterator: AsyncIterable[worker_pb2.KVEventBatch],
        context: grpc.aio.ServicerContext,
    ) -> worker_pb2.KVEventsAck:
        """Apply one worker's snapshot and events; FAILED_PRECONDITION asks it to resync.

        The stream is bound to the registry entry live when it opened. Once that entry is
        removed (expired, or replaced by a re-registration, whose listener already dropped
        the worker's index entries) the stream ends at once, whether or not a message
        arrives: an old stream can never re-add stale blocks, and the worker resyncs with
        a snapshot now rather than at its next event (an idle worker holding a hot prefix
        was left out of the index until then).
        """
        if self._kv_state is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this router keeps no KV index")
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None:
            return worker_pb2.KVEventsAck()
        worker = await self._bind_kv_stream(first, context)
        await self._apply_kv(worker, first, context)
        removed = asyncio.ensure_future(worker.gone.wait())
        try:
            while (
                batch := await self._next_kv_batch(messages, removed, worker, context)
            ) is not None:
                await self._check_kv_batch(worker, batch, context)
                await self._apply_kv(worker, batch, context)
        finally:
            removed.cancel()
        return worker_pb2.KVEventsAck()

    async def _bind_kv_stream(
        self, first: worker_pb2.KVEventBatch, context: grpc.aio.ServicerContext
    ) -> WorkerState:
        worker = self._registry.get(first.worker_id)
        if worker is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker {first.worker_id!r} is not registered; register, then "
                "reconnect starting with a snapshot",
            )
        try:
            check_instance(worker, first.instance)
        except SupersededWorkerError as error:
            await abort_with(context, error)
        if not first.HasField("snapshot"):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the first KVEventBatch of a stream must carry a snapshot",
            )
        return worker

    @staticmethod
    async def _next_kv_batch(
        messages: AsyncIterator[worker_pb2.KVEventBatch],
        removed: asyncio.Future[object],
        worker: WorkerState,
        context: grpc.aio.ServicerContext,
    ) -> worker_pb2.KVEventBatch | None:
        """The next batch, None at the end of the stream; aborts once ``worker`` is removed."""
        if not removed.done():
            arrived = asyncio.ensure_future(anext(messages, None))
            await asyncio.wait((arrived, removed), return_when=asyncio.FIRST_COMPLETED)
            if arrived.done():
                return arrived.result()
            arrived.cancel()
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"worker {worker.worker_id!r} was removed or re-registered since this "
            "stream opened; reconnect starting with a snapshot",
        )
        return None  # not reached: abort raises

    @staticmethod
    async def _check_kv_batch(
        worker: WorkerState, batch: worker_pb2.KVEventBatch, context: grpc.aio.ServicerContext
    ) -> None:
        if batch.worker_id not in ("", worker.worker_id):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"this stream publishes for worker {worker.worker_id!r}, not {batch.worker_id!r}",
            )
        if batch.HasField("snapshot"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "only the first KVEventBatch of a stream may carry a snapshot",
            )

    async def _apply_kv(
        self,
        worker: WorkerState,
        batch: worker_pb2.KVEventBatch,
        context: grpc.aio.ServicerContext,
    ) -> None:
        assert self._kv_state is not None
        try:
            self._kv_state.apply(worker, batch)
        except NeedsSnapshot as error:
            log.info("%s; ending its KV event stream", error)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        except ValueError as error:
            log.warning("bad KV events from worker %r: %s", worker.worker_id, error)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
