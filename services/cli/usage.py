"""``tandem usage --target HOST:PORT``: the caller's metered usage, from the gateway's
``tandem.v1.UsageService/GetUsage``, every page followed.

Admins see every team's rows, anyone else only their own (the gateway decides). The
period is a UTC month (default: this one), a UTC day, or ``--from``/``--to``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
from typing import TYPE_CHECKING

from services.cli.target_call import (
    TargetCallFailed,
    add_target_args,
    aligned,
    call_target,
    report,
)
from services.engine.errors import InvalidRequestError

if TYPE_CHECKING:
    import grpc.aio

    from services.stubs.tandem.v1 import admin_pb2

GROUPS = ("team", "principal", "model")
GROUP_BY_CHOICES = (*GROUPS, "day")
"""What --group-by takes: the filterable columns and the UTC day (daily rollups)."""
SUMS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens")
MAX_PAGES = 10_000
"""Pages followed at most (10 M rows): a gateway handing out tokens for ever stops here."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "usage",
        help="show metered token usage from a Tandem gateway",
        description="Sum requests and prompt, completion and cached tokens over a period, "
        "grouped by team, principal and model (or by UTC day), from the gateway at --target "
        "(tandem.v1.UsageService/GetUsage, every page). Admins see everyone's usage; "
        "anyone else only their own.",
    )
    add_target_args(
        parser,
        "the gateway (`tandem up` prints where to connect)",
        30.0,
        "deadline of each page's call in seconds",
    )
    period = parser.add_mutually_exclusive_group()
    period.add_argument("--month", metavar="YYYY-MM", help="a UTC month (default: this one)")
    period.add_argument("--day", metavar="YYYY-MM-DD", help="a UTC day")
    period.add_argument(
        "--from",
        dest="start",
        type=_instant,
        metavar="ISO",
        help="start of a range (ISO 8601, UTC unless it names an offset), with --to",
    )
    parser.add_argument(
        "--to", dest="end", type=_instant, metavar="ISO", help="end of the range (excluded)"
    )
    for name in GROUPS:
        parser.add_argument(f"--{name}", metavar=name.upper(), help=f"only this {name}")
    parser.add_argument(
        "--group-by",
        type=_group_by,
        default=GROUPS,
        metavar="COLS",
        help="comma-separated grouping columns among team, principal, model and day (the "
        "UTC day: e.g. --group-by day,team for a team's usage per day); default "
        "team,principal,model",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"range": {"start", "end"}, "rows": [...]} instead of a table',
    )
    parser.set_defaults(handler=run)


def _instant(text: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _group_by(text: str) -> tuple[str, ...]:
    columns = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in columns if c not in GROUP_BY_CHOICES]
    if not columns or unknown:
        raise argparse.ArgumentTypeError(
            f"choose among {', '.join(GROUP_BY_CHOICES)}; got {text!r}"
        )
    return columns


def usage_request(args: argparse.Namespace) -> admin_pb2.GetUsageRequest:
    """The first page's request the flags describe."""
    from services.stubs.tandem.v1 import admin_pb2

    if (args.start is None) != (args.end is None):
        raise InvalidRequestError("--from/--to", "give both ends of the range, or neither")
    request = admin_pb2.GetUsageRequest(
        team=args.team or "",
        principal=args.principal or "",
        model=args.model or "",
        group_by=[
            admin_pb2.UsageGroupBy.Value(f"USAGE_GROUP_BY_{c.upper()}") for c in args.group_by
        ],
    )
    if args.start is not None:
        request.range.start.FromDatetime(args.start.astimezone(dt.UTC).replace(tzinfo=None))
        request.range.end.FromDatetime(args.end.astimezone(dt.UTC).replace(tzinfo=None))
    elif args.day:
        request.day = args.day
    else:
        request.month = args.month or dt.datetime.now(dt.UTC).strftime("%Y-%m")
    return request


async def all_pages(
    channel: grpc.aio.Channel, request: admin_pb2.GetUsageRequest, timeout_s: float
) -> admin_pb2.GetUsageResponse:
    """Every page of ``request``'s answer, as one response."""
    from services.stubs.tandem.v1 import admin_pb2, admin_pb2_grpc

    stub = admin_pb2_grpc.UsageServiceStub(channel)
    whole = admin_pb2.GetUsageResponse()
    for _ in range(MAX_PAGES):
        page = await stub.GetUsage(request, timeout=timeout_s)
        whole.range.CopyFrom(page.range)
        whole.rows.extend(page.rows)
        if not page.next_page_token:
            return whole
        request.page_token = page.next_page_token
    raise TargetCallFailed("ABORTED", f"more than {MAX_PAGES} pages; narrow the query", True)


def run(args: argparse.Namespace) -> int:
    request = usage_request(args)
    try:
        reply = asyncio.run(call_target(args, lambda ch: all_pages(ch, request, args.timeout)))
    except TargetCallFailed as failed:
        return report(args, failed, about_models=False)
    rows = [_row(r, args.group_by) for r in reply.rows]
    if args.json:
        period = {"start": reply.range.start.ToJsonString(), "end": reply.range.end.ToJsonString()}
        print(json.dumps({"range": period, "rows": rows}))
        return 0
    print(f"usage from {reply.range.start.ToJsonString()} to {reply.range.end.ToJsonString()}")
    print(format_table(rows, args.group_by))
    return 0


def _row(row: admin_pb2.UsageRow, columns: tuple[str, ...]) -> dict[str, object]:
    return {**{c: getattr(row, c) for c in columns}, **{s: getattr(row, s) for s in SUMS}}


def format_table(rows: list[dict[str, object]], columns: tuple[str, ...]) -> str:
    """The rows under a header and above a total line, columns aligned (numbers right)."""
    header = [c.upper() for c in columns] + ["REQUESTS", "PROMPT", "COMPLETION", "CACHED"]
    total = ["total", *[""] * (len(columns) - 1), *(str(sum(r[s] for r in rows)) for s in SUMS)]
    body = [[str(r[k]) for k in (*columns, *SUMS)] for r in rows]
    return aligned([header, *body, total], left=len(columns))
