"""The gateway's ``tandem.v1.UsageService``: sums of metered tokens from the ledger.

Who sees what (also in admin.proto): an admin (the policy's admin role) sees every row. Any
other caller sees only rows whose principal is itself — a token's subject, or ``key:<id>``
for an API key. Team membership alone does not open colleagues' usage: a token's groups are
managed in Keycloak for access, not for reading others' consumption, and a team lead who
needs team totals gets an admin key or role. A non-admin that filters on another principal,
or on a team it is not in, is told PERMISSION_DENIED (not an empty answer, which would read
as "no usage").

The period is a UTC ``day`` ("YYYY-MM-DD"), a UTC ``month`` ("YYYY-MM") or a ``range``
[start, end); exactly one is required, and it covers at most ``max_period_days`` (366 by
default: GatewayConfig.usage_max_period_days), because each page of a report sums every
ledger row of its period. Rows group by team, principal and model unless ``group_by`` says
otherwise; DAY groups by UTC day (``UsageRow.day``, "YYYY-MM-DD"), for daily rollups.
Every answered or refused query (each page) leaves one audit record.

Pages (AIP-158): at most ``page_size`` rows (0 → PAGE_SIZE_MAX, more → PAGE_SIZE_MAX,
negative → INVALID_ARGUMENT), and ``next_page_token`` while more follow. A token holds the
grouping values of the page's last row (the next page is the groups ordered after it: keyset
pagination, no offsets, so nothing is skipped or repeated) and a digest binding it to the
request (filters, resolved period, grouping) and the caller; a token presented with anything
else, or altered, is INVALID_ARGUMENT naming ``page_token``. The digest is not a secret MAC
(replicas share no key): it refuses mistakes and edits, not a deliberate forgery. A forged
token can only start a page elsewhere in the caller's own report, since who sees what is
checked on every page regardless of the token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import calendar
import datetime as dt
import hashlib
import json
from collections.abc import Awaitable, Callable

import grpc.aio

from services.engine.errors import TandemError
from services.gateway.auth import Identity
from services.gateway.call_auth import CallGuard, abort_error
from services.gateway.ledger import Ledger, UsageTotal
from services.gateway.policy import Policy
from services.stubs.tandem.v1 import admin_pb2, admin_pb2_grpc

_GROUP_COLUMNS = {
    admin_pb2.USAGE_GROUP_BY_TEAM: "team",
    admin_pb2.USAGE_GROUP_BY_PRINCIPAL: "principal",
    admin_pb2.USAGE_GROUP_BY_MODEL: "model",
    admin_pb2.USAGE_GROUP_BY_DAY: "day",
}
DEFAULT_GROUP_BY = ("team", "principal", "model")


class BadRequest(Exception):
    """A request field is invalid: ``field`` and ``description`` go into BadRequest."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


def period(request: admin_pb2.GetUsageRequest) -> tuple[float, float]:
    """The request's [start, end) in epoch seconds; BadRequest names the bad field."""
    which = request.WhichOneof("period")
    if which == "day":
        try:
            day = dt.datetime.strptime(request.day, "%Y-%m-%d").replace(tzinfo=dt.UTC)
        except ValueError:
            raise BadRequest("day", f"must be YYYY-MM-DD, got {request.day[:40]!r}") from None
        return _span(day, dt.timedelta(days=1), "day")
    if which == "month":
        try:
            first = dt.datetime.strptime(request.month, "%Y-%m").replace(tzinfo=dt.UTC)
        except ValueError:
            raise BadRequest("month", f"must be YYYY-MM, got {request.month[:40]!r}") from None
        days = calendar.monthrange(first.year, first.month)[1]
        return _span(first, dt.timedelta(days=days), "month")
    if which == "range":
        if not request.range.HasField("start") or not request.range.HasField("end"):
            raise BadRequest("range", "needs both start and end")
        try:
            start = request.range.start.ToMicroseconds() / 1e6
            end = request.range.end.ToMicroseconds() / 1e6
        except ValueError as exc:  # protobuf refuses a Timestamp past year 9999
            raise BadRequest("range", f"not a valid timestamp ({exc})") from None
        if not start < end:
            if start == end:
                raise BadRequest("range", "start equals end: the range [start, end) is empty")
            end_s, start_s = request.range.end.ToJsonString(), request.range.start.ToJsonString()
            raise BadRequest("range", f"end ({end_s}) is before start ({start_s}): swap them")
        return start, end
    raise BadRequest("period", "set exactly one of range, day (YYYY-MM-DD) or month (YYYY-MM)")


