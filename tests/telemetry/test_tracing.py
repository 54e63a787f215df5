"""The resource spans carry: which service, and which replica of it."""

from __future__ import annotations

import pytest

from services.telemetry.tracing import tracing_resource


def test_a_worker_is_named_by_its_id() -> None:
    attributes = tracing_resource("tandem-prefill", "prefill-1").attributes
    assert attributes["service.name"] == "tandem-prefill"
    assert attributes["service.instance.id"] == "prefill-1"


def test_replicas_without_an_id_get_different_ones() -> None:
    first = tracing_resource("tandem-router").attributes["service.instance.id"]
    second = tracing_resource("tandem-router").attributes["service.instance.id"]
    assert len(first) == 32 and first != second


def test_the_operators_instance_id_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=pod-7,region=eu")
    attributes = tracing_resource("tandem-decode", "decode-0").attributes
    assert attributes["service.instance.id"] == "pod-7"
    assert attributes["region"] == "eu"
    assert attributes["service.name"] == "tandem-decode"
