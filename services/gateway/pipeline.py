"""The gateway's policy chain, independent of the transport (gRPC or the OpenAI HTTP API).

Generate, step by step:

1. :meth:`Pipeline.authenticate` resolves the ``authorization: Bearer …`` value
   (:mod:`services.gateway.auth`): UNAUTHENTICATED with ErrorInfo when missing or invalid.
2. :meth:`Pipeline.generate` refuses a stream past ``max_streams`` relayed at once
   (UNAVAILABLE with RetryInfo, :data:`MAX_STREAMS`), then authorizes the model with the
   policy: PERMISSION_DENIED with ErrorInfo otherwise.
3. It reserves ``prompt estimate + max_tokens`` tokens (and one request) on the scopes
   ``key:<id>`` (API keys), ``user:<principal>`` and ``team:<team>`` with the policy's
   default limits (a key's own limits override the key scope's): RESOURCE_EXHAUSTED with
   QuotaFailure (and RetryInfo for rate limits) otherwise. See :func:`prompt_estimate`.
   ``max_tokens`` unset counts as 16, the engine's default.
4. It forwards to the router with the caller's remaining deadline and yields every message.
5. It settles exactly once: with the final message's ``usage.prompt_tokens +
   completion_tokens``; on an error or cancellation (a gRPC cancel, an HTTP client that went
   away, a consumer that stopped iterating) with the prompt estimate plus the tokens already
   relayed, or it releases the reservation when no token was produced. The same numbers go
   into one ledger row (idempotent on the gateway's request id, never the client's: see
   :class:`CallInfo`) and one audit record (allow, with the outcome as its reason). A
   finished stream's call ends right after its final message: the router's own close is
   awaited in the background. The settle runs on the event loop without awaiting anything
   (a second cancel cannot cut it short): in-process admission is settled there, and the
   row and record are queued for :class:`services.gateway.settler.Settler`, which commits
   them after the call's status is sent (why, and what that trades: its module doc).
   Denials get one audit record (deny + reason), queued the same way, and no ledger row.
   Prompt text is never logged or audited.

Every refusal and upstream failure is a :class:`GatewayError` carrying a ``google.rpc.Status``
(code, message, details): gRPC sends it as is, HTTP maps it to a status code and body.
The stores are synchronous: key lookups and a blocking admission (Redis) run in threads,
the ledger and audit writes on the settler's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2

from services.engine.errors import TandemError
from services.gateway import status_details
from services.gateway.audit import AuditEvent, AuditLog
from services.gateway.auth import Authenticator, Identity, MissingCredential
from services.gateway.identity import AuthenticationError
from services.gateway.ledger import Ledger, UsageRecord
from services.gateway.limits import Admission, LimitExceeded, Limits, Reservation, Scope
from services.gateway.metrics import METRICS
from services.gateway.model_cards import ModelCards
from services.gateway.policy import LIMIT_FIELDS, Policy
from services.gateway.settler import Settle, Settler, settle_admission
from services.gateway.tracing import (
    annotate,
    identity_attributes,
    step_attributes,
    sync_step,
    traced,
    usage_attributes,
)
from services.stubs.tandem.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

LIST_MODELS_TIMEOUT_S = 10.0
"""Longest wait for the router's ListModels when the caller set no deadline (HTTP): a hung
router answers GET /v1/models with 504, not never."""
DEFAULT_MAX_TOKENS = 16
"""What the engine generates when ``max_tokens`` is unset (reserved as such)."""
CHAT_TOKENS_PER_MESSAGE = 8
"""Reserved per chat message for what a chat template adds (role markers, special tokens)."""
SPECIAL_TOKENS = 4
"""Tokens a tokenizer may add around a text (BOS, EOS, a role marker), for the bound."""
CALLER_FAULT = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE}
)
"""The router's refusals of a request as the caller's mistake (too long, a bad field, a
model it does not serve): they did the router's work, so they count against the caller's
request rate; other failures before a token (no worker, an internal error) do not."""
MAX_STREAMS = 4096
"""Generate streams one gateway relays at once (gRPC and HTTP together) by default; one
more is refused UNAVAILABLE with RetryInfo (HTTP 503 + Retry-After), audited, so that a
flood of long streams from callers within their limits cannot take the process's memory
and event loop from the ones already running (Envoy's circuit breaker answers the same).
``GatewayConfig.max_streams``."""
AT_CAPACITY = "gateway at capacity"
"""The audit reason of a call refused by :data:`MAX_STREAMS` (a class of its own in the
metrics)."""


def prompt_estimate(request: inference_pb2.GenerateRequest) -> int:
    """Prompt tokens to reserve before the router has tokenized anything.

    Exact for ``prompt_token_ids``. For text, an upper bound, so concurrent requests cannot
    overshoot a budget: byte-level BPE tokens (Llama 3, Qwen2, tandem-tiny) and
    SentencePiece pieces with byte fallback are each at least one byte, so a text holds at
    most ``bytes`` tokens, plus :data:`SPECIAL_TOKENS` the tokenizer adds (BOS). An average
    (e.g. bytes / 2) is not a bound: tandem-tiny gives 1.5 bytes a token on prose. For chat
    messages, the same over roles and contents plus :data:`CHAT_TOKENS_PER_MESSAGE` each
    for the template's markup; a template with a long preamble can exceed that, which only
    means the reservation errs low until the settle. The settle gives the difference back.
    """
    if request.prompt_token_ids:
        return len(request.prompt_token_ids)
    if request.messages:
        size = sum(len(m.role.encode()) + len(m.content.encode()) for m in request.messages)
        return size + CHAT_TOKENS_PER_MESSAGE * len(request.messages) + SPECIAL_TOKENS
    return len(request.prompt.encode()) + SPECIAL_TOKENS


class GatewayError(Exception):
    """A refusal or an upstream failure, as the ``google.rpc.Status`` the caller gets."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status

    @classmethod
    def upstream(cls, error: grpc.aio.AioRpcError) -> GatewayError:
        """The router's status, relayed with its code and message."""
        return cls(status_pb2.Status(code=error.code().value[0], message=error.details() or ""))

    @property
    def code(self) -> grpc.StatusCode:
        return next(c for c in grpc.StatusCode if c.value[0] == self.status.code)

    @property
    def message(self) -> str:
        return self.status.message

    def detail(self, kind: type) -> object | None:
        """The first detail of type ``kind`` (e.g. ``error_details_pb2.RetryInfo``), if any."""
        for packed in self.status.details:
            value = kind()
            if packed.Unpack(value):
                return value
        return None

    @property
    def retry_after_s(self) -> float | None:
        """RetryInfo's delay in seconds; None when there is none (e.g. a monthly quota)."""
        info = self.detail(error_details_pb2.RetryInfo)
        if not isinstance(info, error_details_pb2.RetryInfo):
            return None
        return info.retry_delay.seconds + info.retry_delay.nanos / 1e9


CLIENT_REQUEST_ID_MAX = 512
"""Longest request id a client may choose (it is stored and echoed on every message)."""


def check_client_request_id(value: str, field: str) -> None:
    """INVALID_ARGUMENT naming ``field`` unless ``value`` is printable ASCII of at most
    :data:`CLIENT_REQUEST_ID_MAX` characters ('' is fine: no id)."""
    if len(value) <= CLIENT_REQUEST_ID_MAX and value.isascii() and value.isprintable():
        return
    description = f"must be printable ASCII of at most {CLIENT_REQUEST_ID_MAX} characters"
    raise GatewayError(
        status_details.invalid_argument(f"{field}: {description}", [(field, description)])
    )


MODEL_NAME_MAX = 256
"""Longest model name a request may carry (it is echoed in errors and stored per request)."""


def check_model_name(value: str) -> None:
    """INVALID_ARGUMENT naming ``model`` unless ``value`` is printable and at most
    :data:`MODEL_NAME_MAX` characters: before authorization, whose refusal echoes it."""
    if len(value) <= MODEL_NAME_MAX and value.isprintable():
        return
    description = f"must be printable and at most {MODEL_NAME_MAX} characters"
    raise GatewayError(
        status_details.invalid_argument(f"model: {description}", [("model", description)])
    )


def unchecked(value: str, limit: int) -> str:
    """A value no check has bounded yet (the model and request id of a caller refused before
    its request was validated), as an append-only audit record may hold it: at most
    ``limit`` characters, escaped, marked with its real length when cut."""
    if len(value) <= limit and value.isprintable():
        return value
    shown = value[:limit].encode("unicode_escape").decode("ascii")[:limit]
    return f"{shown}...({len(value)} characters)"


@dataclass(frozen=True)
class CallInfo:
    """What a transport knows about one call."""

    request_id: str
    """The gateway's id for the request, minted by the transport for every call: the ledger's
    key, the audit record's ``request_id`` and the id the router sees (its retries dedupe on
    it). Never the client's, which a client may reuse to dodge metering or collide with
    another tenant's."""
    client_request_id: str = ""
    """The id the client sent, if any: stored beside the gateway's for correlation, and put
    back on relayed messages so the client sees the id it chose."""
    metadata: Iterable[tuple[str, str | bytes]] = ()
    """Headers or metadata holding ``authorization: Bearer …`` (only that one is read)."""
    peer: str = ""
    """The caller's address, for the audit record."""
    time_remaining: Callable[[], float | None] = lambda: None
    """Seconds left before the caller's deadline (None: no deadline), asked when forwarding."""
    started: float = field(default_factory=time.monotonic)
    """When the call arrived (monotonic), for the ledger's latency."""


def _limits(defaults: Mapping[str, int], overrides: Mapping[str, float] | None = None) -> Limits:
    merged = {k: int(v) for k, v in defaults.items() if k in LIMIT_FIELDS}
    merged.update({k: int(v) for k, v in (overrides or {}).items() if k in LIMIT_FIELDS})
    return Limits(**merged)


@dataclass
class _Relay:
    """What the relay saw of one stream, for the settle."""

    streamed: int = 0
    prompt_tokens: int | None = None
    """The prompt's size as the router's first message reported it (exact, tokenized)."""
    final: inference_pb2.GenerateResponse | None = None
    outcome: str = "ok"
    refused: bool = False
    """The router refused the request as the caller's mistake (``CALLER_FAULT``): it counts
    as a request for the rate limits though it produced nothing."""


class Pipeline:
    """Authenticate, authorize, admit, forward, settle; see the module docstring."""

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
        self.router = router
        self.authenticator = authenticator
        self.policy = policy
        self.admission = admission
        self.ledger = ledger
        self.audit = audit
        self.settler = Settler(admission, ledger, audit)
        self.cards = ModelCards(router)
        """The served models' context lengths: a reservation never exceeds the context."""
        self._tasks: set[asyncio.Task[None]] = set()  # upstream calls finishing after ours
        self.max_streams = max_streams
        """Generate streams relayed at once; the next is refused (:data:`MAX_STREAMS`)."""
        self.streams = 0
        """Generate streams being relayed now (admitted by :meth:`generate`, not yet ended)."""

    async def authenticate(self, call: CallInfo, model: str = "") -> Identity:
        """The caller; GatewayError(UNAUTHENTICATED), audited as a denial, otherwise."""
        # Unvalidated yet (a caller without a credential sends anything): bounded as the
        # audit record bounds it, not a megabyte on every trace backend.
        attributes = step_attributes(call.request_id, unchecked(model, MODEL_NAME_MAX))
        return await traced("authenticate", self._authenticate(call, model), attributes)

    async def _authenticate(self, call: CallInfo, model: str) -> Identity:
        if self.settler.overloaded:  # before anything that writes a record
            raise GatewayError(
                status_details.unavailable(
                    f"the gateway's usage store is not keeping up ({self.settler.backlog} "
                    "records waiting to be written); retry shortly"
                )
            )
        try:
            who = await self.authenticator.authenticate(call.metadata)
            annotate(identity_attributes(who))
            return who
        except AuthenticationError as exc:
            self._record_audit(
                AuditEvent(
                    principal="anonymous",
                    decision="deny",
                    reason=f"unauthenticated: {exc}",
                    model=unchecked(model, MODEL_NAME_MAX),
                    request_id=call.request_id,
                    source=call.peer,
                    client_request_id=unchecked(call.client_request_id, CLIENT_REQUEST_ID_MAX),
                )
            )
            refused = status_details.refused_credential(exc, isinstance(exc, MissingCredential))
            raise GatewayError(refused) from exc

    async def list_models(self, who: Identity, call: CallInfo) -> inference_pb2.ListModelsResponse:
        """The router's models that ``who`` may use."""
        try:
            remaining = call.time_remaining()  # None over HTTP: no client deadline
            served = await self.router.ListModels(
                inference_pb2.ListModelsRequest(),
                timeout=LIST_MODELS_TIMEOUT_S if remaining is None else remaining,
            )
        except grpc.aio.AioRpcError as exc:
            raise GatewayError.upstream(exc) from exc
        visible = set(self.policy.visible_models(who.caller, [m.id for m in served.models]))
        return inference_pb2.ListModelsResponse(
            models=[m for m in served.models if m.id in visible]
        )

    async def generate(
        self, who: Identity, request: inference_pb2.GenerateRequest, call: CallInfo
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Authorize, reserve, relay the router's stream, settle once (see the module doc).

        Refusals raise GatewayError before the first message; an upstream failure raises
        it after the settle, following whatever messages were relayed. Counted in
        ``streams`` from its first step to its end; refused past ``max_streams``.
        """
        check_model_name(request.model)
        if self.streams >= self.max_streams:
            self._record_audit(self._event(who, "deny", AT_CAPACITY, request.model, call))
            raise GatewayError(
                status_details.unavailable(
                    f"the gateway is relaying its maximum of {self.max_streams} streams; "
                    "retry shortly"
                )
            )
        self.streams += 1
        METRICS.streams.inc()
        try:
            async with aclosing(self._generate(who, request, call)) as stream:
                async for message in stream:
                    yield message
        finally:
            self.streams -= 1
            METRICS.streams.dec()

    async def _generate(
        self, who: Identity, request: inference_pb2.GenerateRequest, call: CallInfo
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        attributes = step_attributes(call.request_id, request.model, who)
        await traced("authorize", self._authorize(who, request.model, call), attributes)
        prompt = prompt_estimate(request)
        max_tokens = request.max_tokens if request.HasField("max_tokens") else DEFAULT_MAX_TOKENS
        estimate = prompt + max(0, max_tokens)
        # The engine stops at the context, so prompt + completion never exceeds it: a
        # reservation beyond it was refused (429) what the router serves or refuses (400).
        context = self.cards.cached(request.model)
        if context:
            estimate = min(estimate, context)
        reservation = await traced(
            "admit",
            self._reserve(who, request.model, call, estimate, prompt),
            {**attributes, "tandem.gateway.tokens_reserved": estimate},
        )
        forwarded = inference_pb2.GenerateRequest()
        forwarded.CopyFrom(request)
        forwarded.request_id = call.request_id
        relay = _Relay()
        error: grpc.aio.AioRpcError | None = None
        stream = self.router.Generate(forwarded, timeout=call.time_remaining())
        try:
            async for message in stream:
                if call.client_request_id:  # the router echoes our id; show the client its own
                    message.request_id = call.client_request_id
                if relay.prompt_tokens is None and message.usage.prompt_tokens:
                    relay.prompt_tokens = message.usage.prompt_tokens
                # Counted when handed to the transport, as the router counts what it hands
                # on: the tokens were produced. A cancel that ends the call before grpc asks
                # for the next message may come after the client read this one (counted
                # after the yield, 3 of 200 streams cancelled right after reading were
                # charged a token less than they read) or cut its write short (charged a
                # token the client never saw): a call's cancel and its last write race, and
                # the gateway cannot tell which won, so it never charges less than was read.
                relay.streamed += len(message.token_ids)
                if message.finish_reason:
                    relay.final = message
                yield message
                if relay.final is not None and not _failed(relay.final):
                    # A finished stream's final message settles the call, and the router
                    # ends it OK: end ours now rather than after the router's own close
                    # (one more hop). A failed one's status follows: relay it.
                    self._background(_finish_upstream(stream, call.request_id))
                    break
        except grpc.aio.AioRpcError as exc:
            error, relay.outcome = exc, "error"
            relay.refused = exc.code() in CALLER_FAULT
        except (asyncio.CancelledError, GeneratorExit):
            relay.outcome = "cancelled"
            stream.cancel()
            raise
        finally:
            # No await: a second cancel cannot cut the settle short, and the call's
            # status does not wait for the ledger (services/gateway/settler.py).
            with sync_step("settle", attributes):
                self._settle(who, request.model, call, reservation, prompt, relay)
        if error is not None:
            raise GatewayError.upstream(error)

    # ---- steps ---------------------------------------------------------------------------

    async def _authorize(self, who: Identity, model: str, call: CallInfo) -> None:
        if self.policy.allows(who.caller, model):
            return
        self._record_audit(self._event(who, "deny", "model not allowed", model, call))
        raise GatewayError(
            status_details.permission_denied(
                f"{who.principal} may not use model {model!r}",
                "MODEL_NOT_ALLOWED",
                metadata={"model": model},
            )
        )

    async def _reserve(
        self, who: Identity, model: str, call: CallInfo, tokens: int, prompt: int
    ) -> Reservation:
        try:
            if not self.admission.blocking:
                return self.admission.reserve(self._scopes(who), tokens)
            reserving = asyncio.ensure_future(
                asyncio.to_thread(self.admission.reserve, self._scopes(who), tokens)
            )
            try:
                return await asyncio.shield(reserving)
            except asyncio.CancelledError:
                # The thread charges the store all the same: settle what it reserves as a
                # call cancelled before its first token, or the charge stays for the window.
                orphan = functools.partial(self._settle_orphan, who, model, call, prompt)
                reserving.add_done_callback(orphan)
                raise
        except LimitExceeded as exc:
            self._audit_refusal(who, model, call, exc)
            raise GatewayError(status_details.limit_exceeded(exc)) from exc
        except TandemError as exc:  # e.g. the limit store is down and fail-closed
            self._audit_refusal(who, model, call, exc)
            raise GatewayError(status_details.from_error(exc)) from exc

    def _audit_refusal(
        self, who: Identity, model: str, call: CallInfo, exc: TandemError, cancelled: bool = False
    ) -> None:
        """The deny record of an admission that refused (``exc``); ``cancelled``: its client
        had stopped waiting for the answer."""
        kind = "limit exceeded" if isinstance(exc, LimitExceeded) else "admission failed"
        reason = f"{kind}: {exc}" + (" (the client had cancelled)" if cancelled else "")
        self._record_audit(self._event(who, "deny", reason, model, call))

    def token_ceiling(self, who: Identity) -> int | None:
        """The most tokens one request of ``who`` could ever be admitted with (the smallest
        token limit over its scopes); None when no token limit applies."""
        ceilings = [
            limit
            for scope in self._scopes(who)
            for limit in (
                scope.limits.tokens_per_minute,
                scope.limits.tokens_per_day,
                scope.limits.tokens_per_month,
            )
            if limit is not None
        ]
        return min(ceilings, default=None)

    def _scopes(self, who: Identity) -> list[Scope]:
        limits = self.policy.limits
        scopes = []
        if who.key_id is not None:
            key_limits = _limits(limits.get("key", {}), who.key_limits)
            scopes.append(Scope(f"key:{who.key_id}", key_limits))
        else:
            scopes.append(Scope(f"user:{who.principal}", _limits(limits.get("user", {}))))
        if who.team:
            scopes.append(Scope(f"team:{who.team}", _limits(limits.get("team", {}))))
        return scopes

    def _settle(
        self,
        who: Identity,
        model: str,
        call: CallInfo,
        reservation: Reservation,
        prompt: int,
        relay: _Relay,
    ) -> None:
        """Give admission the real count and queue the ledger row and audit record."""
        prompt_tokens, completion, cached, outcome, reason = _counts(prompt, relay)
        annotate(usage_attributes(prompt_tokens, completion, cached, outcome))
        record = UsageRecord(
            request_id=call.request_id,
            principal=who.principal,
            team=who.team or "-",
            model=model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            cached_tokens=cached,
            latency_ms=(time.monotonic() - call.started) * 1000,
            outcome=outcome,
            key_id=who.key_id,
            client_request_id=call.client_request_id,
        )
        event = dataclasses.replace(
            self._event(who, "allow", reason, model, call),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
        )
        if self.admission.blocking:  # a network round trip: on the settler's thread
            self.settler.submit(Settle(event, record, reservation, counted=relay.refused))
        else:
            settle_admission(self.admission, reservation, record, relay.refused)
            self.settler.submit(Settle(event, record))

    def _settle_orphan(
        self, who: Identity, model: str, call: CallInfo, prompt: int, reserving: asyncio.Future
    ) -> None:
        """Settle a reservation its cancelled call stopped waiting for; a reserve that
        refused or failed charged nothing, but its decision is audited all the same."""
        if reserving.cancelled():
            return
        exc = reserving.exception()
        if isinstance(exc, TandemError):
            self._audit_refusal(who, model, call, exc, cancelled=True)
        elif exc is None:
            self._settle(who, model, call, reserving.result(), prompt, _Relay(outcome="cancelled"))
        else:  # a bug in the store's code: the awaited path would have raised it
            rid = call.request_id
            log.error("admission of %s failed after its call was cancelled: %r", rid, exc)

    async def settled(self) -> None:
        """Wait until every call settled so far is in the ledger and the audit log."""
        await self.settler.flush()

    async def close(self) -> None:
        """Write the settles still queued; call once the servers have stopped."""
        for task in list(self._tasks):
            task.cancel()
        await self.cards.close()
        await asyncio.to_thread(self.settler.close)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- records -------------------------------------------------------------------------

    def _record_audit(self, event: AuditEvent) -> None:
        """Queue a refusal's audit record, in order with the settles before it."""
        self.settler.submit(Settle(event))

    def _event(
        self, who: Identity, decision: str, reason: str, model: str, call: CallInfo
    ) -> AuditEvent:
        return AuditEvent(
            principal=who.principal,
            decision=decision,
            reason=reason,
            team=who.team,
            model=model,
            request_id=call.request_id,
            client=who.client,
            source=call.peer,
            client_request_id=call.client_request_id,
        )


def _counts(prompt: int, relay: _Relay) -> tuple[int, int, int, str, str]:
    """(prompt tokens, completion tokens, cached tokens, outcome, audit reason) to settle."""
    outcome, final = relay.outcome, relay.final
    if final is not None and final.HasField("usage"):
        prompt_tokens = final.usage.prompt_tokens
        cached = min(final.usage.cached_tokens, prompt_tokens)
        name = inference_pb2.FinishReason.Name(final.finish_reason)
        if final.finish_reason == inference_pb2.FINISH_REASON_CANCELLED:
            outcome = "cancelled"
        elif final.finish_reason == inference_pb2.FINISH_REASON_ERROR:
            outcome = "error"
        reason = "ok" if outcome == "ok" else f"{outcome} ({name})"
        return prompt_tokens, final.usage.completion_tokens, cached, outcome, reason
    # No final message: the prompt was processed if any token came back; its size is
    # what the router reported on its first message (the estimate only as a fallback).
    prompt_tokens = (relay.prompt_tokens or prompt) if relay.streamed else 0
    if outcome == "ok":  # the stream ended without a final message
        outcome = "error"
    return prompt_tokens, relay.streamed, 0, outcome, outcome


def _failed(final: inference_pb2.GenerateResponse) -> bool:
    return final.finish_reason == inference_pb2.FINISH_REASON_ERROR


async def _finish_upstream(stream: grpc.aio.UnaryStreamCall, request_id: str) -> None:
    """Let the router's call end after ours did (it follows its final message with OK)."""
    try:
        async for extra in stream:
            log.warning("request %s: the router sent a message after its final one", request_id)
            del extra
    except grpc.aio.AioRpcError as exc:
        log.warning(
            "request %s: the router ended with %s after its final message (settled as sent)",
            request_id,
            exc.code().name,
        )
    except asyncio.CancelledError:
        stream.cancel()
