"""Admission control: request-rate limits, token-rate limits and token quotas.

Design
------
Every caller request passes ``Admission.reserve(scopes, tokens)`` before it reaches a
model and ``settle``/``release`` once the real token count is known (the reserve-estimate,
commit-actual scheme, so concurrent in-flight requests cannot all pass a check that is only
charged afterwards).

Algorithm: **windows keyed by the window's start**, UTC; per-minute rates slide.

* ``requests_per_minute``: a counter per scope per minute window, +1 per admitted request.
* ``tokens_per_minute`` / ``tokens_per_day`` / ``tokens_per_month``: a counter per scope per
  minute / day / calendar-month window, charged with the reserved token estimate.
* A window's key is ``<scope>|<metric>|<period>|<start epoch seconds>``; minute windows
  start at ``floor(t / 60) * 60``, day windows at 00:00 UTC, month windows at 00:00 UTC on
  the 1st. A counter lives until its window ends (a minute counter one minute longer, since
  the next window reads it) plus a short grace so a late ``settle`` can still refund into it.
* Day and month budgets check ``used + amount <= limit`` against their calendar window: a
  budget per calendar period is the intended meaning.
* Minute rates are a **sliding window counter**: the previous minute's counter counts in
  proportion to how much of it still lies within the last 60 s, ``used = current +
  previous * (60 - elapsed) / 60``. With plain fixed windows a caller could spend a whole
  limit at 23:59:59.9 and again at 00:00:00.0, twice the limit within 0.1 s; here a caller
  who spent it at the end of one minute gets nothing at the start of the next and regains it
  evenly over the minute. The estimate assumes the previous minute's traffic was spread
  evenly: for a steady caller it is within one request of the true count over the last
  60 s (so one sending at exactly the limit's rate is refused now and then), and a burst is
  smoothed (Cloudflare's and Kong's sliding windows work the same way); two counters and O(1)
  work per check.
* ``reserve`` checks every (scope, window) that has a limit and, only if all pass, charges
  all of them: all or nothing, under one lock here and in one Lua script in
  ``limits_redis``.
* ``settle(reservation, actual)`` adds ``actual - reserved`` to each token window the
  reservation charged (the window it was charged in, even after a rollover, while that
  counter still exists); a counter never goes below zero; a second settle is a no-op.
  Usage above the estimate is charged even if it passes the limit: the tokens were served.
* ``release(reservation)`` (failure before any token) refunds the tokens *and* the request
  count, as if the request had never been admitted. It is ``settle`` to zero plus the
  request refund, and is equally idempotent. The gateway releases calls that failed
  upstream (no worker, an internal error) or were cancelled first; a request the router
  refused as the caller's mistake (INVALID_ARGUMENT, NOT_FOUND, OUT_OF_RANGE) is settled
  to zero tokens and still counts as a request (``settler.charge``).

Parameters (``Limits``, one per scope; ``None`` means unlimited, no counter is kept):
``requests_per_minute``, ``tokens_per_minute``, ``tokens_per_day``, ``tokens_per_month``.
``InProcessAdmission(clock=time.time, grace_s=120)``: ``clock`` gives Unix seconds (tests
inject one); ``grace_s`` is how long after its window a counter is kept for late settles.

A rejected request raises ``LimitExceeded`` (gRPC RESOURCE_EXHAUSTED) naming the scope, the
limit, and when it has room again. Minute rates carry ``retry_after_s``, the time until the
sliding estimate leaves room for the request if nothing else arrives; a day or month
budget carries ``retry_after_s=None`` and ``is_quota=True`` (retrying soon is pointless;
``reset_at`` still says when it refills). A request larger than a limit outright is also
marked ``is_quota`` with no retry.

``InProcessAdmission`` is for one gateway process (tests, single replica): thread-safe via
one lock held only for dictionary arithmetic, so it never blocks an asyncio loop
noticeably. Use ``limits_redis.RedisAdmission`` when several replicas share limits.
"""

