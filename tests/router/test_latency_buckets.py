"""The router's latency histograms resolve what Tandem's own clients wait for (300 s)."""

from __future__ import annotations

from services.router.metrics import RouterMetrics


def test_a_200_second_request_lands_in_a_finite_bucket() -> None:
    """The buckets stopped at 60 s: anything longer was +Inf, a p99 of 'at least 60'."""
    metrics = RouterMetrics()
    metrics.ttft.observe(200.0)
    sample = metrics.registry.get_sample_value
    assert sample("tandem_ttft_seconds_bucket", {"le": "60.0"}) == 0
    assert sample("tandem_ttft_seconds_bucket", {"le": "300.0"}) == 1
