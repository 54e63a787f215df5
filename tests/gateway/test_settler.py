"""The settler: every queued settle written once, in order, batched; flush, wait and close."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.gateway.audit import AuditEvent, AuditLog
from services.gateway.ledger import Ledger, UsageRecord
from services.gateway.limits import (
    DAY,
    InProcessAdmission,
    LimitExceeded,
    Limits,
    Scope,
    window_start,
)
from services.gateway.limits_redis import RedisAdmission
from services.gateway.metrics import GatewayMetrics
from services.gateway.settler import Settle, Settler
from services.gateway.store import Store
from tests.gateway.conftest import all_rows

T0 = 1_700_000_000.0


def _record(i: int, **kw: object) -> UsageRecord:
    fields: dict[str, object] = dict(
        request_id=f"req-{i}",
        principal="ann",
        team="ml",
        model="m",
        prompt_tokens=3,
        completion_tokens=i,
        cached_tokens=0,
        latency_ms=1.0,
        outcome="ok",
        time=T0 + i,
    )
    fields.update(kw)
    return UsageRecord(**fields)  # type: ignore[arg-type]


def _event(i: int, decision: str = "allow") -> AuditEvent:
    return AuditEvent(principal="ann", decision=decision, reason=f"r{i}", request_id=f"req-{i}")


def _settler(store: Store, **kw: object) -> tuple[Settler, Ledger, AuditLog]:
    ledger, audit = Ledger(store, metrics=None), AuditLog(store, metrics=None)
    kw.setdefault("metrics", None)
    return Settler(InProcessAdmission(), ledger, audit, **kw), ledger, audit  # type: ignore[arg-type]


def test_settles_and_refusals_are_written_once_in_submission_order(store: Store) -> None:
    settler, ledger, audit = _settler(store)
    try:
        for i in range(40):
            if i % 5 == 4:
                settler.submit(Settle(_event(i, "deny")))  # a refusal: no ledger row
            else:
                settler.submit(Settle(_event(i), _record(i)))
        settler.wait()
        events = [r.event for r in audit.records()]
        assert [e.request_id for e in events] == [f"req-{i}" for i in range(40)]
        assert [e.decision for e in events] == [
            "deny" if i % 5 == 4 else "allow" for i in range(40)
        ]
        assert audit.verify_chain() is None
        (total,) = ledger.usage(0, 2**40, group_by=())
        allowed = [i for i in range(40) if i % 5 != 4]
        assert (total.requests, total.completion_tokens) == (len(allowed), sum(allowed))
        settler.submit(Settle(_event(1), _record(1, completion_tokens=99)))  # a second settle
        settler.wait()
        assert ledger.get("req-1") == _record(1)  # idempotent: never counted twice
    finally:
        settler.close()


def test_a_failing_row_costs_only_itself(store: Store) -> None:
    """One invalid row fails its batch's transaction; the rest are written apart."""
    settler, ledger, audit = _settler(store, linger_s=0.5)
    try:
        settler.submit(Settle(_event(0), _record(0)))
        settler.submit(Settle(_event(1), _record(1, prompt_tokens=-1)))  # refused by the ledger
        settler.submit(Settle(_event(2), _record(2)))
        settler.wait()
        assert ledger.get("req-0") == _record(0) and ledger.get("req-2") == _record(2)
        assert ledger.get("req-1") is None
        assert [r.event.request_id for r in audit.records()] == ["req-0", "req-1", "req-2"]
    finally:
        settler.close()


def test_flush_does_not_wait_for_the_linger(store: Store) -> None:
    async def body() -> float:
        settler, ledger, _ = _settler(store, linger_s=30.0)
        try:
            settler.submit(Settle(_event(0), _record(0)))
            started = time.monotonic()
            await settler.flush()
            assert ledger.get("req-0") == _record(0)
            return time.monotonic() - started
        finally:
            settler.close()

    assert asyncio.run(body()) < 5.0


def test_close_drains_the_queue_and_later_settles_are_written_inline(store: Store) -> None:
    settler, ledger, _ = _settler(store, linger_s=0.2)
    for i in range(300):  # more than one batch
        settler.submit(Settle(_event(i), _record(i)))
    settler.close()
    (total,) = ledger.usage(0, 2**40, group_by=())
    assert total.requests == 300
    settler.submit(Settle(_event(300), _record(300)))
    assert ledger.get("req-300") == _record(300)


