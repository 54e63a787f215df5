"""Client spans for server-streaming gRPC calls that end when the call ends.

opentelemetry-instrumentation-grpc's streaming client interceptor wraps the call in an
async generator and ends the span when the caller's iteration of it ends. The router reads
a Decode stream up to its final message and then cancels the call without iterating
further, so the suspended generator, and the span, lived on until the garbage collector
finalized it: seconds after its parent (the router's Generate span) in a trace viewer.
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


class StreamSpans(grpc.aio.UnaryStreamClientInterceptor):
    """One CLIENT span per server-streaming call ``traced(details)`` accepts, carrying the
    W3C trace context in the call's metadata and ending when the call is done."""

    def __init__(self, tracer: trace.Tracer, traced: Callable[[Any], bool]) -> None:
        self._tracer = tracer
        self._traced = traced
        self._ending: set[asyncio.Task[None]] = set()  # held until they finish

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
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
        except Exception as exc:
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


def _method(details: Any) -> str:
    method = details.method  # bytes on grpc.aio clients: grpc/grpc#31092
    return method.decode() if isinstance(method, bytes) else str(method)


def _with_context(details: Any, span: trace.Span) -> Any:
    """``details`` with the trace context of ``span`` added to its metadata."""
    carrier: dict[str, str] = {}
    inject(carrier, context=trace.set_span_in_context(span))
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *carrier.items())
    return details._replace(metadata=metadata)


def _code_of(exc: Exception) -> grpc.StatusCode | None:
    return exc.code() if isinstance(exc, grpc.RpcError) else None  # type: ignore[attr-defined]


def _end(span: trace.Span, code: grpc.StatusCode | None) -> None:
    if code is not None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code not in NOT_ERRORS:
            span.set_status(Status(StatusCode.ERROR, code.name))
    else:
        span.set_status(Status(StatusCode.ERROR, "the call failed without a status"))
    span.end()
