"""The gateway's ``tandem.v1.Inference`` servicer: gRPC in front of the policy chain.

Authentication, authorization, admission, forwarding and the settle live in
:mod:`services.gateway.pipeline`, shared with the OpenAI HTTP API; this module only reads
the call (metadata, peer, deadline) and turns a :class:`GatewayError` into the call's status:
with its google.rpc details (ErrorInfo, QuotaFailure, RetryInfo, BadRequest) when it has
some, or as the router's plain code and message when it relays an upstream failure.

Every Generate call gets an id the gateway mints (the ledger's key, the audit record's id, the
id the router sees). The caller finds it on every message (``request_id``) unless it chose an
id of its own, which is then kept for correlation only and stays the id on the messages it
receives (see :class:`CallInfo`); and in the trailing metadata ``x-request-id`` of every call
that ends with a status, served or refused. Not in initial metadata: headers of their own are
one more batch on the call (~0.2 ms of the gateway's ~2 ms on average,
bench/gateway/README.md), while trailing metadata travels with the status. A call the client
cancels, having chosen its own id, is found by that id (``Ledger.find``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc.aio

from services.gateway import status_details
from services.gateway.audit import AuditLog
from services.gateway.auth import Authenticator
from services.gateway.ledger import Ledger
from services.gateway.limits import Admission
from services.gateway.pipeline import (
    DEFAULT_MAX_TOKENS,
    MAX_STREAMS,
    CallInfo,
    GatewayError,
    Pipeline,
    check_client_request_id,
    prompt_estimate,
)
from services.gateway.policy import Policy
from services.rpc.drain import CallGate
from services.stubs.tandem.v1 import inference_pb2, inference_pb2_grpc

__all__ = ["DEFAULT_MAX_TOKENS", "REQUEST_ID_HEADER", "GatewayService", "prompt_estimate"]

REQUEST_ID_HEADER = "x-request-id"
"""Initial metadata carrying the gateway's id for the call (as the HTTP API's header does)."""


class GatewayService(inference_pb2_grpc.InferenceServicer):
    """Inference in front of a router; see :mod:`services.gateway.pipeline`."""

    def __init__(
        self,
        router: inference_pb2_grpc.InferenceStub,
        authenticator: Authenticator,
        policy: Policy,
        admission: Admission,
        ledger: Ledger,
        audit: AuditLog,
        max_streams: int = MAX_STREAMS,
    ) -> None:
        self.pipeline = Pipeline(
            router, authenticator, policy, admission, ledger, audit, max_streams
        )
        self.gate = CallGate("the gateway")
        """Admits Generate calls until the gateway drains (refused ones cost nothing)."""

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        async for message in self.gate.stream(context, self._generate(request, context)):
            yield message  # the gate: UNAVAILABLE once the gateway drains

    async def _generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        call = _call_info(context, uuid.uuid4().hex, request.request_id)
        id_trailer = ((REQUEST_ID_HEADER, call.request_id),)
        context.set_trailing_metadata(id_trailer)  # sent with the status, no I/O of its own
        try:
            who = await self.pipeline.authenticate(call, request.model)
            check_client_request_id(request.request_id, "request_id")
            async with aclosing(self.pipeline.generate(who, request, call)) as stream:
                async for message in stream:
                    yield message
        except GatewayError as error:
            await _abort(context, error, id_trailer)

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        call = _call_info(context, "")
        try:
            who = await self.pipeline.authenticate(call)
            return await self.pipeline.list_models(who, call)
        except GatewayError as error:
            await _abort(context, error)
            raise  # abort raises; this is never reached


def _call_info(
    context: grpc.aio.ServicerContext, request_id: str, client_request_id: str = ""
) -> CallInfo:
    return CallInfo(
        request_id=request_id,
        client_request_id=client_request_id,
        metadata=context.invocation_metadata() or (),
        peer=context.peer() or "",
        time_remaining=context.time_remaining,
    )


async def _abort(
    context: grpc.aio.ServicerContext,
    error: GatewayError,
    trailing: tuple[tuple[str, str], ...] = (),
) -> None:
    """End the call with the error's status and ``trailing`` metadata (raises)."""
    if error.status.details:
        await status_details.abort_with_details(context, error.status, trailing)
    await context.abort(error.code, error.message, trailing_metadata=trailing)