from __future__ import annotations

import calendar
import math
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.engine.errors import TandemError

MINUTE = "minute"
DAY = "day"
MONTH = "month"

REQUESTS = "requests"
TOKENS = "tokens"


@dataclass(frozen=True)
class Limits:
    """Limits for one scope; ``None`` means unlimited."""

    requests_per_minute: int | None = None
    """Admitted requests per minute (sliding window)."""
    tokens_per_minute: int | None = None
    """Tokens (reserved, then settled) per minute (sliding window)."""
    tokens_per_day: int | None = None
    """Token budget per UTC calendar day."""
    tokens_per_month: int | None = None
    """Token budget per UTC calendar month."""

    def __post_init__(self) -> None:
        for name in (
            "requests_per_minute",
            "tokens_per_minute",
            "tokens_per_day",
            "tokens_per_month",
        ):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")

    def windows(self) -> list[tuple[str, str, str, int]]:
        """(limit name, metric, period, limit) for every limit that is set, in check order."""
        out = []
        for name, metric, period in (
            ("requests_per_minute", REQUESTS, MINUTE),
            ("tokens_per_minute", TOKENS, MINUTE),
            ("tokens_per_day", TOKENS, DAY),
            ("tokens_per_month", TOKENS, MONTH),
        ):
            value = getattr(self, name)
            if value is not None:
                out.append((name, metric, period, value))
        return out


@dataclass(frozen=True)
class Scope:
    """One party a request is charged to, e.g. ``key:abc``, ``user:ann``, ``team:ml``."""

    name: str
    """Unique scope name; it appears in counter keys and error messages."""
    limits: Limits
    """The limits that apply to this scope."""


def window_start(period: str, now: float) -> int:
    """Unix seconds at which the UTC ``period`` window containing ``now`` starts."""
    t = int(now // 1)
    if period == MINUTE:
        return t - t % 60
    if period == DAY:
        return t - t % 86400
    if period == MONTH:
        tm = time.gmtime(t)
        return calendar.timegm((tm.tm_year, tm.tm_mon, 1, 0, 0, 0))
    raise ValueError(f"unknown period {period!r}")


def window_end(period: str, now: float) -> int:
    """Unix seconds at which the UTC ``period`` window containing ``now`` ends (exclusive)."""
    start = window_start(period, now)
    if period == MINUTE:
        return start + 60
    if period == DAY:
        return start + 86400
    tm = time.gmtime(start)
    year, month = (tm.tm_year + 1, 1) if tm.tm_mon == 12 else (tm.tm_year, tm.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0))


class LimitExceeded(TandemError):
    """A rate limit or quota would be exceeded (RESOURCE_EXHAUSTED)."""

    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        scope: str,
        limit_name: str,
        limit: int,
        used: int,
        requested: int,
        reset_at: float,
        retry_after_s: float | None,
        is_quota: bool,
    ) -> None:
        unit = "requests" if limit_name.startswith("requests") else "tokens"
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(reset_at))
        if requested > limit:
            msg = (
                f"{scope}: request needs {requested} {unit}, more than {limit_name}={limit} allows"
            )
        else:
            msg = (
                f"{scope}: {limit_name}={limit} exceeded ({used} used, {requested} "
                f"requested); resets at {when}"
            )
            if retry_after_s is not None:
                msg += f" (retry after {retry_after_s:.0f}s)"
        super().__init__(msg)
        self.scope = scope
        self.limit_name = limit_name
        self.limit = limit
        self.used = used
        self.requested = requested
        self.reset_at = reset_at
        self.retry_after_s = retry_after_s
        self.is_quota = is_quota


class LimitStoreUnavailable(TandemError):
    """The shared limit store cannot be reached and the policy is fail-closed (UNAVAILABLE)."""

    grpc_code = "UNAVAILABLE"


