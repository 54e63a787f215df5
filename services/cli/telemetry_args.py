"""The --trace-exporter flag every service takes, and turning it into configuration."""

from __future__ import annotations

import argparse

from services.telemetry.tracing import EXPORTERS


def add_tracing_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace-exporter",
        choices=EXPORTERS,
        default="none",
        help="OpenTelemetry trace export: none (default, tracing off), console (spans as "
        "JSON on stdout), otlp (OTEL_EXPORTER_OTLP_* variables; needs "
        "opentelemetry-exporter-otlp). Trace context crosses every gRPC hop.",
    )


def configure(args: argparse.Namespace, service_name: str, instance_id: str | None = None) -> None:
    from services.telemetry.tracing import configure_tracing

    configure_tracing(service_name, args.trace_exporter, instance_id)
