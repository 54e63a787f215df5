"""Prometheus metrics the router serves (``--metrics-port``; off when 0).

The router sees every request end to end, so client-facing latencies live
here: TTFT and inter-token latency as the client experiences them, retries and
outcomes. Workers export their own (queue depth, KV transfer bytes and time).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.engine.errors import TandemError
from services.stubs.tandem.v1 import inference_pb2 as pb

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
"""Up to 10 minutes: Tandem's clients allow 300 s a request (generate and bench serve's
--timeout), and long generations or a queued TTFT between 60 s and that all fell in +Inf,
which histogram_quantile reports as a flat 60."""


CLIENT_ENDED = ("DEADLINE_EXCEEDED", "CANCELLED")
"""Status codes of a request its client ended (its deadline, its cancel): "cancelled"."""


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram(
            "tandem_ttft_seconds",
            "Time to the first token-bearing message",
            buckets=_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tandem_inter_token_seconds",
            "Gap between consecutive token-bearing messages",
            buckets=_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tandem_request_seconds",
            "Request latency, first byte to final",
            buckets=_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            "tandem_requests_finished",
            "Requests by how they ended: the finish reason, cancelled (by the client or its "
            "deadline) or failed",
            ["outcome"],
            registry=r,
        )
        self.tokens = Counter("tandem_completion_tokens", "Tokens streamed to clients", registry=r)
        self.in_flight = Gauge("tandem_requests_in_flight", "Requests being served", registry=r)
        self.indexed_blocks = Gauge(
            "tandem_router_indexed_blocks",
            "KV blocks the router's prefix index holds for a worker (from its KV events)",
            ["worker"],
            registry=r,
        )
        from services.router.placement_metrics import PLACEMENTS, RETRIES  # process-wide

        r.register(PLACEMENTS)  # tandem_router_placements_total{placement=...}
        r.register(RETRIES)  # tandem_router_retries_total, counted as each retry is made

    async def observe(
        self, stream: AsyncIterator[pb.GenerateResponse]
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Pass a response stream through, timing it.

        The outcome is the finish reason; "cancelled" when the stream is closed or
        cancelled before its end (the client went away or its deadline passed), and
        "failed" when it raises.
        """
        start = last = time.monotonic()
        first = True
        outcome = "failed"
        self.in_flight.inc()
        try:
            async for msg in stream:
                now = time.monotonic()
                if msg.token_ids:
                    (self.ttft if first else self.itl).observe(now - last)
                    first, last = False, now
                yield msg
                # Counted once written: gRPC resumes the handler after the write, and a call
                # cancelled during it (the client left) never got this message.
                self.tokens.inc(len(msg.token_ids))
                if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    outcome = (
                        pb.FinishReason.Name(msg.finish_reason)
                        .removeprefix("FINISH_REASON_")
                        .lower()
                    )
        except (asyncio.CancelledError, GeneratorExit):
            if outcome == "failed":  # not after the final message: that outcome stands
                outcome = "cancelled"
            raise
        except TandemError as e:
            # The deadline may reach a worker call (its timeout is the client's time left)
            # before gRPC cancels this handler: the same client deadline, not a failure.
            if outcome == "failed" and e.grpc_code in CLIENT_ENDED:
                outcome = "cancelled"
            raise
        finally:
            self.in_flight.dec()
            self.finished.labels(outcome).inc()
            self.e2e.observe(time.monotonic() - start)
