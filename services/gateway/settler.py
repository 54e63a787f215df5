"""Metering off the response path: each call's ledger row and audit record, and each
refusal's audit record, group-committed after the call's status is sent.

Why not before the call's status: the client holds its whole answer once the final message
(finish reason + usage) is relayed, so committing before the status never made the usage
safer; it only made every caller wait for a transaction and an fsync (measured: ~1 ms of the
~3 ms the gateway added to a stream's close, bench/gateway/README.md). Field practice is the
same (LiteLLM batches its spend logs; Kuadrant's limit counters flush in the background).

What stays exact: every settle submitted is written exactly once, in submission order, by
one thread (:class:`Settler`): a batch of up to ``max_batch`` rows and records in one
transaction, one commit, with the same fallback as before (written apart, ledger first, when
the transaction fails, so an audit failure cannot cost a ledger row). The ledger row is
idempotent on the gateway's request id, so nothing is counted twice.

What is weaker, and how it is covered:

- Read-your-writes: a row appears up to ``linger_s`` plus one commit after the call ends.
  ``tandem.v1.UsageService`` flushes this replica's settles before it reads
  (:meth:`Settler.flush`); another replica's GetUsage may miss a row that is a few
  milliseconds old.
- Refusals are audited the same way (in decision order with the settles): the caller gets
  its UNAUTHENTICATED / PERMISSION_DENIED / RESOURCE_EXHAUSTED before the record is
  committed. Admin calls (``call_auth.CallGuard``) still write theirs first and fail
  UNAVAILABLE when they cannot.
- A crash loses the settles not yet committed (at most ``linger_s`` plus one commit of
  calls), as a crash between the final message and the commit did before; a graceful stop
  drains them (:meth:`Settler.close`, from ``Gateway.stop``).
- Admission: an in-process settle runs on the loop before the status (microseconds), so a
  sequential caller at its budget sees its reservation returned when its call ends; a Redis
  one runs on this thread, up to ``linger_s`` plus a commit later, after the batch's rows
  are committed: a batch's settles go in one pipelined round trip, and a slow or absent
  Redis never holds up a ledger row.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from services.gateway.audit import EXCLUSIVE as AUDIT_EXCLUSIVE
from services.gateway.audit import AuditEvent, AuditLog
from services.gateway.ledger import Ledger, UsageRecord
from services.gateway.limits import Admission, Reservation
from services.gateway.metrics import METRICS, GatewayMetrics
from services.gateway.store import Tx

log = logging.getLogger(__name__)

LINGER_S = 0.02
"""How long the thread waits for more settles after the first of a batch. It defers this
thread's work (and its grip on the GIL) until the loop has sent the call's status, and
under load lets one commit carry many calls: with 2 ms, batches were mostly single and the
loop and this thread traded the GIL per call (~3.3 CPU-ms a request against ~2.4 before
the settler; 20 ms: ~2.4, bench/gateway/README.md). It is also the crash window: a
killed gateway loses up to this much of its latest calls' rows (a graceful stop drains)."""
MAX_BATCH = 256
"""Most settles in one transaction."""
MAX_BACKLOG = 50_000
"""Settles waiting for the store past which the gateway refuses new calls (UNAVAILABLE,
``Settler.overloaded``) rather than let the queue grow without end in memory: a store that
cannot keep up (a slow PostgreSQL) under a flood, unauthenticated calls' audit records
included. Every decision stays audited; the calls refused then make no decision."""


@dataclass(frozen=True)
class Settle:
    """What one decision writes: its audit record, and for a call that was let through its
    ledger row and what admission gives back."""

    event: AuditEvent
    record: UsageRecord | None = None
    """The call's ledger row; None for a refusal (an audit record alone)."""
    reservation: Reservation | None = None
    """Set when admission is settled on the thread (a blocking admission: Redis); None when
    the caller already settled it on the loop, or for a refusal."""
    counted: bool = False
    """A call that produced no token still counts as a request for the rate limits: the
    router refused it as the caller's mistake (``charge``)."""


_STOP = object()


