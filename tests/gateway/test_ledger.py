"""The usage ledger against real SQLite and PostgreSQL: idempotent inserts, exact sums."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import pytest

from services.engine.errors import InvalidRequestError
from services.gateway import store as store_module
from services.gateway.ledger import Ledger, UsageRecord
from services.gateway.store import Store
from tests.gateway.conftest import POSTGRES_URL, StoreFactory, _postgres_unreachable

T0 = 1_700_000_000.0


def _rec(i: int, **kw: object) -> UsageRecord:
    fields: dict[str, object] = dict(
        request_id=f"req-{i}",
        principal=f"user-{i % 3}",
        team=f"team-{i % 2}",
        model=f"model-{i % 4}",
        prompt_tokens=10 + i,
        completion_tokens=2 * i,
        cached_tokens=i % 5,
        latency_ms=1.5 * i,
        outcome="ok",
        time=T0 + i,
    )
    fields.update(kw)
    return UsageRecord(**fields)  # type: ignore[arg-type]


def test_insert_is_idempotent_on_request_id(store: Store) -> None:
    ledger = Ledger(store)
    first = _rec(1)
    assert ledger.record(first) is True
    assert ledger.record(first) is False
    assert ledger.record(_rec(1, completion_tokens=999)) is False  # a retry never recounts
    assert ledger.get("req-1") == first
    (total,) = ledger.usage(T0, T0 + 10, group_by=())
    assert (total.requests, total.completion_tokens) == (1, 2)


def test_usage_sums_are_exact_by_group_and_range(store: Store) -> None:
    ledger = Ledger(store)
    recs = [_rec(i) for i in range(40)]
    for rec in recs:
        ledger.record(rec)
    start, end = T0 + 5, T0 + 30  # half-open: rows 5..29
    picked = [r for r in recs if start <= r.time < end]
    totals = ledger.usage(start, end, group_by=("team", "model", "principal"))
    assert sum(t.requests for t in totals) == len(picked) == 25
    for t in totals:
        g = dict(t.group)
        rows = [
            r
            for r in picked
            if (r.team, r.model, r.principal) == (g["team"], g["model"], g["principal"])
        ]
        assert t.requests == len(rows)
        assert t.prompt_tokens == sum(r.prompt_tokens for r in rows)
        assert t.completion_tokens == sum(r.completion_tokens for r in rows)
        assert t.cached_tokens == sum(r.cached_tokens for r in rows)
    (team0,) = ledger.usage(start, end, group_by=("team",), team="team-0")
    assert team0.total_tokens == sum(
        r.prompt_tokens + r.completion_tokens for r in picked if r.team == "team-0"
    )
    assert ledger.usage(T0 + 100, T0 + 200) == ()


def test_concurrent_inserts_lose_nothing_and_count_nothing_twice(open_same: StoreFactory) -> None:
    stores = [open_same() for _ in range(2)]  # two connections, like two replicas
    ledgers = [Ledger(s) for s in stores]
    recs = [_rec(i) for i in range(200)]
    results: list[bool] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine = recs[:]
        rng.shuffle(mine)  # every thread settles every request: retries from all sides
        for j, rec in enumerate(mine[:120]):
            inserted = ledgers[(seed + j) % 2].record(rec)
            with lock:
                results.append(inserted)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    distinct = {r.request_id for r in recs}
    (total,) = ledgers[0].usage(T0, T0 + 1000, group_by=())
    inserted = [r for r in recs if ledgers[1].get(r.request_id) is not None]
    assert sum(results) == total.requests == len(inserted) <= len(distinct)
    assert total.prompt_tokens == sum(r.prompt_tokens for r in inserted)
    assert total.completion_tokens == sum(r.completion_tokens for r in inserted)


def test_concurrent_distinct_inserts_from_threads_all_land(store: Store) -> None:
    ledger = Ledger(store)
    recs = [_rec(i) for i in range(400)]
    threads = [
        threading.Thread(target=lambda k=k: [ledger.record(r) for r in recs[k::8]])
        for k in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (total,) = ledger.usage(T0, T0 + 1000, group_by=())
    assert total.requests == 400
    assert total.completion_tokens == sum(r.completion_tokens for r in recs)


def test_bad_records_and_queries_are_refused(store: Store) -> None:
    ledger = Ledger(store)
    with pytest.raises(InvalidRequestError, match="prompt_tokens"):
        ledger.record(_rec(1, prompt_tokens=-1))
    with pytest.raises(InvalidRequestError, match="cached_tokens"):
        ledger.record(_rec(1, cached_tokens=10_000))
    with pytest.raises(InvalidRequestError, match="request_id"):
        ledger.record(_rec(1, request_id=""))
    with pytest.raises(InvalidRequestError, match="group_by"):
        ledger.usage(T0, T0 + 1, group_by=("team; DROP TABLE usage_ledger",))


def test_rows_are_found_by_principal_and_client_request_id(store: Store) -> None:
    """The client's id is not a key: reused, it finds every row, but only the caller's."""
    ledger = Ledger(store)
    mine = [_rec(i, principal="ann", client_request_id="abc") for i in (1, 2)]
    theirs = _rec(3, principal="eve", client_request_id="abc")
    for rec in (*mine, theirs, _rec(4, principal="ann")):
        assert ledger.record(rec) is True
    assert ledger.find("ann", "abc") == tuple(mine)  # oldest first
    assert ledger.find("eve", "abc") == (theirs,)
    assert ledger.find("ann", "nope") == ()
    assert ledger.get("req-4") == _rec(4, principal="ann")  # no client id: stored as ""
    with pytest.raises(InvalidRequestError, match="client_request_id"):
        ledger.find("ann", "")


def test_migration_3_keeps_rows_written_before_it(
    open_same: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database from before ``client_request_id`` migrates in place; old rows read as ""."""
    with monkeypatch.context() as m:
        m.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:2])
        old = open_same()
        assert old.schema_version() == 2
        with old.transaction() as tx:
            tx.execute(
                "INSERT INTO usage_ledger (request_id, principal, team, key_id, model,"
                " prompt_tokens, completion_tokens, cached_tokens, latency_ms, outcome, time_us)"
                " VALUES ('old', 'ann', 'ml', NULL, 'm', 3, 4, 0, 1.5, 'ok', 1700000000000000)"
            )
    new = open_same()
    assert new.schema_version() == store_module.MIGRATIONS[-1].version
    ledger = Ledger(new)
    row = ledger.get("old")
    assert row is not None and row.client_request_id == ""
    assert (row.prompt_tokens, row.completion_tokens, row.time) == (3, 4, T0)
    assert ledger.record(_rec(5, client_request_id="abc")) is True
    assert ledger.find("user-2", "abc") == (_rec(5, client_request_id="abc"),)


