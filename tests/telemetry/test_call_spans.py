"""Client spans end when their call ends, whichever way it ends: answered, failed, or
cancelled by the caller (the router cancels Prefill when its client goes away; the stock
unary interceptor never ended that span, and the prefill worker's span lost its parent)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from services.telemetry.call_spans import StreamSpans, UnarySpans

SERVICE = "demo.Svc"


async def _slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"fail":
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    await asyncio.sleep(0 if request == b"quick" else 10)
    return b"ok"


async def _slow_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    await asyncio.sleep(10)
    yield b"ok"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


def _interceptors(exporter: InMemorySpanExporter) -> list[object]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    return [UnarySpans(tracer, lambda d: True), StreamSpans(tracer, lambda d: True)]


async def _with_channel(exporter: InMemorySpanExporter, body) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Slow": grpc.unary_unary_rpc_method_handler(_slow),
                    "SlowStream": grpc.unary_stream_rpc_method_handler(_slow_stream),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=_interceptors(exporter))
    try:
        await body(channel)
        for _ in range(100):  # the spans end in done callbacks' tasks
            await asyncio.sleep(0.01)
    finally:
        await channel.close()
        await server.stop(0)


def _ended(exporter: InMemorySpanExporter) -> dict[str, tuple[StatusCode, object]]:
    return {
        s.name: (s.status.status_code, s.attributes.get("rpc.grpc.status_code"))
        for s in exporter.get_finished_spans()
    }


@pytest.mark.parametrize("kind", ["Slow", "SlowStream"])
def test_a_cancelled_call_ends_its_span(exporter: InMemorySpanExporter, kind: str) -> None:
    async def body(channel: grpc.aio.Channel) -> None:
        make = channel.unary_unary if kind == "Slow" else channel.unary_stream
        call = make(f"/{SERVICE}/{kind}")(b"", timeout=30)
        await asyncio.sleep(0.2)
        call.cancel()

    asyncio.run(_with_channel(exporter, body))
    # CANCELLED is the caller's own choice, not an error
    assert _ended(exporter) == {f"/{SERVICE}/{kind}": (StatusCode.UNSET, 1)}


def test_unary_spans_carry_the_calls_status(exporter: InMemorySpanExporter) -> None:
    async def body(channel: grpc.aio.Channel) -> None:
        assert await channel.unary_unary(f"/{SERVICE}/Slow")(b"quick", timeout=5) == b"ok"
        with pytest.raises(grpc.aio.AioRpcError):
            await channel.unary_unary(f"/{SERVICE}/Slow")(b"fail", timeout=5)

    asyncio.run(_with_channel(exporter, body))
    statuses = sorted(
        (s.status.status_code.name, s.attributes["rpc.grpc.status_code"])
        for s in exporter.get_finished_spans()
    )
    assert statuses == [("ERROR", 5), ("UNSET", 0)]