def test_a_reservation_handed_over_is_settled_on_the_thread(store: Store) -> None:
    settler, _, _ = _settler(store)
    admission = settler.admission
    scope = Scope("user:ann", Limits(tokens_per_day=1000))
    try:
        used = admission.reserve([scope], 500)
        nothing = admission.reserve([scope], 400)
        with pytest.raises(LimitExceeded):
            admission.reserve([scope], 200)  # 900 reserved: no room for 200
        settler.submit(Settle(_event(0), _record(0, prompt_tokens=3, completion_tokens=7), used))
        settler.submit(Settle(_event(1), _record(1, prompt_tokens=0, completion_tokens=0), nothing))
        settler.wait()
        admission.reserve([scope], 980)  # 10 used: 990 left
        with pytest.raises(LimitExceeded):
            admission.reserve([scope], 11)
    finally:
        settler.close()


def test_the_pending_gauge_counts_what_is_queued(store: Store) -> None:
    metrics = GatewayMetrics()
    settler, _, _ = _settler(store, linger_s=30.0, metrics=metrics)
    try:
        for i in range(3):
            settler.submit(Settle(_event(i), _record(i)))
        assert metrics.value("tandem_gateway_settles_pending") == 3
        settler.wait()
        assert metrics.value("tandem_gateway_settles_pending") == 0
    finally:
        settler.close()


def test_the_backlog_counts_what_is_queued_and_overloads_at_its_bound(store: Store) -> None:
    settler, _, _ = _settler(store, linger_s=30.0, max_backlog=3)
    try:
        for i in range(2):
            settler.submit(Settle(_event(i), _record(i)))
        assert (settler.backlog, settler.overloaded) == (2, False)
        settler.submit(Settle(_event(2), _record(2)))
        assert (settler.backlog, settler.overloaded) == (3, True)
        settler.wait()
        assert (settler.backlog, settler.overloaded) == (0, False)
    finally:
        settler.close()


class _HeldGauge:
    """A pending gauge whose ``inc`` waits for the test: where a thread switch can land
    between a submit's check that the settler is open and its queueing."""

    def __init__(self) -> None:
        self.entered, self.go = threading.Event(), threading.Event()

    def inc(self, amount: float = 1) -> None:
        self.entered.set()
        self.go.wait(5)

    def dec(self, amount: float = 1) -> None:
        pass


def test_a_submit_racing_close_is_still_written(store: Store) -> None:
    settler, ledger, _ = _settler(store)
    gauge = _HeldGauge()
    settler._pending = gauge  # type: ignore[assignment]
    submitting = threading.Thread(target=settler.submit, args=(Settle(_event(1), _record(1)),))
    submitting.start()
    assert gauge.entered.wait(5)  # the submit saw the settler open
    closing = threading.Thread(target=settler.close)
    closing.start()
    closing.join(0.2)  # close waits for the submit to finish queueing...
    gauge.go.set()
    submitting.join(5)
    closing.join(5)
    assert ledger.get("req-1") == _record(1)  # ...so its stop lands behind the settle


def test_a_stalled_redis_holds_up_no_ledger_row(
    store: Store, rds: redis.Redis, prefix: str
) -> None:
    """Rows are committed before the batch's admission settles, which go to Redis in one
    pipeline. Before, each call's settle was a round trip of its own ahead of the commit:
    with Redis paused, 40 calls took 40 socket timeouts (12 s here) to reach the ledger,
    and a graceful stop gave up on the backlog."""
    client = redis.Redis(port=6379, socket_timeout=0.3, retry=Retry(NoBackoff(), 0))
    now = time.time()  # counters expire at their window's end: it must lie ahead
    admission = RedisAdmission(client, prefix=prefix, clock=lambda: now)
    ledger, audit = Ledger(store, metrics=None), AuditLog(store, metrics=None)
    settler = Settler(admission, ledger, audit, metrics=None)
    scope = Scope("user:ann", Limits(tokens_per_day=100_000))
    reservations = [admission.reserve([scope], 100) for _ in range(40)]
    try:
        rds.client_pause(4000, all=False)  # a real outage for every client; data kept
        for i, reservation in enumerate(reservations):
            settler.submit(Settle(_event(i), _record(i), reservation))
        settler.wait(timeout_s=2.0)
        assert len(all_rows(store, "usage_ledger")) == 40
        rds.client_unpause()
        admission.settled_later()
        day = int(rds.get(f"{prefix}user:ann|tokens|{DAY}|{window_start(DAY, now)}") or 0)
        assert day == sum(3 + i for i in range(40))  # each settled to its tokens, once
    finally:
        rds.client_unpause()
        settler.close()
        admission.close()
