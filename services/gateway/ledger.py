"""The usage ledger: one row per request, inserted once, summed for usage queries.

``request_id`` is the row's primary key and inserts use ``ON CONFLICT DO NOTHING``, so a
retried settle (the router retrying, a replayed stream end) never counts a request twice:
the first settlement wins and later ones report ``False``. The key is an id the gateway
mints per call, never the client's: a client that reused its own (or another tenant's) id
would otherwise be served without a row. The client's id is kept in ``client_request_id``
for correlation only; :meth:`Ledger.find` looks rows up by it. The metering counters
(:mod:`services.gateway.metrics`) are incremented only when a row is new, after the commit,
so they match the ledger's sums exactly. Usage queries sum rows over a half-open time range
``[start, end)``, grouped by any of team, model, principal, key id and UTC day
(``YYYY-MM-DD``: daily rollups for charge-back), a page at a time when asked (``after`` and
``limit``: keyset pagination on the grouping columns, so pages neither skip nor repeat a
group however rows are added between them).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.engine.errors import InvalidRequestError
from services.gateway.metrics import METRICS, GatewayMetrics
from services.gateway.store import Store, Tx

GROUP_COLUMNS = ("team", "model", "principal", "key_id", "day")
US_PER_DAY = 86_400_000_000
_SQL = {"day": f"(time_us / {US_PER_DAY})"}
"""Grouping columns that are expressions: the UTC day number of a row (integer division in
both SQLite and PostgreSQL; time_us is never negative: checked on insert)."""
_EPOCH = dt.date(1970, 1, 1)


@dataclass(frozen=True)
class UsageRecord:
    """One settled request."""

    request_id: str
    """The gateway's id for the request (minted per call); the ledger's idempotency key."""
    principal: str
    """Who made the request (token subject or ``key:<id>``)."""
    team: str
    """The team charged."""
    model: str
    """The model served."""
    prompt_tokens: int
    """Prompt tokens processed."""
    completion_tokens: int
    """Tokens generated and delivered (a cancelled stream: those actually produced)."""
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (a subset of ``prompt_tokens``)."""
    latency_ms: float = 0.0
    """End-to-end latency as the gateway measured it."""
    outcome: str = "ok"
    """How it ended: ``ok``, ``cancelled``, ``error``, …"""
    key_id: str | None = None
    """The API key used, if any."""
    time: float = field(default_factory=time.time)
    """Settlement time, seconds since the epoch."""
    client_request_id: str = ""
    """The id the client sent, if any: not unique, for correlation only."""


@dataclass(frozen=True)
class UsageTotal:
    """Sums over the rows of one group."""

    group: tuple[tuple[str, str | None], ...]
    """The grouping columns and their values, e.g. ``(("team", "a"), ("model", "m"))``."""
    requests: int
    """Number of requests."""
    prompt_tokens: int
    """Sum of prompt tokens."""
    completion_tokens: int
    """Sum of completion tokens."""
    cached_tokens: int
    """Sum of cached prompt tokens."""

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