@dataclass(frozen=True)
class Charge:
    """One counter a reservation charged."""

    key: str
    """Counter key (includes the window start, so a settle hits the charged window)."""
    metric: str
    """``requests`` or ``tokens``."""
    amount: int
    """How much was added at reserve time."""
    expire_at: int
    """Unix seconds after which the counter may be dropped (when no check reads it and no
    settle can refund into it any more)."""


@dataclass(frozen=True)
class Reservation:
    """What ``reserve`` charged; pass it to ``settle`` or ``release`` exactly once."""

    id: str
    """Unique id; settling twice with it is a no-op."""
    tokens: int
    """The token estimate reserved."""
    charges: tuple[Charge, ...]
    """Every counter charged (or, when the store failed, that may have been)."""
    uncertain: bool = False
    """The store failed during the reserve, before or after charging (a reply lost to a
    timeout): a shared store settles it in the background, refunding only what was charged."""


def _key(scope: str, metric: str, period: str, start: int) -> str:
    return f"{scope}|{metric}|{period}|{start}"


@dataclass(frozen=True)
class Step:
    """One (scope, limit) check of a reservation, and the counter it charges."""

    scope: Scope
    """Whose limit."""
    name: str
    """The limit's name, e.g. ``tokens_per_minute``."""
    period: str
    """``minute``, ``day`` or ``month``."""
    limit: int
    """The limit's value."""
    charge: Charge
    """The current window's counter and what the request adds to it."""
    start: int
    """Unix seconds at which the current window started."""
    end: int
    """Unix seconds at which the current window ends."""
    previous_key: str
    """The previous window's counter (minute rates); read only, never charged."""
    previous_weight: float
    """The share of the previous window still within the last 60 s; 0 for budgets."""

    def used(self, current: int, previous: int) -> float:
        """What the window holds against the limit, with the previous window weighted."""
        return current + previous * self.previous_weight

    def fits(self, current: int, previous: int) -> bool:
        """Whether the request's charge fits under the limit."""
        return self.used(current, previous) + self.charge.amount <= self.limit


def plan(scopes: Sequence[Scope], tokens: int, now: float, grace_s: int) -> list[Step]:
    """The checks a request of ``tokens`` makes at ``now``, in order."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    out = []
    for scope in scopes:
        for name, metric, period, limit in scope.limits.windows():
            start, end = window_start(period, now), window_end(period, now)
            amount = 1 if metric == REQUESTS else tokens
            key = _key(scope.name, metric, period, start)
            if period == MINUTE:  # slides: the next minute reads this counter too
                previous = _key(scope.name, metric, period, start - 60)
                weight, expire_at = (end - now) / 60, end + 60 + grace_s
            else:
                previous, weight, expire_at = key, 0.0, end + grace_s
            charge = Charge(key, metric, amount, expire_at)
            out.append(Step(scope, name, period, limit, charge, start, end, previous, weight))
    return out


def _retry_after(step: Step, current: int, previous: int, now: float) -> float:
    """Seconds until a minute rate has room for the request, if nothing else arrives."""
    room = step.limit - step.charge.amount
    if current <= room:  # the previous minute's weight has to fall far enough
        at = step.start + 60 * (1 - (room - current) / previous)
    else:  # only once this minute is the previous one, weighing less and less
        at = step.end + 60 * (1 - room / current)
    return max(0.0, at - now)


def exceeded(step: Step, current: int, previous: int, now: float) -> LimitExceeded:
    """The error for a failed check; minute rates get a retry delay, budgets do not."""
    amount, limit = step.charge.amount, step.limit
    used = math.ceil(step.used(current, previous))
    if step.period != MINUTE or amount > limit:
        reset_at: float = step.end
        retry, quota = None, True
    else:
        retry, quota = _retry_after(step, current, previous, now), False
        reset_at = now + retry
    return LimitExceeded(step.scope.name, step.name, limit, used, amount, reset_at, retry, quota)


class Admission(ABC):
    """Reserve-then-settle admission against per-scope limits."""

    blocking: bool = True
    """Whether calls may wait on I/O (a network store): the gateway then runs them on a
    thread; a non-blocking one runs on the event loop, where a thread hop would cost more
    than the work."""

    @abstractmethod
    def reserve(self, scopes: Sequence[Scope], tokens: int) -> Reservation:
        """Check and charge every window of every scope, all or nothing."""

    @abstractmethod
    def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        """Replace the reserved token estimate by the real count; idempotent."""

    @abstractmethod
    def release(self, reservation: Reservation) -> None:
        """Undo a reservation whose request failed before producing any token."""

    def settle_many(self, used: Sequence[tuple[Reservation, int | None]]) -> None:
        """For each ``(reservation, tokens used)``: :meth:`settle` it to the tokens, or
        :meth:`release` it when they are None (a call that failed before it was served: the
        request is not counted either). One store round trip where the store allows (Redis:
        a pipeline); the gateway's settler hands over a batch of calls at once."""
        for reservation, tokens in used:
            if tokens is None:
                self.release(reservation)
            else:
                self.settle(reservation, tokens)

    def close(self) -> None:  # noqa: B027 - a hook: most admissions hold nothing to close
        """Finish background work (the gateway calls it when it stops, after its settles)."""


