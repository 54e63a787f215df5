"""tandem.v1.UsageService on a real gateway: exact sums, periods, and who may see what."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import grpc

from services.gateway.api_keys import ApiKeys
from services.gateway.ledger import Ledger, UsageRecord
from services.gateway.store import Store
from services.stubs.tandem.v1 import admin_pb2
from tests.gateway.issuer import Issuer
from tests.gateway.mgmt import call, error_reason, field_violations, management

DAY = dt.datetime(2025, 3, 14, tzinfo=dt.UTC).timestamp()
HOUR = 3600.0


def seed(store: Store, key_principal: str) -> None:
    """Rows on 2025-03-14 (and one the day before, one in April) for three principals."""
    rows = [
        # (principal, team, model, prompt, completion, cached, time)
        ("ann", "ml", "m1", 10, 5, 4, DAY + 1 * HOUR),
        ("ann", "ml", "m1", 20, 7, 0, DAY + 2 * HOUR),
        ("ann", "ml", "m2", 3, 1, 0, DAY + 3 * HOUR),
        ("bob", "ml", "m1", 100, 50, 10, DAY + 4 * HOUR),
        (key_principal, "apps", "m1", 8, 8, 0, DAY + 5 * HOUR),
        ("ann", "ml", "m1", 1000, 1000, 0, DAY - 1),  # 2025-03-13 23:59:59
        ("bob", "ml", "m1", 7, 7, 0, dt.datetime(2025, 4, 1, tzinfo=dt.UTC).timestamp()),
    ]
    ledger = Ledger(store)
    for i, (who, team, model, p, c, cached, t) in enumerate(rows):
        ledger.record(UsageRecord(f"r{i}", who, team, model, p, c, cached_tokens=cached, time=t))


def rows(response: admin_pb2.GetUsageResponse) -> list[tuple]:
    return [
        (r.team, r.principal, r.model, r.requests, r.prompt_tokens, r.completion_tokens,
         r.cached_tokens)
        for r in response.rows
    ]  # fmt: skip


def test_admin_sees_every_principal_grouped(tmp_path: Path, store_url: str) -> None:
    async def body() -> None:
        async with management(tmp_path, store_url) as m:
            seed(m.store, "key:0123456789abcdef")
            admin = m.admin_key()
            answer, code, _, _ = await call(
                m.usage.GetUsage, admin_pb2.GetUsageRequest(day="2025-03-14"), admin
            )
            assert code == grpc.StatusCode.OK
            assert rows(answer) == [
                ("apps", "key:0123456789abcdef", "m1", 1, 8, 8, 0),
                ("ml", "ann", "m1", 2, 30, 12, 4),
                ("ml", "ann", "m2", 1, 3, 1, 0),
                ("ml", "bob", "m1", 1, 100, 50, 10),
            ]
            assert answer.range.start.ToSeconds() == DAY
            assert answer.range.end.ToSeconds() == DAY + 24 * HOUR

            by_model = admin_pb2.GetUsageRequest(
                month="2025-03", team="ml", group_by=[admin_pb2.USAGE_GROUP_BY_MODEL]
            )
            answer, code, _, _ = await call(m.usage.GetUsage, by_model, admin)
            assert rows(answer) == [("", "", "m1", 4, 1130, 1062, 14), ("", "", "m2", 1, 3, 1, 0)]

            # [start, end) is half-open: a row exactly at `end` is not counted
            window = admin_pb2.GetUsageRequest(principal="ann")
            window.range.start.FromSeconds(int(DAY + 1 * HOUR))
            window.range.end.FromSeconds(int(DAY + 3 * HOUR))
            answer, code, _, _ = await call(m.usage.GetUsage, window, admin)
            assert rows(answer) == [("ml", "ann", "m1", 2, 30, 12, 4)]
            assert m.audit()[-1].reason.startswith("GetUsage: ")

    asyncio.run(body())


def test_daily_rollups_group_by_utc_day(tmp_path: Path, store_url: str) -> None:
    """group_by DAY: one row per UTC day (and team), the day in UsageRow.day."""

    async def body() -> None:
        async with management(tmp_path, store_url) as m:
            seed(m.store, "key:0123456789abcdef")
            admin = m.admin_key()
            daily = admin_pb2.GetUsageRequest(
                month="2025-03",
                group_by=[admin_pb2.USAGE_GROUP_BY_DAY, admin_pb2.USAGE_GROUP_BY_TEAM],
            )
            answer, code, _, _ = await call(m.usage.GetUsage, daily, admin)
            assert code == grpc.StatusCode.OK
            assert [
                (r.day, r.team, r.principal, r.requests, r.prompt_tokens) for r in answer.rows
            ] == [
                ("2025-03-13", "ml", "", 1, 1000),  # 23:59:59 the day before
                ("2025-03-14", "apps", "", 1, 8),
                ("2025-03-14", "ml", "", 4, 133),
            ]
            # One row per page: the page token carries the day across pages.
            paged, request = [], admin_pb2.GetUsageRequest()
            request.CopyFrom(daily)
            request.page_size = 1
            while True:
                answer, code, _, _ = await call(m.usage.GetUsage, request, admin)
                assert code == grpc.StatusCode.OK
                paged += [(r.day, r.team) for r in answer.rows]
                if not answer.next_page_token:
                    break
                request.page_token = answer.next_page_token
            assert paged == [("2025-03-13", "ml"), ("2025-03-14", "apps"), ("2025-03-14", "ml")]

    asyncio.run(body())


def test_a_member_sees_only_its_own_usage(tmp_path: Path, store_url: str, issuer: Issuer) -> None:
    async def body() -> None:
        async with management(tmp_path, store_url, issuer) as m:
            seed(m.store, "key:0123456789abcdef")
            ann = issuer.mint(realm_roles=["model-user"], groups=["/ml"], sub="ann")
            for request in (
                admin_pb2.GetUsageRequest(day="2025-03-14"),
                admin_pb2.GetUsageRequest(day="2025-03-14", team="ml"),
                admin_pb2.GetUsageRequest(day="2025-03-14", principal="ann"),
            ):
                answer, code, _, _ = await call(m.usage.GetUsage, request, ann)
                assert code == grpc.StatusCode.OK
                assert rows(answer) == [
                    ("ml", "ann", "m1", 2, 30, 12, 4),
                    ("ml", "ann", "m2", 1, 3, 1, 0),
                ]
            for request in (
                admin_pb2.GetUsageRequest(day="2025-03-14", principal="bob"),
                admin_pb2.GetUsageRequest(day="2025-03-14", team="apps"),
            ):
                _, code, status, _ = await call(m.usage.GetUsage, request, ann)
                assert code == grpc.StatusCode.PERMISSION_DENIED
                assert error_reason(status) == "USAGE_NOT_OWN"
            assert [e.decision for e in m.audit()] == ["allow"] * 3 + ["deny"] * 2

    asyncio.run(body())


def test_an_api_key_sees_its_own_rows(tmp_path: Path, store_url: str) -> None:
    async def body() -> None:
        async with management(tmp_path, store_url) as m:
            minted = ApiKeys(m.store).mint("apps", ["m1"])
            seed(m.store, f"key:{minted.key.key_id}")
            request = admin_pb2.GetUsageRequest(month="2025-03")
            answer, code, _, _ = await call(m.usage.GetUsage, request, minted.secret)
            assert code == grpc.StatusCode.OK
            assert rows(answer) == [("apps", f"key:{minted.key.key_id}", "m1", 1, 8, 8, 0)]

    asyncio.run(body())


def test_bad_periods_and_groupings_are_invalid_argument(tmp_path: Path, store_url: str) -> None:
    async def body() -> None:
        async with management(tmp_path, store_url) as m:
            admin = m.admin_key()
            backwards = admin_pb2.GetUsageRequest()
            backwards.range.start.FromSeconds(200)
            backwards.range.end.FromSeconds(100)
            twice = admin_pb2.GetUsageRequest(
                day="2025-01-01",
                group_by=[admin_pb2.USAGE_GROUP_BY_TEAM, admin_pb2.USAGE_GROUP_BY_TEAM],
            )
            past_the_calendar = admin_pb2.GetUsageRequest()
            past_the_calendar.range.start.FromSeconds(0)
            past_the_calendar.range.end.seconds = 2**62
            cases = [
                (admin_pb2.GetUsageRequest(), "period"),
                (admin_pb2.GetUsageRequest(day="2025-13-01"), "day"),
                (admin_pb2.GetUsageRequest(month="March"), "month"),
                (backwards, "range"),
                (twice, "group_by[1]"),
                # the calendar's last day and month: were UNKNOWN (OverflowError)
                (admin_pb2.GetUsageRequest(day="9999-12-31"), "day"),
                (admin_pb2.GetUsageRequest(month="9999-12"), "month"),
                (past_the_calendar, "range"),
                # filters land in the append-only audit log: an 8 MB one made an 8 MB record
                (admin_pb2.GetUsageRequest(day="2025-01-01", model="m" * 257), "model"),
                (admin_pb2.GetUsageRequest(day="2025-01-01", team="t" * 8_000_000), "team"),
                (admin_pb2.GetUsageRequest(day="2025-01-01", principal="a\x00b"), "principal"),
            ]
            for request, field in cases:
                before = len(m.audit())
                _, code, status, message = await call(m.usage.GetUsage, request, admin)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, field
                assert field_violations(status) == [field] and field in message
                [record] = m.audit()[before:]  # every refused query leaves one record
                assert record.decision == "deny"
                assert record.reason == f"GetUsage: invalid argument ({field})"
            _, code, _, _ = await call(m.usage.GetUsage, admin_pb2.GetUsageRequest(), None)
            assert code == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(body())