class Ledger:
    """Record settled requests and answer usage queries from a :class:`Store`."""

    def __init__(self, store: Store, metrics: GatewayMetrics | None = METRICS) -> None:
        self._store = store
        self._metrics = metrics

    def record(self, rec: UsageRecord) -> bool:
        """Insert the row; True if new, False if this request id was already recorded.

        Only a new row is counted in the metrics: a duplicated settle changes nothing.
        """
        with self._store.transaction() as tx:
            new = self.insert(tx, rec)
        self.count(rec, new)
        return new

    @property
    def store(self) -> Store:
        """The store the rows go to (settles write ledger and audit in one transaction)."""
        return self._store

    def insert(self, tx: Tx, rec: UsageRecord) -> bool:
        """Insert the row inside ``tx`` (uncounted until :meth:`count`); True if new."""
        _check(rec)
        changed = tx.execute(
            "INSERT INTO usage_ledger (request_id, principal, team, key_id, model,"
            " prompt_tokens, completion_tokens, cached_tokens, latency_ms, outcome, time_us,"
            " client_request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (request_id) DO NOTHING",
            (
                rec.request_id,
                rec.principal,
                rec.team,
                rec.key_id,
                rec.model,
                rec.prompt_tokens,
                rec.completion_tokens,
                rec.cached_tokens,
                float(rec.latency_ms),
                rec.outcome,
                round(rec.time * 1e6),
                rec.client_request_id,
            ),
        )
        return changed == 1

    def count(self, rec: UsageRecord, new: bool) -> None:
        """Count a committed row in the metrics, once: only when it was new."""
        if new and self._metrics is not None:
            self._metrics.settled(rec)

    def usage(
        self,
        start: float,
        end: float,
        group_by: Sequence[str] = ("team", "model"),
        *,
        team: str | None = None,
        principal: str | None = None,
        model: str | None = None,
        after: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> tuple[UsageTotal, ...]:
        """Sums over ``[start, end)`` (epoch seconds), grouped by ``group_by``, filtered,
        in order of the grouping columns.

        A page: ``after`` (the grouping values of the last group already read) keeps only
        the groups after it, ``limit`` the first that many. Paging needs grouping columns
        that are never NULL (not ``key_id``), which order totally.
        """
        columns = _check_group_by(group_by)
        exprs = [_SQL.get(c, c) for c in columns]
        where, params = ["time_us >= ?", "time_us < ?"], [round(start * 1e6), round(end * 1e6)]
        for name, value in (("team", team), ("principal", principal), ("model", model)):
            if value is not None:
                where.append(f"{name} = ?")
                params.append(value)
        if after is not None:
            if not columns or "key_id" in columns or len(after) != len(columns):
                raise InvalidRequestError(
                    "after", f"needs one value per grouping column of {columns}, none key_id"
                )
            # Groups are rows' column values: a row-value comparison on the rows keeps
            # exactly the groups ordered after ``after`` (the same collation as ORDER BY).
            names = ", ".join(exprs)
            where.append(f"({names}) > ({', '.join(['?'] * len(columns))})")
            params.extend(_after_value(c, v) for c, v in zip(columns, after, strict=True))
        select = ", ".join([*exprs, "COUNT(*)", *(f"SUM({c})" for c in _SUMMED)])
        sql = f"SELECT {select} FROM usage_ledger WHERE {' AND '.join(where)}"
        if columns:
            order = ", ".join(exprs)
            sql += f" GROUP BY {order} ORDER BY {order}"
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise InvalidRequestError("limit", f"must be an integer >= 1, got {limit!r}")
            sql += " LIMIT ?"
            params.append(limit)
        with self._store.reporting().transaction() as tx:  # never behind the calls' writes
            rows = tx.fetchall(sql, params)
        return tuple(_total(columns, row) for row in rows if row[len(columns)])

    def get(self, request_id: str) -> UsageRecord | None:
        """The row recorded for this request (the gateway's id), or None."""
        with self._store.transaction() as tx:
            row = tx.fetchone(f"{_SELECT_ROW} WHERE request_id = ?", (request_id,))
        return None if row is None else _record(row)

    def find(self, principal: str, client_request_id: str) -> tuple[UsageRecord, ...]:
        """Every row of ``principal`` whose client sent ``client_request_id``, oldest first.

        For support and debugging: a caller knows only its own id, which need not be unique
        (a client may reuse one), so this can return several rows; scoped to one principal so
        one tenant's ids never surface another's rows.
        """
        if not client_request_id:
            raise InvalidRequestError("client_request_id", "must be a non-empty string")
        with self._store.transaction() as tx:
            rows = tx.fetchall(
                f"{_SELECT_ROW} WHERE principal = ? AND client_request_id = ?"
                " ORDER BY time_us, request_id",
                (principal, client_request_id),
            )
        return tuple(_record(row) for row in rows)


_SUMMED = ("prompt_tokens", "completion_tokens", "cached_tokens")
_SELECT_ROW = (
    "SELECT request_id, principal, team, model, prompt_tokens, completion_tokens,"
    " cached_tokens, latency_ms, outcome, key_id, time_us, client_request_id FROM usage_ledger"
)


def _record(row: tuple[object, ...]) -> UsageRecord:
    """A :data:`_SELECT_ROW` row as a record (times are stored in microseconds)."""
    *head, time_us, client_request_id = row
    return UsageRecord(
        *head,  # type: ignore[arg-type]
        time=int(time_us) / 1e6,  # type: ignore[call-overload]
        client_request_id=str(client_request_id or ""),
    )


def _after_value(column: str, value: object) -> str | int:
    """A page's ``after`` value as its column compares: a day as its day number."""
    if column != "day":
        return str(value)
    try:
        return (dt.date.fromisoformat(str(value)) - _EPOCH).days
    except ValueError:
        shown = repr(str(value)[:40])  # bounded: a status message must fit gRPC's metadata
        raise InvalidRequestError("after", f"day must be YYYY-MM-DD, got {shown}") from None


def _group_value(column: str, value: object) -> str | None:
    if value is None:
        return None
    if column == "day":
        return (_EPOCH + dt.timedelta(days=int(value))).isoformat()  # type: ignore[call-overload]
    return str(value)


def _total(columns: tuple[str, ...], row: tuple[object, ...]) -> UsageTotal:
    n = len(columns)
    sums = [int(v or 0) for v in row[n + 1 :]]  # type: ignore[call-overload]
    return UsageTotal(
        group=tuple((c, _group_value(c, v)) for c, v in zip(columns, row[:n], strict=True)),
        requests=int(row[n]),  # type: ignore[call-overload]
        prompt_tokens=sums[0],
        completion_tokens=sums[1],
        cached_tokens=sums[2],
    )


def _check_group_by(group_by: Sequence[str]) -> tuple[str, ...]:
    columns = tuple(group_by)
    for name in columns:
        if name not in GROUP_COLUMNS:
            raise InvalidRequestError("group_by", f"{name!r} is not one of {GROUP_COLUMNS}")
    if len(set(columns)) != len(columns):
        raise InvalidRequestError("group_by", "names a column twice")
    return columns


def _check(rec: UsageRecord) -> None:
    for name in ("request_id", "principal", "team", "model", "outcome"):
        if not getattr(rec, name):
            raise InvalidRequestError(name, "must be a non-empty string")
    for name in ("prompt_tokens", "completion_tokens", "cached_tokens"):
        value = getattr(rec, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidRequestError(name, f"must be an integer >= 0, got {value!r}")
    if rec.cached_tokens > rec.prompt_tokens:
        raise InvalidRequestError("cached_tokens", "cannot exceed prompt_tokens")
    if rec.latency_ms < 0:
        raise InvalidRequestError("latency_ms", "must be >= 0")
    if rec.time < 0:  # day groups divide time_us, which truncates differently below zero
        raise InvalidRequestError("time", "must be >= 0 (seconds since 1970)")
