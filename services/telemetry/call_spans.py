"""Client spans for unary and server-streaming gRPC calls that end when the call ends.

opentelemetry-instrumentation-grpc's client interceptors end their spans too late or never:
- server-streaming: the span ends when the caller's iteration of a wrapping async generator
  ends. The router reads a Decode stream up to its final message and then cancels the call
  without iterating further, so the suspended generator, and the span, lived on until the
  garbage collector finalized it: seconds after its parent (the router's Generate span).
- unary: the span ends in a done callback attached only after ``await call.code()``; a call
  cancelled meanwhile (the router's Prefill when its client cancels or its deadline passes,
  a ReleaseKV cut at shutdown) never gets it, and its span is never ended or exported: the
  prefill worker's server span was left without a parent in the trace.
Here the call itself is returned, with a done callback ending the span with its status.
Only public APIs (grpc.aio's interceptor interface, OpenTelemetry's propagator and tracer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.trace import SpanKind, Status, StatusCode

NOT_ERRORS = (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED)
"""A stream the caller cancelled after reading what it wanted did not fail."""


class _CallSpans:
    """One CLIENT span per call ``traced(details)`` accepts, carrying the W3C trace context
    in the call's metadata and ending when the call is done."""

    def __init__(self, tracer: trace.Tracer, traced: Callable[[Any], bool]) -> None:
        self._tracer = tracer
        self._traced = traced
        self._ending: set[asyncio.Task[None]] = set()  # held until they finish

    async def _intercept(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        if not self._traced(details):
            return await continuation(details, request)
        method = _method(details)
        service, _, name = method.lstrip("/").partition("/")
        span = self._tracer.start_span(
            method,
            kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        try:
            call = await continuation(_with_context(details, span), request)
        except BaseException as exc:  # a cancellation too: the span must end
            _end(span, _code_of(exc))
            raise
        call.add_done_callback(self._on_done(span))
        return call

    def _on_done(self, span: trace.Span) -> Callable[[Any], None]:
        def done(call: Any) -> None:
            # grpc.aio's code() is a coroutine even on a finished call: read it in a task.
            async def end() -> None:
                try:
                    code = await call.code()
                except Exception:  # the span must end whatever happened
                    code = None
                _end(span, code)

            task = asyncio.ensure_future(end())
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

        return done


class UnarySpans(_CallSpans, grpc.aio.UnaryUnaryClientInterceptor):
    """Spans for unary calls (Prefill, ReleaseKV, Handshake, ...)."""

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await self._intercept(continuation, details, request)


class StreamSpans(_CallSpans, grpc.aio.UnaryStreamClientInterceptor):
    """Spans for server-streaming calls (Generate, Decode, ...)."""

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await self._intercept(continuation, details, request)


def _method(details: Any) -> str:
    method = details.method  # bytes on grpc.aio clients: grpc/grpc#31092
    return method.decode() if isinstance(method, bytes) else str(method)


def _with_context(details: Any, span: trace.Span) -> Any:
    """``details`` with the trace context of ``span`` added to its metadata."""
    carrier: dict[str, str] = {}
    inject(carrier, context=trace.set_span_in_context(span))
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *carrier.items())
    return details._replace(metadata=metadata)


def _code_of(exc: BaseException) -> grpc.StatusCode | None:
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return exc.code() if isinstance(exc, grpc.RpcError) else None  # type: ignore[attr-defined]


def _end(span: trace.Span, code: grpc.StatusCode | None) -> None:
    if code is not None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code not in NOT_ERRORS:
            span.set_status(Status(StatusCode.ERROR, code.name))
    else:
        span.set_status(Status(StatusCode.ERROR, "the call failed without a status"))
    span.end()
