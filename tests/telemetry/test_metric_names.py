"""Every service's metric names are its own: Prometheus keeps them apart only by the job
label, and a query across jobs (a dashboard's histogram_quantile) mixed the router's
client-side inter-token latency with the workers' (other buckets, another meaning)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from services.gateway.metrics import GatewayMetrics
from services.router.metrics import RouterMetrics
from services.worker.metrics import WorkerMetrics


def _names(registry: CollectorRegistry) -> set[str]:
    return {family.name for family in registry.collect()}


def test_no_metric_name_is_shared_between_router_workers_and_gateway() -> None:
    router = _names(RouterMetrics().registry)
    worker = _names(WorkerMetrics("decode").registry)
    gateway = _names(GatewayMetrics().registry)
    assert router & worker == set()
    assert router & gateway == set() and worker & gateway == set()
