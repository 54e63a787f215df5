"""`tandem usage --target`: GetUsage through a real gateway and its store, every page
followed, as a table or JSON; the period and grouping flags become the request."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest

from services.cli.main import build_parser, main
from services.cli.usage import format_table, usage_request
from services.gateway.api_keys import ApiKeys
from services.gateway.usage_service import PAGE_SIZE_MAX
from tests.gateway.mgmt import management
from tests.gateway.test_usage_pages import seed, unpaged


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["usage", "--target", "h:1", *argv])


def test_flags_become_the_request() -> None:
    assert usage_request(_args("--month", "2025-03")).month == "2025-03"
    assert usage_request(_args("--day", "2025-03-14")).day == "2025-03-14"
    ranged = usage_request(_args("--from", "2025-03-14T01:00", "--to", "2025-03-15", "--team", "t"))
    assert ranged.range.start.ToJsonString() == "2025-03-14T01:00:00Z"
    assert ranged.range.end.ToJsonString() == "2025-03-15T00:00:00Z"
    assert ranged.team == "t" and list(ranged.group_by) == [1, 2, 3]
    assert list(usage_request(_args("--group-by", "model,team")).group_by) == [3, 1]
    assert list(usage_request(_args("--group-by", "day,team")).group_by) == [4, 1]
    assert usage_request(_args()).WhichOneof("period") == "month"  # this month by default


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--from", "2025-03-14"], "--from/--to: give both ends of the range, or neither"),
        (["--group-by", "team,region"], "choose among team, principal, model, day"),
        (["--from", "yesterday", "--to", "2025-03-15"], "not an ISO 8601 date or time"),
        (["--month", "2025-03", "--day", "2025-03-14"], "not allowed with argument"),
    ],
)
def test_bad_flags_are_usage_errors(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["usage", "--target", "127.0.0.1:1", *argv]) == 2
    assert says in capsys.readouterr().err


def test_the_table_totals_its_rows() -> None:
    sums = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens")
    rows = [
        {"model": "m1", **dict(zip(sums, (2, 10, 5, 0), strict=True))},
        {"model": "m22", **dict(zip(sums, (1, 100, 50, 64), strict=True))},
    ]
    assert format_table(rows, ("model",)).splitlines() == [
        "MODEL  REQUESTS  PROMPT  COMPLETION  CACHED",
        "m1            2      10           5       0",
        "m22           1     100          50      64",
        "total         3     110          55      64",
    ]


def test_every_page_is_followed_through_a_real_gateway(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def body() -> None:  # SQLite: the paging itself is tested on both stores
        async with management(tmp_path, f"sqlite:{tmp_path / 'gateway.db'}") as m:
            seed(m.store, "ann", PAGE_SIZE_MAX + 300)
            argv = ["usage", "--target", m.gateway.address, "--day", "2025-03-14", "--json"]
            argv += ["--api-key", m.admin_key()]
            assert await asyncio.to_thread(main, argv) == 0  # main runs its own event loop
            report = json.loads(capsys.readouterr().out)
            got = [
                (r["team"], r["principal"], r["model"], r["requests"], r["prompt_tokens"],
                 r["completion_tokens"])
                for r in report["rows"]
            ]  # fmt: skip
            assert got == unpaged(m.store)  # 1,300 groups: two pages, in order, none twice
            assert report["range"] == {
                "start": "2025-03-14T00:00:00Z",
                "end": "2025-03-15T00:00:00Z",
            }
            # a member asking for another's rows: PERMISSION_DENIED, no models hint
            member_key = ApiKeys(m.store).mint("ml", ["m1"]).secret
            member = ["--principal", "someone-else", "--api-key", member_key]
            denied = await asyncio.to_thread(main, [*argv[:5], *member])
            err = capsys.readouterr().err
            assert denied == 1 and err.startswith("error: PERMISSION_DENIED") and "hint" not in err

    asyncio.run(body())
