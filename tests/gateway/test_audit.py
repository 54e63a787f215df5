"""The hash-chained audit log against real SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from services.engine.errors import InvalidRequestError
from services.gateway.audit import GENESIS_HASH, AuditEvent, AuditLog, chain_hash
from services.gateway.store import Store, open_store
from tests.gateway.conftest import StoreFactory, all_rows


def _fill(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.append(
            AuditEvent(
                principal=f"user-{i}",
                decision="allow" if i % 2 else "deny",
                reason="ok" if i % 2 else "model not allowed",
                team="ml",
                model="tandem-tiny",
                request_id=f"req-{i}",
                time=1_700_000_000.0 + i / 7,
            )
        )


def test_chain_links_and_verifies(store: Store) -> None:
    log = AuditLog(store)
    assert log.verify_chain() is None and log.head() == (0, GENESIS_HASH)
    _fill(log, 10)
    records = list(log.records())
    assert [r.id for r in records] == list(range(1, 11))
    assert records[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(records))
    assert records[3].event.reason == "ok"
    assert records[3].event.time == pytest.approx(1_700_000_000.0 + 3 / 7, abs=1e-6)
    assert log.verify_chain() is None
    assert log.head() == (10, records[-1].hash)


def test_an_edited_reason_is_detected_at_that_record(store: Store) -> None:
    log = AuditLog(store)
    _fill(log, 8)
    with store.transaction() as tx:
        (body,) = tx.fetchone("SELECT body FROM audit_log WHERE id = 6") or ("",)
        tx.execute("UPDATE audit_log SET body = ? WHERE id = 6", (body.replace('"ok"', '"x"'),))
    assert log.verify_chain() == 6


@pytest.mark.parametrize(
    "edit",
    [
        # a key given twice: Python and PostgreSQL read the last, SQLite's json_extract the
        # first, so this hashed as the original while a query read "mallory"
        lambda body: '{"principal":"mallory",' + body[1:],
        lambda body: body[:-1] + ',"id":99}',  # hashed over as before; records() then failed
        lambda body: body[:-1] + ',"time_us":5}',
        lambda body: body + " ",  # not the text an append writes
        lambda body: "[" + body + "]",  # verify used to fail with a traceback on these two
        lambda body: body[:-1],
    ],
    ids=["duplicate-key", "id", "time_us", "space", "list", "not-json"],
)
def test_a_body_that_is_not_as_written_is_detected_at_that_record(
    store: Store, edit: Callable[[str], str]
) -> None:
    log = AuditLog(store)
    _fill(log, 5)
    with store.transaction() as tx:
        (body,) = tx.fetchone("SELECT body FROM audit_log WHERE id = 3") or ("",)
        tx.execute("UPDATE audit_log SET body = ? WHERE id = 3", (edit(body),))
    assert log.check_chain().broken_at == 3
    assert log.check_chain().head[0] == 2


def test_a_recomputed_edit_is_detected_at_the_next_record(store: Store) -> None:
    log = AuditLog(store)
    _fill(log, 8)
    with store.transaction() as tx:
        _, time_us, body, prev, _ = tx.fetchone("SELECT * FROM audit_log WHERE id = 3") or ()
        body = body.replace('"deny"', '"allow"')
        tx.execute(
            "UPDATE audit_log SET body = ?, hash = ? WHERE id = 3",
            (body, chain_hash(prev, 3, time_us, body)),
        )
    assert log.verify_chain() == 4


def test_a_deleted_record_is_detected_after_the_gap(store: Store) -> None:
    log = AuditLog(store)
    _fill(log, 8)
    with store.transaction() as tx:
        tx.execute("DELETE FROM audit_log WHERE id = 4")
    assert log.verify_chain() == 5
    with store.transaction() as tx:
        tx.execute("DELETE FROM audit_log WHERE id = 1")
    assert log.verify_chain() == 2


def test_an_inserted_record_is_detected_after_it(store: Store) -> None:
    log = AuditLog(store)
    _fill(log, 5)
    with store.transaction() as tx:  # make room at id 3, then forge a well-linked record
        tx.execute("UPDATE audit_log SET id = id + 1000 WHERE id >= 3")
        tx.execute("UPDATE audit_log SET id = id - 999 WHERE id >= 1000")
        (prev,) = tx.fetchone("SELECT hash FROM audit_log WHERE id = 2") or ("",)
        body = '{"decision":"allow","principal":"mallory","reason":"ok"}'  # canonical
        tx.execute(
            "INSERT INTO audit_log (id, time_us, body, prev_hash, hash) VALUES (3, 0, ?, ?, ?)",
            (body, prev, chain_hash(prev, 3, 0, body)),
        )
    assert log.verify_chain() == 4


@pytest.mark.parametrize("forged_id", [0, -7, -(2**63)])  # the last: the column's least value
def test_a_record_forged_below_the_first_id_is_detected(store: Store, forged_id: int) -> None:
    log = AuditLog(store)
    _fill(log, 3)
    body = '{"principal":"mallory","decision":"allow","reason":"CreateApiKey: admin"}'
    with store.transaction() as tx:
        tx.execute(
            "INSERT INTO audit_log (id, time_us, body, prev_hash, hash) VALUES (?, 0, ?, ?, ?)",
            (forged_id, body, GENESIS_HASH, chain_hash(GENESIS_HASH, forged_id, 0, body)),
        )
    check = log.check_chain()
    assert check.broken_at == forged_id
    assert check.head == (0, GENESIS_HASH)  # nothing before it verified


def test_the_head_reported_is_the_last_record_the_walk_verified(store: Store) -> None:
    log = AuditLog(store)
    _fill(log, 6)
    records = list(log.records())
    assert log.check_chain().head == (6, records[-1].hash)
    with store.transaction() as tx:
        tx.execute("DELETE FROM audit_log WHERE id = 5")
    check = log.check_chain()
    assert (check.broken_at, check.head) == (6, (4, records[3].hash))


def test_concurrent_appenders_extend_one_chain(open_same: StoreFactory) -> None:
    logs = [AuditLog(open_same()) for _ in range(2)]  # two replicas
    threads = [threading.Thread(target=_fill, args=(logs[k % 2], 25)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert logs[0].head()[0] == 150
    assert logs[1].verify_chain() is None


def test_no_prompt_text_and_bad_events_refused(store: Store) -> None:
    log = AuditLog(store)
    with pytest.raises(InvalidRequestError, match="decision"):
        log.append(AuditEvent(principal="u", decision="maybe", reason="?"))
    log.append(AuditEvent(principal="u", decision="allow", reason="ok", prompt_tokens=12))
    (row,) = all_rows(store, "audit_log")
    assert "prompt_tokens" in row[2] and 'prompt"' not in row[2]


def test_client_request_id_is_recorded_only_when_set(store: Store) -> None:
    """Records without one keep the body they had before the field existed, so a chain
    mixing both (an upgraded gateway appending to an old log) still verifies."""
    log = AuditLog(store)
    old_body = '{"decision":"allow","principal":"old","reason":"ok"}'
    with store.transaction() as tx:  # as a gateway from before the field wrote it
        tx.execute(
            "INSERT INTO audit_log (id, time_us, body, prev_hash, hash) VALUES (1, 5, ?, ?, ?)",
            (old_body, GENESIS_HASH, chain_hash(GENESIS_HASH, 1, 5, old_body)),
        )
    log.append(AuditEvent(principal="u", decision="allow", reason="ok", request_id="g1"))
    log.append(
        AuditEvent(
            principal="u", decision="allow", reason="ok", request_id="g2", client_request_id="c"
        )
    )
    bodies = [str(row[2]) for row in sorted(all_rows(store, "audit_log"))]
    assert "client_request_id" not in bodies[1] and '"client_request_id":"c"' in bodies[2]
    events = [r.event for r in log.records()]
    assert [(e.request_id, e.client_request_id) for e in events] == [
        ("", ""),
        ("g1", ""),
        ("g2", "c"),
    ]
    assert log.verify_chain() is None


@pytest.mark.parametrize("forged_id", [None, "x"])
def test_a_sqlite_record_without_an_integer_id_breaks_the_chain(
    tmp_path: Path, forged_id: object
) -> None:
    """SQLite's BIGINT key takes NULL and text: such a record was skipped by the walk (NULL
    matched no `id > ?`; text crashed `tandem audit verify` with a traceback)."""
    with open_store(f"sqlite:{tmp_path / 'audit.db'}") as store:
        log = AuditLog(store)
        _fill(log, 3)
        body = '{"decision":"allow","principal":"mallory","reason":"CreateApiKey: admin"}'
        with store.transaction() as tx:
            tx.execute(
                "INSERT INTO audit_log (id, time_us, body, prev_hash, hash) VALUES (?, 0, ?, ?, ?)",
                (forged_id, body, GENESIS_HASH, "0" * 64),
            )
        check = log.check_chain()
    # NULL sorts before every id (the chain breaks at its start), text after (at its end)
    assert check.broken_at == (1 if forged_id is None else 4)
