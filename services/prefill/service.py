"""tandem.v1.PrefillWorker: run prompts, hand their KV to decode workers under a lease."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import grpc

from services.engine.engine import LLMEngine
from services.engine.errors import TandemError
from services.engine.outputs import FinishReason
from services.rpc.drain import CallGate
from services.rpc.requests import (
    FINISH_TO_PROTO,
    check_model,
    prompt_token_ids,
    sampling_params,
)
from services.rpc.status import abort_with
from services.stubs.tandem.v1 import worker_pb2 as wpb
from services.stubs.tandem.v1 import worker_pb2_grpc
from services.worker.engine_loop import EngineLoop
from services.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

_FAILED = {
    FinishReason.ERROR: (grpc.StatusCode.INTERNAL, "the model step failed"),
    FinishReason.CANCELLED: (grpc.StatusCode.UNAVAILABLE, "the worker aborted it"),
}
"""Endings of a prefill that carry no first token, and the status each ends the call with:
a PrefillResponse has no room for an error, and a fake token must never reach a client."""


class PrefillService(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(
        self,
        loop: EngineLoop,
        worker_id: str,
        address: Callable[[], str],
        default_lease_s: float,
        metrics: WorkerMetrics,
        gate: CallGate,
        *,
        model: str,
    ) -> None:
        self.loop = loop
        self.model = model
        """The model this worker serves: calls naming another are NOT_FOUND."""
        self.gate = gate
        self.worker_id = worker_id
        self.address = address
        self.default_lease_s = default_lease_s
        self.metrics = metrics

    async def Prefill(
        self, request: wpb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> wpb.PrefillResponse:
        async with self.gate.admit(context):  # UNAVAILABLE once the worker drains
            return await self._prefill(request, context)

    async def _prefill(
        self, request: wpb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> wpb.PrefillResponse:
        req = request.request
        rid = req.request_id or uuid.uuid4().hex
        try:
            check_model(req, self.model)
            prompt = prompt_token_ids(req)
            params = sampling_params(req)
        except TandemError as e:
            await abort_with(context, e)
        lease_s = self._lease_s(request.lease_ms)

        added = False  # set on the engine thread: this call's request, not another's

        def submit(engine: LLMEngine) -> None:
            nonlocal added
            engine.add_request(rid, prompt, params, prefill_only=True, lease_s=lease_s)
            added = True

        outs = []
        try:
            outs = [o async for o in self.loop.outputs(rid, submit)]
        except TandemError as e:
            await abort_with(context, e)
        except BaseException:
            # Cancelled after the prefill finished: nobody will read the blocks. Only ours:
            # a duplicate refused (or cancelled before it was added) must not release the
            # pin of the request that holds this id.
            await self.loop.call(lambda engine: added and engine.release_held(rid))
            raise
        # From here to the answer there is no await (no point where a cancellation lands
        # with the blocks pinned); one lost in transit is the router's to release.
        out = outs[-1] if outs else None
        if out is None or out.usage is None:
            await context.abort(grpc.StatusCode.INTERNAL, f"prefill of {rid} ended without output")
        if out.finish_reason in _FAILED:  # nothing is pinned: the engine freed the blocks
            code, why = _FAILED[out.finish_reason]
            await context.abort(code, f"prefill of {rid} failed: {why}")
        response = wpb.PrefillResponse(
            first_token_id=out.token_ids[0] if out.token_ids else 0,
            first_text=out.text,
            cached_tokens=out.usage.cached_tokens,
        )
        if out.finish_reason is not None:
            response.finish_reason = FINISH_TO_PROTO[out.finish_reason]
            self.metrics.prefill_requests.inc()
            return response
        held = out.held
        if held is None or held.expires_at <= time.monotonic():  # a lease of ~0
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"lease of {rid} expired at once")
        response.kv.CopyFrom(
            wpb.KVHandle(
                worker_id=self.worker_id,
                address=self.address(),
                request_id=rid,
                block_ids=held.block_ids,
                num_tokens=held.num_tokens,
                lease_ms=max(1, int((held.expires_at - time.monotonic()) * 1000)),
            )
        )
        self.metrics.prefill_requests.inc()
        return response

    def _lease_s(self, lease_ms: int) -> float:
        """The lease a PrefillRequest asks for, in seconds: the worker's own when it asks
        for none, and never longer (an operator bounds how long a caller pins this pool;
        lease_ms alone allows some 49 days)."""
        if not lease_ms:
            return self.default_lease_s
        return min(lease_ms / 1000, self.default_lease_s)

    async def ReleaseKV(
        self, request: wpb.ReleaseKVRequest, context: grpc.aio.ServicerContext
    ) -> wpb.ReleaseKVResponse:
        released = await self.loop.call(lambda engine: engine.release_held(request.request_id))
        if not released:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"request {request.request_id!r} holds no pinned blocks here "
                "(already released, lease expired, or never prefilled on this worker)",
            )
        self.metrics.kv_released.inc()
        return wpb.ReleaseKVResponse()
