"""The gateway's ``tandem.v1.Inference`` servicer: authenticate, authorize, admit, forward.

Generate, step by step:

1. Authenticate the ``authorization: Bearer …`` metadata (:mod:`services.gateway.auth`):
   UNAUTHENTICATED with ErrorInfo when missing or invalid.
2. Authorize the model with the policy: PERMISSION_DENIED with ErrorInfo otherwise.
3. Reserve ``prompt estimate + max_tokens`` tokens (and one request) on the scopes
   ``key:<id>`` (API keys), ``user:<principal>`` and ``team:<team>`` with the policy's
   default limits (a key's own limits override the key scope's): RESOURCE_EXHAUSTED with
   QuotaFailure (and RetryInfo for rate limits) otherwise. The prompt estimate is exact for
   ``prompt_token_ids``; for text it is ``len(prompt.encode()) // 2 + 1``, a conservative
   bound (real tokenizers average well over two bytes a token), so the reservation errs high
   and the settle gives the difference back. ``max_tokens`` unset counts as 16, the engine's
   default.
4. Forward to the router with the caller's remaining deadline and relay every message.
5. Settle exactly once: with the final message's ``usage.prompt_tokens +
   completion_tokens``; on an error or cancellation with the prompt estimate plus the tokens
   already relayed (counted), or release the reservation when no token was produced. The
   same numbers go into one ledger row (idempotent on the request id) and one audit record
   (allow, with the outcome as its reason). Denials get one audit record (deny + reason) and
   no ledger row. Prompt text is never logged or audited.

The stores are synchronous, so ledger, audit, key lookups and admission run in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping

import grpc
import grpc.aio

from services.engine.errors import TandemError
from services.gateway import status_details
from services.gateway.audit import AuditEvent, AuditLog
from services.gateway.auth import Authenticator, Identity, MissingCredential
from services.gateway.identity import AuthenticationError
from services.gateway.ledger import Ledger, UsageRecord
from services.gateway.limits import Admission, LimitExceeded, Limits, Reservation, Scope
from services.gateway.policy import LIMIT_FIELDS, Policy
from services.stubs.tandem.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16
"""What the engine generates when ``max_tokens`` is unset (reserved as such)."""


def prompt_estimate(request: inference_pb2.GenerateRequest) -> int:
    """Prompt tokens to reserve: exact for token ids, a conservative bound for text."""
    if request.prompt_token_ids:
        return len(request.prompt_token_ids)
    return len(request.prompt.encode()) // 2 + 1


def _limits(defaults: Mapping[str, int], overrides: Mapping[str, float] | None = None) -> Limits:
    merged = {k: int(v) for k, v in defaults.items() if k in LIMIT_FIELDS}
    merged.update({k: int(v) for k, v in (overrides or {}).items() if k in LIMIT_FIELDS})
    return Limits(**merged)


class GatewayService(inference_pb2_grpc.InferenceServicer):
    """Inference in front of a router; see the module docstring."""

    def __init__(
        self,
        router: inference_pb2_grpc.InferenceStub,
        authenticator: Authenticator,
        policy: Policy,
        admission: Admission,
        ledger: Ledger,
        audit: AuditLog,
    ) -> None:
        self._router = router
        self._auth = authenticator
        self._policy = policy
        self._admission = admission
        self._ledger = ledger
        self._audit = audit

    # ---- helpers -------------------------------------------------------------------------

    async def _record_audit(self, event: AuditEvent) -> None:
        try:
            await asyncio.to_thread(self._audit.append, event)
        except Exception:
            log.exception("audit append failed for request %s", event.request_id or "?")

    async def _authenticate(
        self, context: grpc.aio.ServicerContext, model: str, request_id: str
    ) -> Identity:
        try:
            return await self._auth.authenticate(context.invocation_metadata())
        except AuthenticationError as exc:
            reason = (
                "CREDENTIAL_MISSING"
                if isinstance(exc, MissingCredential)
                else ("CREDENTIAL_INVALID")
            )
            await self._record_audit(
                AuditEvent(
                    principal="anonymous",
                    decision="deny",
                    reason=f"unauthenticated: {exc}",
                    model=model,
                    request_id=request_id,
                    source=context.peer() or "",
                )
            )
            await status_details.abort_with_details(
                context, status_details.unauthenticated(str(exc), reason)
            )
            raise  # abort raises; this is never reached

    def _scopes(self, who: Identity) -> list[Scope]:
        limits = self._policy.limits
        scopes = []
        if who.key_id is not None:
            key_limits = _limits(limits.get("key", {}), who.key_limits)
            scopes.append(Scope(f"key:{who.key_id}", key_limits))
        else:
            scopes.append(Scope(f"user:{who.principal}", _limits(limits.get("user", {}))))
        if who.team:
            scopes.append(Scope(f"team:{who.team}", _limits(limits.get("team", {}))))
        return scopes

    def _event(
        self, who: Identity, decision: str, reason: str, model: str, request_id: str, peer: str
    ) -> AuditEvent:
        return AuditEvent(
            principal=who.principal,
            decision=decision,
            reason=reason,
            team=who.team,
            model=model,
            request_id=request_id,
            client=who.client,
            source=peer,
        )

    # ---- RPCs ----------------------------------------------------------------------------

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        started = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        peer = context.peer() or ""
        model = request.model
        who = await self._authenticate(context, model, request_id)

        if not self._policy.allows(who.caller, model):
            await self._record_audit(
                self._event(who, "deny", "model not allowed", model, request_id, peer)
            )
            await status_details.abort_with_details(
                context,
                status_details.permission_denied(
                    f"{who.principal} may not use model {model!r}",
                    "MODEL_NOT_ALLOWED",
                    metadata={"model": model},
                ),
            )

        prompt = prompt_estimate(request)
        max_tokens = request.max_tokens if request.HasField("max_tokens") else DEFAULT_MAX_TOKENS
        try:
            reservation = await asyncio.to_thread(
                self._admission.reserve, self._scopes(who), prompt + max(0, max_tokens)
            )
        except LimitExceeded as exc:
            await self._record_audit(
                self._event(who, "deny", f"limit exceeded: {exc}", model, request_id, peer)
            )
            await status_details.abort_with_details(context, status_details.limit_exceeded(exc))
            raise  # never reached
        except TandemError as exc:  # e.g. the limit store is down and fail-closed
            await self._record_audit(
                self._event(who, "deny", f"admission failed: {exc}", model, request_id, peer)
            )
            await status_details.abort_with_details(context, status_details.from_error(exc))
            raise  # never reached

        forwarded = inference_pb2.GenerateRequest()
        forwarded.CopyFrom(request)
        forwarded.request_id = request_id
        streamed = 0
        final: inference_pb2.GenerateResponse | None = None
        outcome = "ok"
        error: grpc.aio.AioRpcError | None = None
        call = self._router.Generate(forwarded, timeout=context.time_remaining())
        try:
            async for message in call:
                streamed += len(message.token_ids)
                if message.finish_reason:
                    final = message
                yield message
        except grpc.aio.AioRpcError as exc:
            error, outcome = exc, "error"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            call.cancel()
            raise
        finally:
            done = asyncio.ensure_future(
                self._settle(
                    who,
                    request_id,
                    model,
                    reservation,
                    prompt,
                    streamed,
                    final,
                    outcome,
                    started,
                    peer,
                )
            )
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(done)  # if cancelled again, the settle still finishes
        if error is not None:
            await context.abort(error.code(), error.details() or "")

    async def _settle(
        self,
        who: Identity,
        request_id: str,
        model: str,
        reservation: Reservation,
        prompt: int,
        streamed: int,
        final: inference_pb2.GenerateResponse | None,
        outcome: str,
        started: float,
        peer: str,
    ) -> None:
        cached = 0
        if final is not None and final.HasField("usage"):
            prompt_tokens = final.usage.prompt_tokens
            completion = final.usage.completion_tokens
            cached = min(final.usage.cached_tokens, prompt_tokens)
            name = inference_pb2.FinishReason.Name(final.finish_reason)
            if final.finish_reason == inference_pb2.FINISH_REASON_CANCELLED:
                outcome = "cancelled"
            elif final.finish_reason == inference_pb2.FINISH_REASON_ERROR:
                outcome = "error"
            reason = "ok" if outcome == "ok" else f"{outcome} ({name})"
        else:
            prompt_tokens = prompt if streamed else 0
            completion = streamed
            reason = "ok" if outcome == "ok" else outcome
            if outcome == "ok":  # the stream ended without a final message
                outcome = reason = "error"
        try:
            if prompt_tokens + completion:
                await asyncio.to_thread(
                    self._admission.settle, reservation, prompt_tokens + completion
                )
            else:
                await asyncio.to_thread(self._admission.release, reservation)
        except Exception:
            log.exception("settling request %s failed", request_id)
        try:
            await asyncio.to_thread(
                self._ledger.record,
                UsageRecord(
                    request_id=request_id,
                    principal=who.principal,
                    team=who.team or "-",
                    model=model,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion,
                    cached_tokens=cached,
                    latency_ms=(time.monotonic() - started) * 1000,
                    outcome=outcome,
                    key_id=who.key_id,
                ),
            )
        except Exception:
            log.exception("ledger write failed for request %s", request_id)
        event = self._event(who, "allow", reason, model, request_id, peer)
        await self._record_audit(
            dataclasses.replace(event, prompt_tokens=prompt_tokens, completion_tokens=completion)
        )

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        who = await self._authenticate(context, "", "")
        served = await self._router.ListModels(request, timeout=context.time_remaining())
        visible = set(self._policy.visible_models(who.caller, [m.id for m in served.models]))
        return inference_pb2.ListModelsResponse(
            models=[m for m in served.models if m.id in visible]
        )
