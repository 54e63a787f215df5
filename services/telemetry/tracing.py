"""OpenTelemetry tracing: off by default, one flag to turn on, context across every hop.

``configure_tracing`` is called once per process by the service's command
(``--trace-exporter``). When it is off, no interceptor is installed and spans
cost nothing (the API's no-op tracer). When it is on, every gRPC server and
client is wrapped by opentelemetry-instrumentation-grpc, which starts a span
per call and carries the W3C trace context in gRPC metadata, so the gateway →
router → prefill → decode hops of one request share one trace.

Exporters: ``console`` (spans as JSON on stdout; needs nothing else) and
``otlp`` (the standard OTLP exporter, configured by the usual
OTEL_EXPORTER_OTLP_* variables; needs opentelemetry-exporter-otlp installed).
Prompt text is never put on a span.

Calls that belong to no request are not traced: health checks, the workers' heartbeats
(one a second from every worker) and their long-lived KV event streams
(:data:`UNTRACED_METHODS`). Traced, each would be a trace of its own, a
few spans a second per worker drowning the requests' traces (and the console exporter's
output) in noise.
"""

from __future__ import annotations

import uuid
from typing import Any

from opentelemetry import trace

EXPORTERS = ("none", "console", "otlp")

_enabled = False

UNTRACED_METHODS = (
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/tandem.v1.Registry/Heartbeat",
    "/tandem.v1.Registry/PublishKVEvents",
)
"""Full gRPC method names that get no span, on the server and the client side."""


def _method_of(details: Any) -> str:
    """The full method name of a server's HandlerCallDetails or a client's call details
    (bytes on grpc.aio clients: https://github.com/grpc/grpc/issues/31092)."""
    method = getattr(details, "method", "")
    return method.decode() if isinstance(method, bytes) else str(method)


def _traced(details: Any) -> bool:
    """The interceptors' filter: False for calls in UNTRACED_METHODS."""
    return _method_of(details) not in UNTRACED_METHODS


def tracing_resource(service_name: str, instance_id: str | None = None) -> Any:
    """The OpenTelemetry resource every span of this process carries.

    ``service.instance.id`` tells apart the replicas of one service (two prefill workers
    share ``tandem-prefill``): ``instance_id`` (a worker's id) or a fresh uuid4, unless
    the operator set one in ``OTEL_RESOURCE_ATTRIBUTES``, which wins.
    """
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    attributes = {"service.name": service_name}
    if "service.instance.id" not in OTELResourceDetector().detect().attributes:
        attributes["service.instance.id"] = instance_id or uuid.uuid4().hex
    return Resource.create(attributes)


def configure_tracing(
    service_name: str, exporter: str = "none", instance_id: str | None = None
) -> None:
    """Install a tracer provider exporting to ``exporter``; "none" leaves tracing off.
    ``instance_id`` names this replica on its spans (:func:`tracing_resource`)."""
    global _enabled
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown trace exporter {exporter!r}; choose one of {EXPORTERS}")
    if exporter == "none":
        return
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=tracing_resource(service_name, instance_id))
    if exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as e:
            raise ValueError(
                "--trace-exporter otlp needs the opentelemetry-exporter-otlp package"
            ) from e
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _enabled = True


def tracing_enabled() -> bool:
    return _enabled


def server_interceptors() -> list[Any]:
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(filter_=_traced)]


def client_interceptors() -> list[Any]:
    if not _enabled:
        return []
    import grpc
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    from services.telemetry.call_spans import StreamSpans, UnarySpans

    # The stock unary and server-streaming interceptors end their spans late or never
    # (services/telemetry/call_spans.py says when): ours.
    name = "opentelemetry.instrumentation.grpc"
    ours = {
        grpc.aio.UnaryUnaryClientInterceptor: UnarySpans(tracer(name), _traced),
        grpc.aio.UnaryStreamClientInterceptor: StreamSpans(tracer(name), _traced),
    }
    return [
        next((o for kind, o in ours.items() if isinstance(i, kind)), i)
        for i in aio_client_interceptors(filter_=_traced)
    ]


def tracer(name: str) -> trace.Tracer:
    """A tracer for manual spans inside a service (no-op while tracing is off)."""
    return trace.get_tracer(name)


def shutdown_tracing() -> None:
    """Flush spans still buffered (call before the process exits)."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()
