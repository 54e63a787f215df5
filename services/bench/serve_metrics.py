"""Serving metrics from per-request records, as the field defines them; pure functions.

Every latency starts when the RPC left the client, as the field measures it (vLLM's
``benchmark_serving`` starts its timer inside the request, after any wait for a
--max-concurrency slot): a cap then measures the server at that concurrency, not the
client's own queue. That queue does not vanish: ``send_delay`` (sent − scheduled) reports
it, so a client that fell behind its schedule shows (coordinated omission). Definitions:

  TTFT  first token-bearing message − send.
  E2E   last message − send.
  TPOT  (E2E − TTFT) / (output tokens − 1), per request, then summarised; requests
        with a single output token have none.
  ITL   every gap between consecutive token-bearing messages, pooled over requests.

Latency figures cover the requests that ended OK; the others are counted by status.
Token counts are the server's (``Usage``), not the client's. Goodput is the number of
OK requests meeting every SLO, divided by the run's duration (DistServe).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from services.stubs.tandem.v1 import inference_pb2

OK = "OK"
"""RequestRecord.status of a request whose RPC ended OK with a final message."""
INCOMPLETE_STREAM = "INCOMPLETE_STREAM"
"""RequestRecord.status of an RPC that ended OK without a final message (a server bug)."""
SLO_METRICS = ("ttft_ms", "tpot_ms", "e2e_ms")
"""The latencies goodput can put a limit on, in milliseconds."""
PERCENTILES = (50, 90, 99)
LOCAL_PREFILL = "(local)"
"""Prefill worker of a request its decode worker prefilled itself (empty prefill_worker)."""


@dataclass(frozen=True)
class RequestRecord:
    """Everything the client saw of one request. Times are seconds since the run started."""

    index: int
    """Position in the workload (and the schedule)."""
    request_id: str
    prompt_len: int
    """Prompt tokens sent."""
    scheduled_s: float
    """When the schedule said to send it."""
    sent_s: float | None
    """When the RPC was issued, after any wait for a concurrency slot (None: never sent):
    where every latency starts."""
    token_times_s: tuple[float, ...]
    """Arrival of each message that carried tokens, in order."""
    token_counts: tuple[int, ...]
    """Tokens in each of those messages."""
    end_s: float
    """Arrival of the last message, or of the error status."""
    status: str
    """OK, INCOMPLETE_STREAM, or the gRPC status code's name (e.g. "UNAVAILABLE")."""
    error: str = ""
    """The status details of a failed request."""
    finish_reason: str | None = None
    """"length", "stop", ... from the final message (None when there was none)."""
    usage: inference_pb2.Usage | None = None
    """The server's token accounting, from the final message."""
    serving: inference_pb2.ServingInfo | None = None
    """Which workers served it, from the final message."""

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens: the server's count when it sent one, else the tokens sent."""
        return self.usage.prompt_tokens if self.usage else self.prompt_len

    @property
    def output_tokens(self) -> int:
        """Tokens generated: the server's count when it sent one, else the tokens received."""
        return self.usage.completion_tokens if self.usage else sum(self.token_counts)

    @property
    def started_s(self) -> float:
        """Where latencies start: the send (the schedule for one never sent)."""
        return self.scheduled_s if self.sent_s is None else self.sent_s

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.started_s if self.token_times_s else None

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.started_s

    @property
    def tpot_s(self) -> float | None:
        ttft = self.ttft_s
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - ttft) / (self.output_tokens - 1)

    @property
    def itls_s(self) -> list[float]:
        times = self.token_times_s
        return [later - earlier for earlier, later in itertools.pairwise(times)]


@dataclass(frozen=True)
class LatencySummary:
    """Mean and percentiles of one latency, in milliseconds (linear interpolation)."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float


@dataclass(frozen=True)
class Goodput:
    slos_ms: dict[str, float]
    """The limits every counted request met, e.g. {"ttft_ms": 500.0, "tpot_ms": 50.0}."""
    met: int
    """OK requests within every limit."""
    requests_per_s: float
    """``met`` ÷ the run's duration."""
    attainment: float
    """``met`` ÷ all requests, failed ones included."""


