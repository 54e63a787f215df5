"""Admission on Redis, so every gateway replica shares the same counters.

Design
------
Same algorithm and semantics as ``limits.InProcessAdmission`` (UTC windows keyed by window
start, per-minute rates sliding over the previous minute's counter; reserve an estimate,
settle the real count; see ``limits``'s header), with the counters in Redis:

* ``reserve`` runs one Lua script (``EVALSHA`` via redis-py's ``Script``, which loads it on
  ``NOSCRIPT``) that reads every counter and its predecessor, and only if every ``current +
  previous * weight + amount <= limit`` ``INCRBY``s the current ones and sets ``EXPIREAT``
  (``Charge.expire_at``). The gateway computes the weights from its clock, so the script
  and ``InProcessAdmission`` do the same double-precision arithmetic. Redis runs a script
  atomically, so check-and-charge is all-or-nothing across scopes and across replicas: no
  two replicas can both take the last unit.
* The reserve script also sets a marker ``<prefix>res|<id>`` (expiring with the latest
  counter it charged). ``settle``/``release`` run a second script that deletes the marker
  and, only if it existed, gives each still-existing counter ``max(0, value + delta)`` with
  ``KEEPTTL`` (an expired window is not revived). So a second settle does nothing, and so
  does the settle of a reserve that never ran; while the settle of one whose reply was lost
  (a timeout after Redis ran the script) refunds exactly what it charged. A marker lives
  only while its request runs.
* Keys: ``<prefix><scope>|<metric>|<period>|<window start>``. For Redis Cluster put a hash
  tag in the prefix (e.g. ``"{tandem}:"``) so a script's keys share a slot.
* Window boundaries come from the gateway's clock (``clock``); replicas are assumed
  NTP-synced, a skew of s seconds only moves which window a request near a boundary lands in.

Parameters: ``client`` (a ``redis.Redis``), ``prefix`` (key namespace, default
``"tandem:limits:"``), ``on_store_error`` (below), ``clock`` (Unix seconds), ``grace_s``
(seconds a counter outlives its window for late settles, default 120).

``on_store_error`` when Redis cannot be reached or errors:

* ``"fail-open"`` (**default**): admit the request, log a warning, and return the
  reservation (its settle refunds what the script charged if it ran, see above). Limits
  here protect capacity and budgets; a Redis outage should not turn into a full outage of
  inference for every caller. Authentication stays fail-closed elsewhere; this matches
  Kuadrant (closed for auth, open for limits). The price: while Redis is down, usage is
  neither enforced nor counted.
* ``"fail-closed"``: raise ``LimitStoreUnavailable`` (gRPC UNAVAILABLE, transient, with a
  message naming the store) from reserve (after trying to release what it may have
  charged), settle and release. Choose it where a budget overrun costs more than downtime.

After a failure, calls do not try Redis again for ``STORE_RETRY_S`` (``breaker.Breaker``):
each is decided at once as above, and then one call probes. Every call waiting out the
timeout instead queued them behind the gateway's worker threads: 300 concurrent calls
against an unresponsive Redis took 50 s to be admitted fail-open, 2 s with the breaker.

A settle or release that cannot reach Redis is retried on a background thread (pausing
0.5 s, doubling to 30 s, while Redis stays down) until the windows it adjusts have ended:
otherwise the unused part of an estimate (prompt + ``max_tokens`` − used) would stay
charged to a monthly budget for the rest of the month. The marker makes a retry safe: an
adjustment applies once, whichever attempt reaches Redis. At most ``SETTLE_BACKLOG``
settles wait (more are dropped, counted in ``dropped_settles`` and logged); ``close()``
gives those still waiting one last try.

Calls are synchronous (redis-py); from asyncio use ``await asyncio.to_thread(adm.reserve,
...)`` or a thread-pool executor, each call is one round trip.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Literal

import redis
from redis.exceptions import NoScriptError

from services.gateway.breaker import Breaker
from services.gateway.limits import (
    Admission,
    LimitStoreUnavailable,
    Reservation,
    Scope,
    exceeded,
    plan,
)

log = logging.getLogger(__name__)

OnStoreError = Literal["fail-open", "fail-closed"]

_RESERVE = """
local n = (#KEYS - 1) / 2
for i = 1, n do
  local current = tonumber(redis.call('GET', KEYS[2*i-1]) or '0')
  local previous = tonumber(redis.call('GET', KEYS[2*i]) or '0')
  local weight = tonumber(ARGV[4*i])
  if current + previous * weight + tonumber(ARGV[4*i-3]) > tonumber(ARGV[4*i-2]) then
    return {i, current, previous}
  end
end
for i = 1, n do
  redis.call('INCRBY', KEYS[2*i-1], ARGV[4*i-3])
  redis.call('EXPIREAT', KEYS[2*i-1], ARGV[4*i-1])
end
redis.call('SET', KEYS[#KEYS], '1', 'EXAT', ARGV[4*n+1])
return {0, 0, 0}
"""

_ADJUST = """
if redis.call('DEL', KEYS[1]) == 0 then
  return 0
end
for i = 2, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v then
    local nv = tonumber(v) + tonumber(ARGV[i-1])
    if nv < 0 then nv = 0 end
    redis.call('SET', KEYS[i], nv, 'KEEPTTL')
  end
end
return 1
"""


OUTAGE_LOG_INTERVAL_S = 10.0
"""Store errors during a Redis outage are logged at most once per this interval."""
SETTLE_BACKLOG = 1024
"""Most settles waiting for Redis (uncertain ones, and any whose own attempt failed); more
are dropped (and logged): during an outage each may wait out a timeout, and they must not
pile up without bound."""
RETRY_PAUSE_S = (0.5, 30.0)
"""The background thread's pause after a failed retry: first, and most (it doubles)."""
STORE_RETRY_S = 1.0
"""After Redis fails a call, reserves and settles skip it for this long (fail-open admits at
once, fail-closed refuses at once, settles go to the retry thread); then one call tries it
again (``breaker.Breaker``: every call waiting out the timeout queued them behind the
gateway's worker threads)."""
CLOSE_TIMEOUT_S = 2.0
"""How long ``close()`` gives the settles still waiting for one last try."""


@dataclasses.dataclass(frozen=True)
class _Adjust:
    """A settle or release to apply: tokens used, and whether request counts are refunded."""

    op: str
    reservation: Reservation
    actual: int
    refund_requests: bool


class RedisAdmission(Admission):
    """Reserve/settle admission with atomic Lua scripts on a shared Redis."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "tandem:limits:",
        on_store_error: OnStoreError = "fail-open",
        clock: Callable[[], float] = time.time,
        grace_s: int = 120,
        breaker: Breaker | None = None,
    ) -> None:
        """``breaker``: when to skip Redis after a failure (default: ``STORE_RETRY_S``)."""
        if on_store_error not in ("fail-open", "fail-closed"):
            raise ValueError(
                f"on_store_error must be 'fail-open' or 'fail-closed', got {on_store_error!r}"
            )
        self._r = client
        self._prefix = prefix
        self._on_error = on_store_error
        self._clock = clock
        self._grace_s = grace_s
        self._reserve = client.register_script(_RESERVE)
        self._adjust_script = client.register_script(_ADJUST)
        self.breaker = breaker or Breaker(STORE_RETRY_S)
        self._last_logged = float("-inf")
        self._unlogged = 0
        # Settles waiting for Redis are retried on their own daemon thread, never on the
        # caller's (the gateway's settler writes the ledger, which an outage must not hold
        # up). An Event in the queue is set when the thread reaches it.
        self._later: queue.Queue[_Adjust | threading.Event] = queue.Queue(SETTLE_BACKLOG)
        self._later_thread: threading.Thread | None = None
        self._later_lock = threading.Lock()
        self._closing = threading.Event()
        self._wake = threading.Event()  # ends the retry thread's pause: Redis back, or close
        self.failed_retries = 0
        """Background attempts that Redis refused or timed out (each is tried again)."""
        self.dropped_settles = 0
        """Settles dropped because the backlog was full (their charge stays until its
        windows end)."""
        self.abandoned_settles = 0
        """Settles whose last try, at close, Redis did not take (their charge stays until
        its windows end); close() logs them."""

    def _store_error(self, op: str, err: Exception, reservation: Reservation | None = None) -> None:
        msg = f"rate-limit store (Redis) unavailable during {op}: {err}"
        if self._on_error == "fail-closed":
            if reservation is not None:  # refused: give back what it may have charged
                self.release(reservation)
            raise LimitStoreUnavailable(msg + "; limits fail closed, retry later") from err
        then = "admitting without limits (fail-open)" if op == "reserve" else "retrying later"
        self._outage(f"{msg}; {then}")

    def _skipped(self) -> redis.ConnectionError:
        """The error a call skipping Redis reports (the breaker is open)."""
        return redis.ConnectionError(
            f"it failed a call less than {self.breaker.cooldown_s:g} s ago (not tried again yet)"
        )

    def _outage(self, msg: str) -> None:
        # Every call fails the same way during an outage: one line per interval, not one
        # per call.
        now = time.monotonic()
        self._unlogged += 1
        if now - self._last_logged >= OUTAGE_LOG_INTERVAL_S:
            log.warning("%s; %d such call(s) since the last warning", msg, self._unlogged)
            self._last_logged, self._unlogged = now, 0

    def reserve(self, scopes: Sequence[Scope], tokens: int) -> Reservation:
        now = self._clock()
        steps = plan(scopes, tokens, now, self._grace_s)
        reservation = Reservation(uuid.uuid4().hex, tokens, tuple(s.charge for s in steps))
        if not steps:
            return reservation
        keys: list[str] = []
        args: list[int | str] = []
        for step in steps:
            keys += [self._prefix + step.charge.key, self._prefix + step.previous_key]
            # repr round-trips a double exactly; Lua's tonumber reads it back bit for bit.
            c = step.charge
            args += [c.amount, step.limit, c.expire_at, repr(step.previous_weight)]
        keys.append(self._marker(reservation))
        args.append(self._latest_expiry(reservation))
        if not self.breaker.allow():
            self._store_error("reserve", self._skipped())
            return dataclasses.replace(reservation, charges=())  # nothing charged to settle
        try:
            failed, current, previous = self._reserve(keys=keys, args=args)
        except redis.RedisError as err:
            self.breaker.record(False)
            # The script may have run and only its reply been lost (a timeout): the settle
            # or release of an uncertain reservation refunds it exactly when it did (its
            # marker exists) and does nothing when it did not.
            uncertain = dataclasses.replace(reservation, uncertain=True)
            self._store_error("reserve", err, uncertain)
            return uncertain
        self._store_ok()
        if failed:
            raise exceeded(steps[int(failed) - 1], int(current), int(previous), now)
        return reservation

    def _marker(self, reservation: Reservation) -> str:
        """The key a reserve sets and the first settle or release deletes."""
        return f"{self._prefix}res|{reservation.id}"

    def _latest_expiry(self, reservation: Reservation) -> int:
        default = int(self._clock()) + self._grace_s
        return max((c.expire_at for c in reservation.charges), default=default)

    def _adjust(
        self, op: str, reservation: Reservation, actual: int, refund_requests: bool
    ) -> None:
        if actual < 0:
            raise ValueError(f"actual_tokens must be >= 0, got {actual}")
        if not reservation.charges:  # no limits applied: nothing charged, no marker set
            return
        job = _Adjust(op, reservation, actual, refund_requests)
        if not self._ready([job], op):  # queued for the retry thread
            return
        try:
            self._run_adjust(job)
        except redis.RedisError as err:
            self.breaker.record(False)
            self._retry(job)
            self._store_error(op, err)
        else:
            self._store_ok()

    def _store_ok(self) -> None:
        """A call of this process reached Redis: calls stop skipping it, and settles waiting
        for it are retried now rather than after the retry thread's pause."""
        self.breaker.record(True)
        # Always: the job being tried is out of the queue, so "nothing queued" may be one
        # whose try is failing now (it then slept the whole pause with Redis up).
        self._wake.set()

    def _retry(self, job: _Adjust | threading.Event) -> None:
        """Queue ``job`` for the background thread; drop it (counted, logged) when full."""
        try:
            self._later_queue().put_nowait(job)
        except queue.Full:
            if isinstance(job, threading.Event):
                raise
            self.dropped_settles += 1
            log.warning(
                "%d rate-limit settles wait for Redis already; dropped the %s of reservation "
                "%s (what it charged stays until its windows end)",
                SETTLE_BACKLOG,
                job.op,
                job.reservation.id,
            )

    def _later_queue(self) -> queue.Queue[_Adjust | threading.Event]:
        """The waiting settles' queue, its thread started on first use."""
        with self._later_lock:
            if self._later_thread is None:
                self._later_thread = threading.Thread(
                    target=self._run_later, name="tandem-limits-settles", daemon=True
                )
                self._later_thread.start()
        return self._later

    def _run_later(self) -> None:
        pause = RETRY_PAUSE_S[0]
        while not (self._closing.is_set() and self._later.empty()):
            try:
                job = self._later.get(timeout=0.1 if self._closing.is_set() else None)
            except queue.Empty:
                continue
            if isinstance(job, threading.Event):
                job.set()
                continue
            self._wake.clear()  # a call that reaches Redis from here on ends the pause
            if self._attempt(job):
                pause = RETRY_PAUSE_S[0]
            elif self._closing.is_set():
                self.abandoned_settles += 1  # its last try: close() says so
            else:
                self.failed_retries += 1
                self._retry(job)
                # Redis is down: do not spin through the queue, but a call that finds it
                # back ends the pause (refunds waited up to 30 s, their callers refused).
                self._wake.wait(pause)
                pause = min(2 * pause, RETRY_PAUSE_S[1])

    def _attempt(self, job: _Adjust) -> bool:
        """Apply ``job``; False when it should be tried again (Redis still down)."""
        try:
            self._run_adjust(job)
        except redis.RedisError as err:
            self.breaker.record(False)
            if self._clock() >= self._latest_expiry(job.reservation):
                log.warning(
                    "gave up the %s of reservation %s: its windows ended while Redis was "
                    "unavailable (%s)",
                    job.op,
                    job.reservation.id,
                    err,
                )
                return True
            self._outage(f"rate-limit store (Redis) unavailable during a {job.op}: {err}")
            return False
        self.breaker.record(True)  # Redis is back: calls stop skipping it at once
        return True

    def settled_later(self, timeout_s: float = 10.0) -> None:
        """Wait until the background thread has tried every settle queued so far once
        (tests)."""
        done = threading.Event()
        self._retry(done)
        if not done.wait(timeout_s):
            raise TimeoutError(f"settles still queued after {timeout_s} s")

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Give the settles still waiting for Redis one last try (within ``timeout_s``),
        then stop retrying; those still failing are logged, their charges stay."""
        self._closing.set()
        self._wake.set()
        thread = self._later_thread
        if thread is not None:
            with contextlib.suppress(queue.Full):  # full: the thread is busy, not asleep
                self._later.put_nowait(threading.Event())  # wakes a thread idle in get()
            thread.join(timeout_s)
        # A settle whose last try failed has left the queue: counted, or an outage at the
        # stop dropped refunds without a word (the outage log is rate-limited).
        left = self._later.qsize() + self.abandoned_settles
        if left or (thread is not None and thread.is_alive()):
            log.warning(
                "closing with %d rate-limit settle(s) Redis did not take; their charges "
                "stay until their windows end",
                left,
            )

    def _run_adjust(self, job: _Adjust) -> None:
        """Apply ``job`` (once, whichever attempt gets there: the marker); raises RedisError."""
        keys, args = self._adjust_call(job)
        self._adjust_script(keys=keys, args=args)

    def _adjust_call(self, job: _Adjust) -> tuple[list[str], list[int]]:
        """The keys and arguments of ``job``'s adjust script."""
        keys = [self._marker(job.reservation)]
        args: list[int] = []
        for c in job.reservation.charges:
            if c.metric == "tokens":
                delta = job.actual - c.amount
            elif job.refund_requests:
                delta = -c.amount
            else:
                continue
            keys.append(self._prefix + c.key)
            args.append(delta)
        return keys, args

    def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        self._adjust("settle", reservation, actual_tokens, refund_requests=False)

    def settle_many(self, used: Sequence[tuple[Reservation, int | None]]) -> None:
        """Every adjustment in one pipeline: one round trip for a batch of calls (one each,
        in turn, capped the gateway's settler at 1/RTT calls a second). A job Redis
        refuses, or the whole batch when Redis cannot be reached, goes to the retry thread."""
        if any(tokens is not None and tokens < 0 for _, tokens in used):
            raise ValueError(f"actual_tokens must be >= 0, got {[t for _, t in used]}")
        jobs = [
            _Adjust("settle", r, tokens, False)
            if tokens is not None
            else _Adjust("release", r, 0, True)
            for r, tokens in used
            if r.charges  # no limits applied: nothing charged, no marker set
        ]
        jobs = self._ready(jobs, "settle")
        if jobs:
            self._pipelined(jobs)

    def _ready(self, jobs: list[_Adjust], op: str) -> list[_Adjust]:
        """The jobs to send now; the others go to the retry thread: an uncertain
        reservation's (its reserve may still be on its way) and, while the breaker is
        open, all (reported as the configured store-error choice says)."""
        ready = []
        for job in jobs:
            if job.reservation.uncertain:
                self._retry(job)
            else:
                ready.append(job)
        if ready and not self.breaker.allow():
            for job in ready:
                self._retry(job)
            self._store_error(op, self._skipped())
            return []
        return ready

    def _pipelined(self, jobs: list[_Adjust]) -> None:
        """Send ``jobs`` in one round trip: EVALSHA on a plain pipeline (a ``Script`` queued
        on one makes redis-py ask SCRIPT EXISTS first: a second round trip per batch); when
        Redis has lost the script (restarted, flushed), it is loaded and those jobs resent."""
        try:
            replies = self._evalsha_all(jobs)
            lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if lost:
                self._r.script_load(_ADJUST)
                for i, reply in zip(lost, self._evalsha_all([jobs[i] for i in lost]), strict=True):
                    replies[i] = reply
        except redis.RedisError as err:
            self.breaker.record(False)
            for job in jobs:
                self._retry(job)
            self._store_error("settle", err)
            return
        self._store_ok()
        for job, reply in zip(jobs, replies, strict=True):
            if isinstance(reply, redis.RedisError):
                self._retry(job)
                self._outage(f"rate-limit store (Redis) refused a {job.op}: {reply}")

    def _evalsha_all(self, jobs: list[_Adjust]) -> list[object]:
        """Each job's reply (an exception object for one Redis refused); raises RedisError
        when Redis cannot be reached."""
        pipe = self._r.pipeline(transaction=False)
        for job in jobs:
            keys, args = self._adjust_call(job)
            pipe.evalsha(self._adjust_script.sha, len(keys), *keys, *args)
        return list(pipe.execute(raise_on_error=False))

    def release(self, reservation: Reservation) -> None:
        self._adjust("release", reservation, 0, refund_requests=True)
