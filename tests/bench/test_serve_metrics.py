"""Serving metrics on hand-made records, with answers worked out by hand.

Times are binary fractions so every figure is exact in floating point.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from services.bench.serve_metrics import (
    LOCAL_PREFILL,
    LatencySummary,
    RequestRecord,
    compute_metrics,
    meets_slos,
    summarize,
)
from services.stubs.tandem.v1 import inference_pb2 as pb


def _record(
    index: int,
    scheduled: float,
    sent: float,
    token_times: tuple[float, ...],
    end: float,
    *,
    counts: tuple[int, ...] | None = None,
    status: str = "OK",
    usage: tuple[int, int, int] | None = None,
    serving: tuple[str, str] | None = None,
) -> RequestRecord:
    return RequestRecord(
        index=index,
        request_id=f"bench-{index}",
        prompt_len=4,
        scheduled_s=scheduled,
        sent_s=sent,
        token_times_s=token_times,
        token_counts=counts or (1,) * len(token_times),
        end_s=end,
        status=status,
        finish_reason="length" if status == "OK" else None,
        usage=pb.Usage(prompt_tokens=usage[0], completion_tokens=usage[1], cached_tokens=usage[2])
        if usage
        else None,
        serving=pb.ServingInfo(prefill_worker=serving[0], decode_worker=serving[1])
        if serving
        else None,
    )


# r0: TTFT 250 ms, E2E 1000, TPOT (1000 - 250) / 2 = 375, ITL 250, 250; prefilled locally.
# r1: sent 125 ms late: TTFT 375 (from the send, not the schedule), E2E 875, TPOT 250,
#     ITL 125; its send delay is 125.
# r2: one token: TTFT 500, E2E 1000, no TPOT, no ITL; no serving info.
# r3, r4: failed. The run spans 0 → 2.5 s.
RECORDS = [
    _record(0, 0.0, 0.0, (0.25, 0.5, 0.75), 1.0, usage=(4, 3, 2), serving=("", "decode-a")),
    _record(
        1, 0.5, 0.625, (1.0, 1.125), 1.5, counts=(1, 2), usage=(4, 3, 0), serving=("p", "decode-b")
    ),
    _record(2, 1.0, 1.0, (1.5,), 2.0, usage=(4, 1, 0)),
    _record(3, 1.5, 1.5, (), 1.75, status="UNAVAILABLE"),
    _record(4, 2.0, 2.0, (), 2.5, status="RESOURCE_EXHAUSTED"),
]


def _figures(summary: LatencySummary | None) -> object:
    """(count, mean, p50, p90, p99), compared to within float rounding."""
    assert summary is not None
    return pytest.approx(dataclasses.astuple(summary), rel=1e-12)


def test_per_request_latencies() -> None:
    r0, r1, r2, r3, _ = RECORDS
    assert (r0.ttft_s, r0.e2e_s, r0.tpot_s, r0.itls_s) == (0.25, 1.0, 0.375, [0.25, 0.25])
    assert (r1.ttft_s, r1.e2e_s, r1.tpot_s, r1.itls_s) == (0.375, 0.875, 0.25, [0.125])
    assert (r2.ttft_s, r2.tpot_s, r2.itls_s) == (0.5, None, [])
    assert r3.ttft_s is None and not r3.ok


def test_token_counts_come_from_usage_else_from_what_was_sent_and_received() -> None:
    assert RECORDS[1].output_tokens == 3
    without_usage = _record(9, 0.0, 0.0, (0.5, 1.0), 1.0, counts=(2, 3))
    assert without_usage.output_tokens == 5
    assert (RECORDS[0].prompt_tokens, without_usage.prompt_tokens) == (4, 4)  # usage; sent
    assert compute_metrics([without_usage], 1.0).prompt_tokens == 4
    assert without_usage.tpot_s == 0.5 / 4


def test_summarize_interpolates_percentiles_linearly() -> None:
    assert _figures(summarize([1.0, 2.0, 3.0, 4.0])) == (4, 2500.0, 2500.0, 3700.0, 3970.0)
    assert summarize([0.5]) == LatencySummary(1, 500.0, 500.0, 500.0, 500.0)
    assert summarize([]) is None


def test_run_metrics() -> None:
    m = compute_metrics(RECORDS, requested_rate=2.0)
    assert (m.num_requests, m.completed) == (5, 3)
    assert m.failures == {"RESOURCE_EXHAUSTED": 1, "UNAVAILABLE": 1}
    assert m.duration_s == 2.5
    assert (m.prompt_tokens, m.output_tokens) == (12, 7)
    assert m.request_throughput == pytest.approx(3 / 2.5)
    assert m.output_token_throughput == pytest.approx(7 / 2.5)
    assert m.total_token_throughput == pytest.approx(19 / 2.5)
    assert (m.requested_rate, m.achieved_rate) == (2.0, 4 / 2.0)
    assert _figures(m.ttft) == (3, 375.0, 375.0, 475.0, 497.5)
    assert _figures(m.tpot) == (2, 312.5, 312.5, 362.5, 373.75)
    assert _figures(m.itl) == (3, 625 / 3, 250.0, 250.0, 250.0)
    assert _figures(m.e2e) == (3, 2875 / 3, 1000.0, 1000.0, 1000.0)
    # Send delay: only r1 waited (125 ms): [0, 125, 0, 0, 0].
    assert _figures(m.send_delay) == (5, 25.0, 0.0, 75.0, 120.0)
    assert m.decode_workers == {"decode-a": 1, "decode-b": 1}
    assert m.prefill_workers == {LOCAL_PREFILL: 1, "p": 1}
    assert (m.cached_tokens, m.cache_hit_rate) == (2, 2 / 12)
    assert m.goodput is None


@pytest.mark.parametrize(
    ("slos", "met"),
    [
        ({"ttft_ms": 300}, [0]),
        ({"ttft_ms": 400}, [0, 1]),
        ({"ttft_ms": 500}, [0, 1, 2]),
        # r0's TPOT (375) misses; r2 has no TPOT, so meets it.
        ({"ttft_ms": 600, "tpot_ms": 300}, [1, 2]),
        ({"e2e_ms": 1000}, [0, 1, 2]),
        ({"e2e_ms": 999}, [1]),
        ({"e2e_ms": 874}, []),
    ],
)
def test_goodput_counts_ok_requests_within_every_slo(
    slos: dict[str, float], met: list[int]
) -> None:
    assert [r.index for r in RECORDS if meets_slos(r, slos)] == met
    goodput = compute_metrics(RECORDS, 2.0, slos).goodput
    assert goodput is not None
    assert goodput.met == len(met)
    assert goodput.requests_per_s == len(met) / 2.5
    assert goodput.attainment == len(met) / 5


def test_unknown_slo_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown SLO 'itl_ms'"):
        meets_slos(RECORDS[0], {"itl_ms": 1.0})


def test_achieved_rate_needs_two_sends() -> None:
    one = compute_metrics(RECORDS[:1], math.inf)
    assert one.achieved_rate is None
    assert one.cache_hit_rate == 0.5


def test_no_records_is_an_error() -> None:
    with pytest.raises(ValueError, match="nothing was sent"):
        compute_metrics([], 1.0)