MAX_PERIOD_DAYS = 366
"""Default of the longest period one GetUsage request may cover (a leap year)."""


def check_period_length(
    request: admin_pb2.GetUsageRequest, start: float, end: float, max_days: int
) -> None:
    """BadRequest, naming the period's field, when [start, end) is longer than ``max_days``:
    every page of a report sums all of its period's ledger rows."""
    if end - start > max_days * 86400:
        field = request.WhichOneof("period") or "period"
        raise BadRequest(
            field,
            f"covers {(end - start) / 86400:.6g} days, more than the {max_days} one request "
            "may cover: split the period into several requests",
        )


def _span(start: dt.datetime, length: dt.timedelta, field: str) -> tuple[float, float]:
    """[start, start + length) in epoch seconds; BadRequest past the calendar's end."""
    try:
        return start.timestamp(), (start + length).timestamp()
    except OverflowError:
        raise BadRequest(field, "must end before the year 10000") from None


def group_columns(request: admin_pb2.GetUsageRequest) -> tuple[str, ...]:
    """The ledger columns to group by; BadRequest for an unknown or repeated value."""
    if not request.group_by:
        return DEFAULT_GROUP_BY
    columns = []
    for i, value in enumerate(request.group_by):
        column = _GROUP_COLUMNS.get(value)
        if column is None:
            raise BadRequest(
                f"group_by[{i}]", f"must be TEAM, PRINCIPAL, MODEL or DAY, got {value}"
            )
        if column in columns:
            raise BadRequest(f"group_by[{i}]", f"{column} is named twice")
        columns.append(column)
    return tuple(columns)


FILTER_MAX = 256
"""Longest team, principal or model filter: each is echoed in refusals and audit records."""


def check_filters(request: admin_pb2.GetUsageRequest) -> None:
    """BadRequest unless every filter is printable and at most FILTER_MAX characters: they
    go into the append-only audit log, which a caller could otherwise fill with
    megabyte-sized records (and a refusal's status would outgrow its metadata)."""
    for name in ("team", "principal", "model"):
        value = getattr(request, name)
        if len(value) > FILTER_MAX or not value.isprintable():
            raise BadRequest(name, f"must be printable and at most {FILTER_MAX} characters")


PAGE_SIZE_MAX = 1000
"""Most rows in one response; also the size of a page that asks for none (page_size 0)."""


def page_size(request: admin_pb2.GetUsageRequest) -> int:
    """The rows to return: 0 → PAGE_SIZE_MAX, larger → PAGE_SIZE_MAX (AIP-158 coerces)."""
    if request.page_size < 0:
        raise BadRequest("page_size", f"must be >= 0, got {request.page_size}")
    return min(request.page_size or PAGE_SIZE_MAX, PAGE_SIZE_MAX)


PAGE_TOKEN_MAX = 65536
"""Longest page token accepted: three grouping values (a principal is a token's subject, as
long as the identity provider makes it), JSON in base64."""
_TOKEN_VERSION = 1


def _query_digest(
    caller: str,
    request: admin_pb2.GetUsageRequest,
    start: float,
    end: float,
    columns: tuple[str, ...],
    after: list[str],
) -> str:
    """What a page token is bound to: the caller, the request's filters, its resolved period
    and grouping (not page_size, which may change between pages), and the position."""
    query = [
        _TOKEN_VERSION,
        caller,
        request.team,
        request.principal,
        request.model,
        round(start * 1e6),
        round(end * 1e6),
        list(columns),
        after,
    ]
    canonical = json.dumps(query, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(b"tandem.v1.GetUsage page\0" + canonical.encode()).hexdigest()[:32]


def encode_page_token(
    caller: str,
    request: admin_pb2.GetUsageRequest,
    start: float,
    end: float,
    columns: tuple[str, ...],
    last: UsageTotal,
) -> str:
    """The token of the page that follows ``last`` (the page's last row)."""
    after = [value or "" for _, value in last.group]
    digest = _query_digest(caller, request, start, end, columns, after)
    body = {"v": _TOKEN_VERSION, "after": after, "q": digest}
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_page_token(
    caller: str,
    request: admin_pb2.GetUsageRequest,
    start: float,
    end: float,
    columns: tuple[str, ...],
) -> list[str] | None:
    """The grouping values to page after, None for a first page; BadRequest naming
    ``page_token`` for a token that is malformed, altered or issued for another request or
    caller."""
    token = request.page_token
    if not token:
        return None
    foreign = BadRequest(
        "page_token",
        "is not a next_page_token of this request (same filters, period and grouping) "
        "and caller: send the first page's request again without it",
    )
    if len(token) > PAGE_TOKEN_MAX:
        raise foreign
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw.decode())
    except (binascii.Error, ValueError):  # UnicodeDecodeError and JSONDecodeError included
        raise foreign from None
    if not isinstance(body, dict) or body.get("v") != _TOKEN_VERSION:
        raise foreign
    after = body.get("after")
    if (
        not isinstance(after, list)
        or len(after) != len(columns)
        or not all(isinstance(v, str) for v in after)
        or body.get("q") != _query_digest(caller, request, start, end, columns, after)
        or not all(_is_day(v) for c, v in zip(columns, after, strict=True) if c == "day")
    ):
        # The digest is no MAC (anyone can compute one): what a token says is checked as
        # any input is, so a forged one is refused here, audited, and never echoed.
        raise foreign
    return after


