"""Spans for the gateway's policy chain: authenticate, authorize, admit, settle.

Each step of :class:`services.gateway.pipeline.Pipeline` runs inside a ``gateway.<step>``
span, a child of the call's span (the gRPC server span, or none for HTTP), so a trace shows
where the gateway's own time goes next to the router hop it forwards to. Attributes carry
only what is safe to ship to a trace backend: the model, the team, the kind of credential
(never the credential), the request id, the decision and token counts. Never prompt text,
token ids, keys or tokens.

With tracing off (the default), the steps run without any span: the policy chain sits on
every request's path, and the no-op tracer would still cost a context switch per step.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Span, StatusCode

from services.gateway.auth import Identity
from services.telemetry.tracing import tracer, tracing_enabled

T = TypeVar("T")
Attribute = str | int | float | bool

_tracer = tracer("services.gateway")

DECISION = "tandem.gateway.decision"
"""allow, or deny when the step refused the request (cancelled when it was cut short)."""


@contextmanager
def policy_step(step: str, attributes: Mapping[str, Attribute] | None = None) -> Iterator[Span]:
    """A ``gateway.<step>`` span; its decision is deny when an exception leaves the step."""
    # record_exception off: a refusal is the expected outcome of a policy step, not a
    # fault, and the span needs its decision, not a stack trace.
    with _tracer.start_as_current_span(
        f"gateway.{step}",
        attributes=dict(attributes or {}),
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except Exception as exc:
            span.set_attribute(DECISION, "deny")
            span.set_status(StatusCode.ERROR, type(exc).__name__)
            raise
        except BaseException:  # asyncio.CancelledError, GeneratorExit
            span.set_attribute(DECISION, "cancelled")
            raise
        span.set_attribute(DECISION, "allow")


async def traced(
    step: str, work: Awaitable[T], attributes: Mapping[str, Attribute] | None = None
) -> T:
    """Await ``work`` inside :func:`policy_step` (directly when tracing is off)."""
    if not tracing_enabled():
        return await work
    with policy_step(step, attributes):
        return await work


@contextmanager
def sync_step(step: str, attributes: Mapping[str, Attribute] | None = None) -> Iterator[None]:
    """:func:`traced` for a step that does not await (the settle)."""
    if not tracing_enabled():
        yield
        return
    with policy_step(step, attributes):
        yield


def annotate(attributes: Mapping[str, Attribute]) -> None:
    """Add attributes to the current step's span (a no-op when tracing is off)."""
    if tracing_enabled():
        trace.get_current_span().set_attributes(dict(attributes))


def step_attributes(
    request_id: str, model: str = "", who: Identity | None = None
) -> dict[str, Attribute]:
    """The attributes every step carries: request id, model, team, credential kind."""
    attributes: dict[str, Attribute] = {"tandem.request_id": request_id}
    if model:
        attributes["tandem.model"] = model
    if who is not None:
        attributes.update(identity_attributes(who))
    return attributes


def identity_attributes(who: Identity) -> dict[str, Attribute]:
    """Team and credential kind: nothing that identifies or authenticates the caller."""
    credential = "api_key" if who.key_id is not None else "oidc"
    return {"tandem.team": who.team or "-", "tandem.gateway.credential": credential}


def usage_attributes(
    prompt: int, completion: int, cached: int, outcome: str
) -> dict[str, Attribute]:
    """What the settle charged, as span attributes."""
    return {
        "tandem.usage.prompt_tokens": prompt,
        "tandem.usage.completion_tokens": completion,
        "tandem.usage.cached_tokens": cached,
        "tandem.gateway.outcome": outcome,
    }


def http_middlewares() -> list[Any]:
    """aiohttp middleware giving each OpenAI HTTP API request a server span (none while
    tracing is off): the policy steps and the router call become its children, and a
    ``traceparent`` header from the client continues the client's trace."""
    if not tracing_enabled():
        return []
    from aiohttp import web
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    @web.middleware
    async def http_span(request: web.Request, handler: Any) -> web.StreamResponse:
        # The route's template, not the path: no ids or model names from the URL, and
        # never the query string or the body.
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        with _tracer.start_as_current_span(
            f"{request.method} {route}",
            context=extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "http.route": route},
        ) as span:
            response = await handler(request)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(StatusCode.ERROR)
            return response

    return [http_span]
