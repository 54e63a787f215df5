"""The latency CDFs of `tandem bench serve --plot`."""

from __future__ import annotations

import pytest

from services.bench.serve_metrics import summarize
from services.bench.serve_plots import _cdf


@pytest.mark.parametrize("values", [[12.0], [3.0, 1.0, 2.0]])
def test_the_curve_rises_from_zero_at_the_smallest_value(values: list[float]) -> None:
    """A step plot from (x1, 1/n) never drew the first rise, so one request drew no curve."""
    import matplotlib

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    try:
        _cdf(ax, values, summarize([v / 1000 for v in values]), "ms", "requests", None)
        (curve,) = [line for line in ax.get_lines() if line.get_label().endswith("requests")]
        xs, ys = curve.get_data()
        n = len(values)
        assert list(xs) == [min(values), *sorted(values)]
        assert list(ys) == [0.0, *(i / n for i in range(1, n + 1))]
        assert curve.get_label() == f"{n} requests"
    finally:
        plt.close(fig)