def test_a_store_a_newer_gateway_migrated_is_refused(open_same: StoreFactory) -> None:
    """Before, it opened without complaint and the first write failed on a column the newer
    schema had added (a raw driver error, gRPC UNKNOWN)."""
    store = open_same()
    newer = max(m.version for m in store_module.MIGRATIONS) + 1
    with store.transaction() as tx:
        tx.execute(
            "INSERT INTO schema_migrations (version, description, applied_us) VALUES (?, ?, ?)",
            (newer, "from a newer gateway", 0),
        )
    with pytest.raises(store_module.StoreError, match=f"schema is at version {newer}, newer"):
        open_same()


def test_postgresql_connections_give_up_on_a_stalled_network() -> None:
    """A network that stalls without a reset held a query, and every store call queued
    behind it, forever: keepalives, a TCP user timeout and a statement timeout bound it."""
    if reason := _postgres_unreachable():
        pytest.skip(reason)
    with store_module.open_store(POSTGRES_URL) as store:
        with store.transaction() as tx:
            assert tx.fetchone("SHOW statement_timeout") == ("30s",)
        parameters = store._conn.info.get_parameters()  # type: ignore[attr-defined]
    for name, value in store_module.PG_CONNECT_OPTIONS.items():
        assert parameters[name] == str(value), name


def test_a_usage_report_neither_waits_for_nor_holds_up_the_calls(store: Store) -> None:
    """Reports run on a connection of their own: on the shared one a year's report held up
    every API-key check and settle of the replica (9 s over 3 million rows)."""
    ledger = Ledger(store)
    ledger.record(_rec(1))
    with store._lock:  # type: ignore[attr-defined]  # the calls' connection is busy
        done = _in_thread(lambda: ledger.usage(T0, T0 + 10, ("team",)))
    assert [t.requests for t in done] == [1]
    with store.reporting()._lock:  # type: ignore[attr-defined]  # a report is running
        assert _in_thread(lambda: ledger.record(_rec(2))) is True


def _in_thread(work: Callable[[], object], timeout_s: float = 10.0) -> object:
    """``work``'s result, run on another thread: a test fails instead of hanging on a lock."""
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(work()), daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert results, "it waited for the lock held by the other side"
    return results[0]


