"""Prometheus metrics a worker serves (``--metrics-port``; off when 0).

Each worker owns its registry, so several workers (and tests) can live in one
process without clashing over metric names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WorkerMetrics:
    def __init__(self, role: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prefill_requests = Counter(
            "tandem_prefill_requests",
            "Prefill calls answered with a first token: with its KV pinned for a decode "
            "worker, or finished at that token (refused, failed, cancelled and lease-expired "
            "calls are not counted)",
            registry=r,
        )
        self.decode_requests = Counter(
            "tandem_decode_requests",
            "Decode calls whose request the engine took, by mode (aggregated, or "
            "disaggregated: with a prefill's KV); refused ones (invalid, duplicate request "
            "id) are not counted, ones that end early (cancelled, failed) are",
            ["mode"],
            registry=r,
        )
        self.kv_released = Counter(
            "tandem_kv_released",
            "Pinned prefills released on request (by their decode worker, or by the router "
            "when a hand-off failed or its client left)",
            registry=r,
        )
        self.lease_expiries = Counter(
            "tandem_kv_lease_expiries", "Pinned prefills released unread at lease end", registry=r
        )
        self.kv_bytes_received = Counter(
            "tandem_kv_transfer_received_bytes", "KV bytes read from prefill workers", registry=r
        )
        self.kv_bytes_served = Counter(
            "tandem_kv_transfer_served_bytes", "KV bytes served over the byte stream", registry=r
        )
        self.kv_transfer_seconds = Histogram(
            "tandem_kv_transfer_seconds",
            "Time to read one request's KV (the pull alone; see tandem_kv_release_seconds)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_release_seconds = Histogram(
            "tandem_kv_release_seconds",
            "After a KV read, time until the prefill worker confirmed it still held the "
            "blocks (ReleaseKV; waits behind that worker's current engine step)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_transfer_failures = Counter(
            "tandem_kv_transfer_failures",
            "KV reads that failed and fell back to local prefill",
            registry=r,
        )
        self.kv_reads_unreleased = Counter(
            "tandem_kv_reads_unreleased",
            "KV reads abandoned (deadline, cancel) whose transfer NIXL had not released "
            "in time; their blocks stay out of use until it is (alert on any)",
            registry=r,
        )
        self.kv_room_wait_seconds = Histogram(
            "tandem_kv_room_wait_seconds",
            "Time a prefilled request waited for room in this pool before its KV was read",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_room_give_ups = Counter(
            "tandem_kv_room_give_ups",
            "Prefilled requests that found no room within --kv-room-wait-s and were "
            "prefilled here instead",
            registry=r,
        )
        self.inter_token_seconds = Histogram(
            # Not the router's tandem_inter_token_seconds (what clients see, other buckets):
            # one name for both broke histogram_quantile over anything but a single job.
            "tandem_worker_inter_token_seconds",
            "Gap between consecutive token messages a decode worker streams",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge("tandem_running_requests", "Requests in the batch", registry=r)
        self.waiting = Gauge("tandem_queue_depth", "Requests waiting to be scheduled", registry=r)
        self.free_blocks = Gauge("tandem_kv_free_blocks", "Free KV blocks", registry=r)
        self.draining = Gauge(
            "tandem_worker_draining",
            "1 while the worker shuts down gracefully (refusing new requests)",
            registry=r,
        )
        self.role = role