def _is_day(value: str) -> bool:
    """Whether ``value`` is a day as a page token carries it (YYYY-MM-DD)."""
    try:
        return dt.date.fromisoformat(value).isoformat() == value
    except ValueError:
        return False


def usage_row(total: UsageTotal) -> admin_pb2.UsageRow:
    groups = {name: value or "" for name, value in total.group}
    return admin_pb2.UsageRow(
        **groups,
        requests=total.requests,
        prompt_tokens=total.prompt_tokens,
        completion_tokens=total.completion_tokens,
        cached_tokens=total.cached_tokens,
    )


class UsageService(admin_pb2_grpc.UsageServiceServicer):
    """Usage queries; see the module docstring."""

    def __init__(
        self,
        guard: CallGuard,
        policy: Policy,
        ledger: Ledger,
        settled: Callable[[], Awaitable[None]] | None = None,
        max_period_days: int = MAX_PERIOD_DAYS,
    ) -> None:
        if max_period_days < 1:
            raise ValueError(f"max_period_days must be >= 1, got {max_period_days}")
        self._guard = guard
        self._policy = policy
        self._ledger = ledger
        self._max_period_days = max_period_days
        self._settled = settled
        """Waits for this replica's calls still being settled (the ledger is written after
        a call ends: services/gateway/settler.py), so a caller reads its own usage."""

    async def _scope(
        self, context: grpc.aio.ServicerContext, who: Identity, request: admin_pb2.GetUsageRequest
    ) -> str | None:
        """The principal to restrict the query to (None: no restriction, an admin)."""
        if self._policy.is_admin(who.caller):
            return request.principal or None
        if request.principal and request.principal != who.principal:
            await self._guard.deny(
                context,
                who,
                "GetUsage",
                f"{who.principal} may only read its own usage, not {request.principal!r}'s",
                "USAGE_NOT_OWN",
                {"principal": request.principal},
            )
        if request.team and request.team not in who.caller.teams:
            await self._guard.deny(
                context,
                who,
                "GetUsage",
                f"{who.principal} is not in team {request.team!r}",
                "USAGE_NOT_OWN",
                {"team": request.team},
            )
        return who.principal

    async def GetUsage(
        self, request: admin_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetUsageResponse:
        who = await self._guard.authenticate(context, "GetUsage")
        try:
            check_filters(request)
            start, end = period(request)
            check_period_length(request, start, end, self._max_period_days)
            columns = group_columns(request)
            size = page_size(request)
            after = decode_page_token(who.principal, request, start, end, columns)
        except BadRequest as exc:
            violations = [(exc.field, exc.description)]
            message = f"invalid GetUsageRequest: {exc}"
            await self._guard.invalid(context, who, "GetUsage", message, violations)
        principal = await self._scope(context, who, request)
        if self._settled is not None:
            await self._settled()
        try:
            totals = await asyncio.to_thread(
                self._ledger.usage,
                start,
                end,
                columns,
                team=request.team or None,
                principal=principal,
                model=request.model or None,
                after=after,
                limit=size + 1,  # one more than the page: is there a next one?
            )
        except TandemError as exc:
            await abort_error(context, exc)
        reason = (
            f"GetUsage: [{int(start)}, {int(end)}) team={request.team or '*'} "
            f"principal={principal or '*'} model={request.model or '*'}"
            + (" (a next page)" if after is not None else "")
        )
        await self._guard.record(context, self._guard.event(context, who, "allow", reason))
        page = totals[:size]
        response = admin_pb2.GetUsageResponse(rows=[usage_row(t) for t in page])
        if len(totals) > size:
            response.next_page_token = encode_page_token(
                who.principal, request, start, end, columns, page[-1]
            )
        response.range.start.FromMicroseconds(round(start * 1e6))
        response.range.end.FromMicroseconds(round(end * 1e6))
        return response