def test_usage_pages_follow_the_grouping_order(store: Store) -> None:
    """``after`` and ``limit`` read the report a page at a time: keyset on the grouping
    columns, so the pages joined are the unpaged report, whatever the collation."""
    ledger = Ledger(store)
    names = ["a", "A", "ä", "a b", "b", "_"]
    with store.transaction() as tx:
        for i in range(300):
            ledger.insert(tx, _rec(i, team=names[i % 6], model=f"{names[i // 6 % 6]}{i % 11}"))
    columns = ("team", "model", "principal")
    whole = ledger.usage(T0, T0 + 300, columns)
    assert len(whole) > 100
    paged: list[object] = []
    after = None
    while page := ledger.usage(T0, T0 + 300, columns, after=after, limit=7):
        paged.extend(page)
        after = [v or "" for _, v in page[-1].group]
    assert paged == list(whole)
    assert (
        ledger.usage(T0, T0 + 300, ("team",), limit=2) == ledger.usage(T0, T0 + 300, ("team",))[:2]
    )
    for bad in (
        dict(after=["a"]),  # one value per column
        dict(after=[]),
    ):
        with pytest.raises(InvalidRequestError, match="after"):
            ledger.usage(T0, T0 + 300, columns, **bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="after"):
        ledger.usage(T0, T0 + 300, ("key_id",), after=["k"])  # NULLs do not order
    with pytest.raises(InvalidRequestError, match="limit"):
        ledger.usage(T0, T0 + 300, columns, limit=0)


def _indexes(store: Store) -> set[str]:
    with store.transaction() as tx:
        if store.dialect == "sqlite":
            rows = tx.fetchall("SELECT name FROM sqlite_master WHERE type = 'index'")
        else:
            rows = tx.fetchall(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
            )
    return {str(r[0]) for r in rows}


def test_migration_4_indexes_a_callers_report_by_principal_and_time(
    open_same: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller without the admin role reads only its own rows over a period: on the time
    index alone that scanned every principal's rows of the period."""
    with monkeypatch.context() as m:
        m.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:3])
        old = open_same()
        assert old.schema_version() == 3
        Ledger(old).record(_rec(1))
        assert "usage_ledger_principal_time" not in _indexes(old)
    new = open_same()
    assert new.schema_version() >= 4
    assert {"usage_ledger_time", "usage_ledger_principal_time"} <= _indexes(new)
    ledger = Ledger(new)
    with new.transaction() as tx:
        for i in range(2, 3000):  # 30 principals over 125 days; the report: one day
            ledger.insert(tx, _rec(i, principal=f"user-{i % 30}", time=T0 + i * 3600.0))
    query = (
        "SELECT team, model, COUNT(*) FROM usage_ledger WHERE time_us >= ? AND time_us < ?"
        " AND principal = ? GROUP BY team, model ORDER BY team, model"
    )
    params = (round(T0 * 1e6), round((T0 + 86400) * 1e6), "user-7")
    with new.transaction() as tx:
        if new.dialect == "sqlite":
            tx.execute("ANALYZE")
            plan = " ".join(str(r) for r in tx.fetchall(f"EXPLAIN QUERY PLAN {query}", params))
        else:
            tx.execute("ANALYZE usage_ledger")
            plan = " ".join(str(r) for r in tx.fetchall(f"EXPLAIN {query}", params))
    assert "usage_ledger_principal_time" in plan, plan


def test_usage_by_utc_day_splits_at_midnight_and_pages(store: Store) -> None:
    """Daily rollups: rows group by their UTC day, a row at 00:00:00 starts the next day,
    and pages keyed on (day, team) join up to the whole report."""
    ledger = Ledger(store)
    midnight = 1_700_006_400.0  # 2023-11-15T00:00:00Z
    times = [midnight - 1, midnight - 1e-6, midnight, midnight + 86_399, midnight + 86_400]
    with store.transaction() as tx:
        for i, t in enumerate(times):
            ledger.insert(tx, _rec(i, time=t, team="a" if i % 2 else "b"))
    by_day = ledger.usage(midnight - 86_400, midnight + 2 * 86_400, ("day",))
    assert [(dict(t.group)["day"], t.requests) for t in by_day] == [
        ("2023-11-14", 2),
        ("2023-11-15", 2),
        ("2023-11-16", 1),
    ]
    assert [t.prompt_tokens for t in by_day] == [10 + 11, 12 + 13, 14]
    columns = ("day", "team")
    whole = ledger.usage(midnight - 86_400, midnight + 2 * 86_400, columns)
    assert [tuple(v for _, v in t.group) for t in whole] == [
        ("2023-11-14", "a"),
        ("2023-11-14", "b"),
        ("2023-11-15", "a"),
        ("2023-11-15", "b"),
        ("2023-11-16", "b"),
    ]
    paged: list[object] = []
    after = None
    while page := ledger.usage(
        midnight - 86_400, midnight + 2 * 86_400, columns, after=after, limit=2
    ):
        paged.extend(page)
        after = [v or "" for _, v in page[-1].group]
    assert paged == list(whole)
    with pytest.raises(InvalidRequestError, match="day must be YYYY-MM-DD"):
        ledger.usage(midnight, midnight + 1, columns, after=["15/11/2023", "a"])
    with pytest.raises(InvalidRequestError, match="time"):
        ledger.record(_rec(99, time=-1.0))