class InProcessAdmission(Admission):
    """Counters in this process's memory; safe from many threads and asyncio tasks."""

    blocking = False  # a lock and a dict: microseconds

    def __init__(self, clock: Callable[[], float] = time.time, grace_s: int = 120) -> None:
        self._clock = clock
        self._grace_s = grace_s
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, int]] = {}
        self._done: dict[str, int] = {}
        self._next_gc = 0.0

    def _gc(self, now: float) -> None:
        """Drop expired counters and settle markers; a full scan at most once a second."""
        if now < self._next_gc:
            return
        self._next_gc = now + 1.0
        for k in [k for k, (_, exp) in self._counts.items() if exp <= now]:
            del self._counts[k]
        for rid in [r for r, exp in self._done.items() if exp <= now]:
            del self._done[rid]

    def used(self, key: str) -> int:
        """Current value of a counter (0 when absent or expired); for tests and metrics."""
        with self._lock:
            value, exp = self._counts.get(key, (0, 0))
            return value if exp > self._clock() else 0

    def reserve(self, scopes: Sequence[Scope], tokens: int) -> Reservation:
        now = self._clock()
        steps = plan(scopes, tokens, now, self._grace_s)
        with self._lock:
            self._gc(now)
            for step in steps:
                current = self._counts.get(step.charge.key, (0, 0))[0]
                previous = self._counts.get(step.previous_key, (0, 0))[0]
                if not step.fits(current, previous):
                    raise exceeded(step, current, previous, now)
            for step in steps:
                c = step.charge
                self._counts[c.key] = (self._counts.get(c.key, (0, 0))[0] + c.amount, c.expire_at)
        return Reservation(uuid.uuid4().hex, tokens, tuple(s.charge for s in steps))

    def _adjust(self, reservation: Reservation, actual: int, refund_requests: bool) -> None:
        if actual < 0:
            raise ValueError(f"actual_tokens must be >= 0, got {actual}")
        now = self._clock()
        with self._lock:
            if reservation.id in self._done:
                return
            latest = max((c.expire_at for c in reservation.charges), default=int(now) + 1)
            self._done[reservation.id] = latest
            for c in reservation.charges:
                if c.metric == TOKENS:
                    delta = actual - c.amount
                elif refund_requests:
                    delta = -c.amount
                else:
                    continue
                if c.key not in self._counts or self._counts[c.key][1] <= now:
                    continue  # window gone: nothing to refund into
                value, exp = self._counts[c.key]
                self._counts[c.key] = (max(0, value + delta), exp)

    def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        self._adjust(reservation, actual_tokens, refund_requests=False)

    def release(self, reservation: Reservation) -> None:
        self._adjust(reservation, 0, refund_requests=True)