@dataclass(frozen=True)
class ServeMetrics:
    num_requests: int
    completed: int
    """Requests that ended OK."""
    failures: dict[str, int]
    """Failed requests by status, e.g. {"UNAVAILABLE": 2}."""
    duration_s: float
    """From the first scheduled send to the last request's end."""
    prompt_tokens: int
    output_tokens: int
    """Both summed over OK requests, as the server counted them."""
    request_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    """Prompt plus output tokens per second."""
    requested_rate: float
    """Requests/s asked for (inf: all at once)."""
    achieved_rate: float | None
    """Requests/s actually sent: (sent − 1) ÷ (last send − first send); None below 2 sends."""
    ttft: LatencySummary | None
    tpot: LatencySummary | None
    itl: LatencySummary | None
    e2e: LatencySummary | None
    send_delay: LatencySummary | None
    """Sent − scheduled: time queued in the client. Large values mean the client fell
    behind its schedule (or waited for a --max-concurrency slot)."""
    goodput: Goodput | None
    """None when no SLO was given."""
    decode_workers: dict[str, int]
    prefill_workers: dict[str, int]
    """OK requests per worker id, from ServingInfo (LOCAL_PREFILL: prefilled on decode)."""
    cached_tokens: int
    """Prompt tokens served from a prefix cache, summed over OK requests."""
    cache_hit_rate: float | None
    """cached_tokens ÷ prompt_tokens (None when no prompt tokens were counted)."""


def summarize(values_s: Sequence[float]) -> LatencySummary | None:
    """Summary in milliseconds of latencies given in seconds; None when there are none."""
    if not values_s:
        return None
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = (float(p) for p in np.percentile(ms, PERCENTILES))
    return LatencySummary(len(ms), float(ms.mean()), p50, p90, p99)


def meets_slos(record: RequestRecord, slos_ms: Mapping[str, float]) -> bool:
    """True when an OK request is within every limit; a request without TPOT meets tpot_ms."""
    if not record.ok:
        return False
    latencies = {"ttft_ms": record.ttft_s, "tpot_ms": record.tpot_s, "e2e_ms": record.e2e_s}
    for name, limit in slos_ms.items():
        if name not in latencies:
            raise ValueError(f"unknown SLO {name!r}; expected one of {', '.join(SLO_METRICS)}")
        value = latencies[name]
        if value is None:
            if name == "ttft_ms":  # no token ever came
                return False
            continue
        if value * 1000.0 > limit:
            return False
    return True


def compute_metrics(
    records: Sequence[RequestRecord],
    requested_rate: float,
    slos_ms: Mapping[str, float] | None = None,
) -> ServeMetrics:
    """Every figure of a run from its records (one per request, failed ones included)."""
    if not records:
        raise ValueError("no request records: nothing was sent")
    done = [r for r in records if r.ok]
    duration = max(r.end_s for r in records) - min(r.scheduled_s for r in records)
    if not duration > 0:
        raise ValueError(f"the records span {duration} s; rates need a positive duration")
    prompt_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    cached = sum(r.usage.cached_tokens for r in done if r.usage)
    sent = [r for r in records if r.sent_s is not None]
    return ServeMetrics(
        num_requests=len(records),
        completed=len(done),
        failures=dict(sorted(Counter(r.status for r in records if not r.ok).items())),
        duration_s=duration,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        request_throughput=len(done) / duration,
        output_token_throughput=output_tokens / duration,
        total_token_throughput=(prompt_tokens + output_tokens) / duration,
        requested_rate=requested_rate,
        achieved_rate=achieved_rate([r.sent_s for r in sent if r.sent_s is not None]),
        ttft=summarize(_present(r.ttft_s for r in done)),
        tpot=summarize(_present(r.tpot_s for r in done)),
        itl=summarize([gap for r in done for gap in r.itls_s]),
        e2e=summarize([r.e2e_s for r in done]),
        send_delay=summarize([r.sent_s - r.scheduled_s for r in sent if r.sent_s is not None]),
        goodput=_goodput(records, duration, slos_ms) if slos_ms else None,
        decode_workers=_count(r.serving.decode_worker for r in done if r.serving),
        prefill_workers=_count(
            r.serving.prefill_worker or LOCAL_PREFILL for r in done if r.serving
        ),
        cached_tokens=cached,
        cache_hit_rate=cached / prompt_tokens if prompt_tokens else None,
    )


def achieved_rate(sent_s: Sequence[float]) -> float | None:
    """Requests per second between the first and the last send; None below two sends."""
    if len(sent_s) < 2:
        return None
    span = max(sent_s) - min(sent_s)
    return (len(sent_s) - 1) / span if span > 0 else math.inf


def _goodput(
    records: Sequence[RequestRecord], duration_s: float, slos_ms: Mapping[str, float]
) -> Goodput:
    met = sum(meets_slos(r, slos_ms) for r in records)
    return Goodput(dict(slos_ms), met, met / duration_s, met / len(records))


def _present(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def _count(keys: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(keys).items()))