class Settler:
    """One thread writing settles in order, batched; see the module docstring."""

    def __init__(
        self,
        admission: Admission,
        ledger: Ledger,
        audit: AuditLog,
        linger_s: float = LINGER_S,
        max_batch: int = MAX_BATCH,
        max_backlog: int = MAX_BACKLOG,
        metrics: GatewayMetrics | None = METRICS,
    ) -> None:
        self.admission = admission
        self.ledger = ledger
        self.audit = audit
        self._linger_s = linger_s
        self._max_batch = max_batch
        self._pending = metrics.settles_pending if metrics is not None else None
        self._queue: queue.SimpleQueue[Settle | Future[None] | object] = queue.SimpleQueue()
        self.max_backlog = max_backlog
        self.backlog = 0
        """Settles submitted and not yet written (changed under ``_closing``)."""
        self._closed = False
        self._closing = threading.Lock()
        """Makes checking ``_closed`` and queueing one step: nothing lands behind the stop."""
        self._thread = threading.Thread(target=self._run, name="gateway-settler", daemon=True)
        self._thread.start()

    @property
    def overloaded(self) -> bool:
        """Whether ``max_backlog`` settles wait: new calls are refused until it drains."""
        return self.backlog >= self.max_backlog

    def submit(self, settle: Settle) -> None:
        """Queue one settle (never waits on I/O). After :meth:`close`, writes it inline."""
        with self._closing:
            queued = not self._closed
            if queued:
                if self._pending is not None:
                    self._pending.inc()
                self.backlog += 1
                self._queue.put(settle)
        if not queued:
            self._write([settle])

    async def flush(self) -> None:
        """Wait until every settle submitted before this call is committed."""
        if not self._closed:
            await asyncio.wrap_future(self._marker())

    def wait(self, timeout_s: float = 10.0) -> None:
        """:meth:`flush`, blocking (the thread never needs an event loop, so a loop's own
        thread may block on it: tests that read the ledger right after a call)."""
        if not self._closed:
            self._marker().result(timeout_s)

    def _marker(self) -> Future[None]:
        marker: Future[None] = Future()
        with self._closing:
            if self._closed:  # everything before it is written, or being written inline
                marker.set_result(None)
            else:
                self._queue.put(marker)
        return marker

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the thread (blocks up to ``timeout_s``)."""
        with self._closing:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("the settler did not drain within %.1f s: usage may be lost", timeout_s)

    # -- on the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            batch, markers, stopping = self._gather(first)
            try:
                if batch:
                    self._write(batch)
            except Exception:  # never let the thread die: later calls must still be metered
                log.exception("writing %d settles failed", len(batch))
            finally:
                if self._pending is not None:
                    self._pending.dec(len(batch))
                with self._closing:
                    self.backlog -= len(batch)
                for marker in markers:
                    marker.set_result(None)

    def _gather(self, first: object) -> tuple[list[Settle], list[Future[None]], bool]:
        """``first`` and what follows it within the linger (a marker or stop ends it early)."""
        batch: list[Settle] = []
        markers: list[Future[None]] = []
        item = first
        deadline = time.monotonic() + self._linger_s
        while True:
            if item is _STOP:
                return batch, markers, True
            if isinstance(item, Future):
                markers.append(item)
                return batch, markers, False
            assert isinstance(item, Settle)
            batch.append(item)
            left = deadline - time.monotonic()
            if len(batch) >= self._max_batch or left <= 0:
                return batch, markers, False
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                return batch, markers, False

    def _write(self, batch: list[Settle]) -> None:
        """Commit the batch's rows and records, then settle its admissions: the ledger never
        waits on the limit store (one Redis round trip per call, in turn, before the commit
        held every row behind them, and a graceful stop gave up on the backlog)."""
        self._commit(batch)
        settle_admissions(
            self.admission,
            [(s.reservation, s.record, s.counted) for s in batch if s.reservation and s.record],
        )

    def _commit(self, batch: list[Settle]) -> None:
        if self.ledger.store is self.audit.store:
            try:
                with self.ledger.store.transaction(exclusive=AUDIT_EXCLUSIVE) as tx:
                    news = [self._insert(tx, s) for s in batch]
            except Exception:
                # Rolled back together; write them apart so an audit failure cannot
                # cost a ledger row (the usage would go unmetered).
                log.exception("settle transaction of %d calls failed", len(batch))
            else:  # counted only once committed, and outside the try: never written twice
                for settle, new in zip(batch, news, strict=True):
                    if settle.record is not None:
                        self.ledger.count(settle.record, new)
                    self.audit.count(settle.event)
                return
        for settle in batch:
            self._write_apart(settle)

    def _insert(self, tx: Tx, settle: Settle) -> bool:
        new = settle.record is not None and self.ledger.insert(tx, settle.record)
        self.audit.append_in(tx, settle.event)
        return new

    def _write_apart(self, settle: Settle) -> None:
        request_id = settle.event.request_id or "?"
        if settle.record is not None:
            try:
                self.ledger.record(settle.record)
            except Exception:
                log.exception("ledger write failed for request %s", request_id)
        try:
            self.audit.append(settle.event)
        except Exception:
            log.exception("audit append failed for request %s", request_id)


def charge(record: UsageRecord, counted: bool) -> int | None:
    """What admission is charged for a call: its tokens, or None (released: the request not
    counted either) when it produced none (failed upstream, cancelled first) unless it is
    ``counted``: refused by the router as the caller's mistake. Refunded, such refusals let
    a key at its requests-per-minute limit have the router tokenize prompts it refuses as
    too long (8 MiB each) without end."""
    tokens = record.prompt_tokens + record.completion_tokens
    return None if tokens == 0 and not counted else tokens


def settle_admission(
    admission: Admission, reservation: Reservation, record: UsageRecord, counted: bool
) -> None:
    """Replace the reservation by the tokens used, or give it back (``charge``)."""
    settle_admissions(admission, [(reservation, record, counted)])


def settle_admissions(
    admission: Admission, settles: list[tuple[Reservation, UsageRecord, bool]]
) -> None:
    """:func:`settle_admission` for each, in one go (``Admission.settle_many``)."""
    if not settles:
        return
    try:
        admission.settle_many([(r, charge(u, counted)) for r, u, counted in settles])
    except Exception:
        ids = ", ".join(u.request_id for _, u, _ in settles[:3])
        more = f" and {len(settles) - 3} more" if len(settles) > 3 else ""
        log.exception("settling admission for request(s) %s%s failed", ids, more)
