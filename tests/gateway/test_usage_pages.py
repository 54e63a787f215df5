"""GetUsage a page at a time, and its period cap, on a real gateway over SQLite and PostgreSQL.

Thousands of groups are seeded straight into the store in one transaction (seconds); pages
are compared with the same report read unpaged from the ledger, which is the order the
database's collation gives (PostgreSQL's is not bytewise: mixed case and accents included).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

import grpc

from services.gateway.api_keys import ApiKeys
from services.gateway.ledger import Ledger, UsageRecord, UsageTotal
from services.gateway.store import Store
from services.gateway.usage_service import PAGE_SIZE_MAX, encode_page_token, period
from services.stubs.tandem.v1 import admin_pb2
from tests.gateway.issuer import Issuer
from tests.gateway.mgmt import Mgmt, call, field_violations, management

DAY = dt.datetime(2025, 3, 14, tzinfo=dt.UTC).timestamp()
NAMES = ["a", "A", "a b", "ab", "Ab", "ä", "b", "_z", "z"]
"""Values whose order differs between bytewise and linguistic collations."""


def seed(store: Store, principal: str, groups: int, start: int = 0) -> list[UsageRecord]:
    """One row per group (team, principal, model) on DAY, plus a second row in every
    seventh group; all in one transaction."""
    ledger = Ledger(store, metrics=None)
    recs = []
    for i in range(start, start + groups):
        team = f"{NAMES[i % len(NAMES)]}-{i % 7}"
        model = f"{NAMES[(i // 7) % len(NAMES)]}{i:05d}"
        for j in range(2 if i % 7 == 0 else 1):
            recs.append(
                UsageRecord(
                    f"{principal}-{i}-{j}", principal, team, model, i % 50 + 1, j + 1,
                    time=DAY + (i * 7 + j) % 86_000,
                )
            )  # fmt: skip
    with store.transaction() as tx:
        for rec in recs:
            ledger.insert(tx, rec)
    return recs


def row(r: admin_pb2.UsageRow) -> tuple[Any, ...]:
    return (r.team, r.principal, r.model, r.requests, r.prompt_tokens, r.completion_tokens)


def unpaged(store: Store, **filters: str) -> list[tuple[Any, ...]]:
    """The whole report, read from the ledger in one query (the database's order)."""
    totals = Ledger(store, metrics=None).usage(
        DAY, DAY + 86400, ("team", "principal", "model"), **filters
    )
    return [
        (*(v for _, v in t.group), t.requests, t.prompt_tokens, t.completion_tokens) for t in totals
    ]


async def pages(
    m: Mgmt, request: admin_pb2.GetUsageRequest, credential: str
) -> list[list[tuple[Any, ...]]]:
    """Every page of ``request``, following next_page_token to the last (empty) one."""
    out: list[list[tuple[Any, ...]]] = []
    token = ""
    while True:
        paged = admin_pb2.GetUsageRequest()
        paged.CopyFrom(request)
        paged.page_token = token
        answer, code, _, message = await call(m.usage.GetUsage, paged, credential)
        assert code == grpc.StatusCode.OK, message
        out.append([row(r) for r in answer.rows])
        token = answer.next_page_token
        if not token:
            return out
        assert len(out) < 100, "pages never end"


def test_pages_cover_every_group_once_in_order(tmp_path: Path, store_url: str) -> None:
    async def body() -> None:
        async with management(tmp_path, store_url) as m:
            recs = seed(m.store, "ann", 2300) + seed(m.store, "bob", 400)
            admin = m.admin_key()
            expected = unpaged(m.store)
            assert len(expected) == 2700
            sums: dict[tuple[str, str, str], list[int]] = {}
            for rec in recs:
                s = sums.setdefault((rec.team, rec.principal, rec.model), [0, 0, 0])
                for k, v in enumerate((1, rec.prompt_tokens, rec.completion_tokens)):
                    s[k] += v
            assert sorted(expected) == sorted((*k, *v) for k, v in sums.items())

            day = admin_pb2.GetUsageRequest(day="2025-03-14")
            got = await pages(m, day, admin)  # page_size 0: the maximum
            assert [len(p) for p in got] == [PAGE_SIZE_MAX, PAGE_SIZE_MAX, 700]
            assert [r for p in got for r in p] == expected

            # an exact multiple: the last full page still says whether more follow
            day.page_size = 900
            got = await pages(m, day, admin)
            assert [len(p) for p in got] == [900, 900, 900]
            assert [r for p in got for r in p] == expected

            day.page_size = 1
            first, code, _, _ = await call(m.usage.GetUsage, day, admin)
            assert code == grpc.StatusCode.OK and [row(r) for r in first.rows] == expected[:1]
            # page_size may change between pages; more than the maximum is the maximum
            nxt = admin_pb2.GetUsageRequest(
                day="2025-03-14", page_size=5000, page_token=first.next_page_token
            )
            answer, code, _, _ = await call(m.usage.GetUsage, nxt, admin)
            assert [row(r) for r in answer.rows] == expected[1 : 1 + PAGE_SIZE_MAX]
            assert answer.next_page_token
            assert m.audit()[-1].reason.endswith("(a next page)")

            by_model = admin_pb2.GetUsageRequest(
                day="2025-03-14", group_by=[admin_pb2.USAGE_GROUP_BY_MODEL], page_size=999
            )
            got = await pages(m, by_model, admin)
            models = [r[2] for p in got for r in p]
            assert len(models) == len(set(models)) == len({rec.model for rec in recs})

    asyncio.run(body())


def test_rows_added_between_pages_are_never_repeated(tmp_path: Path, store_url: str) -> None:
    async def body() -> None:
        async with management(tmp_path, store_url) as m:
            seed(m.store, "ann", 1500)
            admin = m.admin_key()
            request = admin_pb2.GetUsageRequest(day="2025-03-14", page_size=1000)
            first, _, _, _ = await call(m.usage.GetUsage, request, admin)
            # more usage lands in groups already read, and in new groups on both sides
            seed(m.store, "ann", 100)  # the same request ids: ignored
            Ledger(m.store, metrics=None).record(
                UsageRecord("late", "ann", first.rows[0].team, first.rows[0].model, 1, 1,
                            time=DAY + 5)
            )  # fmt: skip
            seed(m.store, "zed", 10)
            request.page_token = first.next_page_token
            second, code, _, _ = await call(m.usage.GetUsage, request, admin)
            assert code == grpc.StatusCode.OK and not second.next_page_token
            read = [row(r)[:3] for r in (*first.rows, *second.rows)]
            assert len(read) == len(set(read))
            # new groups ordered before the first page's last row are not in this report;
            # every group after it is, once
            full = [r[:3] for r in unpaged(m.store)]
            cut = full.index(row(first.rows[-1])[:3]) + 1
            assert 0 < sum(g[1] == "zed" for g in full[:cut]) < 10
            assert read == [g for g in full[:cut] if g[1] != "zed"] + full[cut:]

    asyncio.run(body())


def _reencode(token: str, edit: Any) -> str:
    body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    edit(body)
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


def test_a_token_from_another_request_or_caller_is_refused(tmp_path: Path, store_url: str) -> None:
    async def body() -> None:
        async with management(tmp_path, store_url) as m:
            seed(m.store, "ann", 30)
            admin, other_admin = m.admin_key(), m.admin_key()
            first, _, _, _ = await call(
                m.usage.GetUsage, admin_pb2.GetUsageRequest(day="2025-03-14", page_size=10), admin
            )
            token = first.next_page_token
            assert token

            def after_z(body: dict[str, Any]) -> None:
                body["after"] = ["z", "ann", "z"]

            def same(**kw: Any) -> admin_pb2.GetUsageRequest:
                return admin_pb2.GetUsageRequest(**{"day": "2025-03-14", "page_token": token, **kw})

            foreign = [
                (same(day="2025-03-15"), admin),
                (same(day="", month="2025-03"), admin),
                (same(team="a-0"), admin),
                (same(principal="ann"), admin),
                (same(model="a00000"), admin),
                (same(group_by=[admin_pb2.USAGE_GROUP_BY_MODEL]), admin),
                (same(), other_admin),  # another caller, even one that may see the rows
                (same(page_token=token[:-2]), admin),
                (same(page_token=token + "A"), admin),
                (same(page_token=_reencode(token, after_z)), admin),  # moved, digest kept
                (same(page_token="not a token"), admin),
                (same(page_token=base64.urlsafe_b64encode(b"\xff\xfe[1]").decode()), admin),
                (same(page_token="eyJ2IjoxfQ"), admin),  # {"v":1}
                (same(page_token="x" * 100_000), admin),
            ]
            for request, credential in foreign:
                before = len(m.audit())
                _, code, status, message = await call(m.usage.GetUsage, request, credential)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, request
                assert field_violations(status) == ["page_token"] and "page_token" in message
                [record] = m.audit()[before:]
                assert record.reason == "GetUsage: invalid argument (page_token)"

            # the same request again, with another page_size, is the same query
            answer, code, _, _ = await call(m.usage.GetUsage, same(page_size=100), admin)
            assert code == grpc.StatusCode.OK and len(answer.rows) == 20
            assert not answer.next_page_token

            _, code, status, _ = await call(m.usage.GetUsage, same(page_size=-1), admin)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert field_violations(status) == ["page_size"]

    asyncio.run(body())


def test_a_member_pages_through_only_its_own_rows(
    tmp_path: Path, store_url: str, issuer: Issuer
) -> None:
    async def body() -> None:
        async with management(tmp_path, store_url, issuer) as m:
            seed(m.store, "ann", 1200)
            seed(m.store, "bob", 1200)
            ann = issuer.mint(realm_roles=["model-user"], groups=["/ml"], sub="ann")
            bob = issuer.mint(realm_roles=["model-user"], groups=["/ml"], sub="bob")
            request = admin_pb2.GetUsageRequest(day="2025-03-14", page_size=500)
            got = await pages(m, request, ann)
            assert [len(p) for p in got] == [500, 500, 200]
            assert [r for p in got for r in p] == unpaged(m.store, principal="ann")

            first, _, _, _ = await call(m.usage.GetUsage, request, ann)
            request.page_token = first.next_page_token
            for credential in (bob, m.admin_key()):  # ann's token is ann's alone
                _, code, status, _ = await call(m.usage.GetUsage, request, credential)
                assert code == grpc.StatusCode.INVALID_ARGUMENT
                assert field_violations(status) == ["page_token"]

    asyncio.run(body())


def _range(start: float, end: float) -> admin_pb2.GetUsageRequest:
    request = admin_pb2.GetUsageRequest()
    request.range.start.FromSeconds(int(start))
    request.range.end.FromSeconds(int(end))
    return request


def test_a_period_longer_than_the_cap_is_invalid_argument(tmp_path: Path, store_url: str) -> None:
    async def body() -> None:
        async with management(tmp_path, store_url) as m:
            seed(m.store, "ann", 3)
            admin = m.admin_key()
            last_instant_to_0 = _range(0, 0)
            last_instant_to_0.range.start.seconds = 253402300799  # 9999-12-31T23:59:59
            last_instant_to_0.range.start.nanos = 999_999_999
            year = _range(DAY - 200 * 86400, DAY + 166 * 86400)  # 366 days: the default cap
            answer, code, _, _ = await call(m.usage.GetUsage, year, admin)
            assert code == grpc.StatusCode.OK and len(answer.rows) == 3
            cases = [
                (_range(DAY - 200 * 86400, DAY + 166 * 86400 + 1), "range", "more than the 366"),
                (_range(0, 2**37), "range", "split the period"),
                (_range(DAY + 1, DAY), "range", "is before start"),
                (_range(DAY, DAY), "range", "empty"),
                (last_instant_to_0, "range", "is before start"),
            ]
            for request, field, words in cases:
                _, code, status, message = await call(m.usage.GetUsage, request, admin)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, words
                assert field_violations(status) == [field] and words in message
                assert m.audit()[-1].reason == f"GetUsage: invalid argument ({field})"

        async with management(tmp_path, store_url, usage_max_period_days=7) as m:
            admin = m.admin_key()
            week = _range(DAY, DAY + 7 * 86400)
            _, code, _, _ = await call(m.usage.GetUsage, week, admin)
            assert code == grpc.StatusCode.OK
            for request, field in (
                (_range(DAY, DAY + 7 * 86400 + 1), "range"),
                (admin_pb2.GetUsageRequest(month="2025-02"), "month"),
            ):
                _, code, status, message = await call(m.usage.GetUsage, request, admin)
                assert code == grpc.StatusCode.INVALID_ARGUMENT
                assert field_violations(status) == [field] and "more than the 7" in message
            _, code, _, _ = await call(
                m.usage.GetUsage, admin_pb2.GetUsageRequest(day="2025-02-01"), admin
            )
            assert code == grpc.StatusCode.OK

    asyncio.run(body())


def test_a_forged_token_with_a_bad_day_is_refused_audited_and_not_echoed(
    tmp_path: Path, store_url: str
) -> None:
    """The digest is no MAC: a caller can compute one for any position. A day position that
    is not a date got a refusal from the ledger that was never audited, and one of 20,000
    characters, echoed in the message, overflowed gRPC's metadata (RESOURCE_EXHAUSTED)."""

    async def body() -> None:
        async with management(tmp_path, store_url) as m:
            seed(m.store, "ann", 3)
            minted = ApiKeys(m.store).mint("ops", ["m1"], admin=True)
            request = admin_pb2.GetUsageRequest(
                day="2025-03-14", group_by=[admin_pb2.USAGE_GROUP_BY_DAY]
            )
            start, end = period(request)
            for day in ("x" * 10, "x" * 20_000, "2025-3-14"):
                last = UsageTotal(group=(("day", day),), requests=1, prompt_tokens=0,
                                  completion_tokens=0, cached_tokens=0)  # fmt: skip
                request.page_token = encode_page_token(
                    f"key:{minted.key.key_id}", request, start, end, ("day",), last
                )
                before = len(m.audit())
                _, code, status, message = await call(m.usage.GetUsage, request, minted.secret)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, day[:12]
                assert field_violations(status) == ["page_token"] and day not in message
                [record] = m.audit()[before:]
                assert record.reason == "GetUsage: invalid argument (page_token)"

    asyncio.run(body())
