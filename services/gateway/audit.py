"""The audit log: one append-only, hash-chained record per gateway decision.

Each record has a consecutive ``id`` (1, 2, …) and carries
``hash = SHA-256(prev_hash ‖ canonical JSON of the record)``, where ``prev_hash`` is the
previous record's hash (the first record's is :data:`GENESIS_HASH`) and the canonical JSON
(sorted keys, no spaces, UTF-8) covers every field including ``id`` and the time. Prompt text
is never recorded. ``client_request_id`` (added later) is written only when set, so a record
without one has exactly the body it had before the field existed; verification hashes the
stored body, so records from either time check out.

:meth:`AuditLog.verify_chain` walks the log in ``id`` order and returns the id of the first
record that does not check out, or None:

- an edited record fails its own hash → its id; so does a body that is not exactly the
  canonical text an append writes (a key given twice, say, which hashes like the original
  but reads differently in SQL);
- a deleted record breaks the next one's link (its ``prev_hash`` no longer matches) → the id
  of the record after the gap;
- an inserted or reordered record breaks the id sequence or a link → its id.

Limits: a chain alone cannot reveal truncation of the newest records, nor a log rewritten
from some point on by someone who recomputes every later hash; anchor :meth:`AuditLog.head`
elsewhere (a metric, an external log) to catch those.

Each committed append is counted in the decision metrics (:mod:`services.gateway.metrics`).

Appends serialize on the table (SQLite ``BEGIN IMMEDIATE``; PostgreSQL ``LOCK TABLE … IN
EXCLUSIVE MODE``), so concurrent appenders — threads or gateway replicas — extend one chain.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from services.engine.errors import InvalidRequestError
from services.gateway.metrics import METRICS, GatewayMetrics
from services.gateway.store import Store, Tx

GENESIS_HASH = "0" * 64
DECISIONS = ("allow", "deny")
_BATCH = 1000


@dataclass(frozen=True)
class ChainCheck:
    """What one walk of the chain found."""

    broken_at: int | None
    """The id of the first record that fails verification; None when the chain holds."""
    head: tuple[int, str]
    """The last record that verified (id, hash), (0, GENESIS_HASH) when none did: the head
    to anchor elsewhere, from the same walk (records appended since are not vouched for)."""


@dataclass(frozen=True)
class AuditEvent:
    """One decision to record (what the caller supplies)."""

    principal: str
    """Who asked (token subject, ``key:<id>``, or ``anonymous``)."""
    decision: str
    """``allow`` or ``deny``."""
    reason: str
    """Why, in a few words (e.g. ``ok``, ``expired token``, ``model not allowed``)."""
    team: str = ""
    """The caller's team, when known."""
    model: str = ""
    """The model asked for, when known."""
    request_id: str = ""
    """The gateway's id for the request, joining the record to the ledger."""
    client: str = ""
    """The OIDC client (``azp``) or API key id."""
    source: str = ""
    """The peer address."""
    prompt_tokens: int | None = None
    """Prompt tokens, when settled."""
    completion_tokens: int | None = None
    """Completion tokens, when settled."""
    time: float = field(default_factory=time.time)
    """When the decision was made, seconds since the epoch."""
    client_request_id: str = ""
    """The id the client sent, if any (not unique; for correlation only)."""


@dataclass(frozen=True)
class AuditRecord:
    """A stored record: the event, its place in the chain and its hashes."""

    id: int
    """Position in the log, from 1, consecutive."""
    event: AuditEvent
    """What was decided."""
    prev_hash: str
    """The previous record's hash (hex), :data:`GENESIS_HASH` for the first."""
    hash: str
    """SHA-256 (hex) of ``prev_hash`` bytes followed by the canonical JSON of this record."""


EXCLUSIVE = "audit_log"
"""The table whose appenders a transaction must serialize (the chain's next id and hash)."""


class AuditLog:
    """Append to and verify the hash-chained audit log in a :class:`Store`."""

    def __init__(self, store: Store, metrics: GatewayMetrics | None = METRICS) -> None:
        self._store = store
        self._metrics = metrics

    def append(self, event: AuditEvent) -> AuditRecord:
        """Add one record at the end of the chain and return it."""
        with self._store.transaction(exclusive=EXCLUSIVE) as tx:
            record = self.append_in(tx, event)
        self.count(event)  # after the commit: a failed append counts nothing
        return record

    @property
    def store(self) -> Store:
        """The store the records go to."""
        return self._store

    def append_in(self, tx: Tx, event: AuditEvent) -> AuditRecord:
        """Append inside ``tx``, which must hold the chain's lock
        (``transaction(exclusive=EXCLUSIVE)``); uncounted until :meth:`count`."""
        _check(event)
        time_us = round(event.time * 1e6)
        body = _canonical(_body(event))
        last = tx.fetchone("SELECT id, hash FROM audit_log ORDER BY id DESC LIMIT 1")
        prev_id, prev_hash = (int(last[0]), str(last[1])) if last else (0, GENESIS_HASH)
        record_id = prev_id + 1
        digest = chain_hash(prev_hash, record_id, time_us, body)
        tx.execute(
            "INSERT INTO audit_log (id, time_us, body, prev_hash, hash) VALUES (?, ?, ?, ?, ?)",
            (record_id, time_us, body, prev_hash, digest),
        )
        return AuditRecord(id=record_id, event=event, prev_hash=prev_hash, hash=digest)

    def count(self, event: AuditEvent) -> None:
        """Count a committed record in the decision metrics."""
        if self._metrics is not None:
            self._metrics.decided(event)

    def records(self, after_id: int = 0) -> Iterator[AuditRecord]:
        """Every record with ``id > after_id``, in order (fetched in batches)."""
        for row in self._rows(after_id):
            record_id, time_us, body, prev_hash, digest = row
            fields = json.loads(body)
            yield AuditRecord(
                id=int(record_id),
                event=AuditEvent(**fields, time=int(time_us) / 1e6),
                prev_hash=prev_hash,
                hash=digest,
            )

    def head(self) -> tuple[int, str]:
        """The last record's id and hash (``(0, GENESIS_HASH)`` when empty): anchor these."""
        with self._store.transaction() as tx:
            last = tx.fetchone("SELECT id, hash FROM audit_log ORDER BY id DESC LIMIT 1")
        return (int(last[0]), str(last[1])) if last else (0, GENESIS_HASH)

    def verify_chain(self) -> int | None:
        """The id of the first record that fails verification, or None if the chain holds."""
        return self.check_chain().broken_at

    def check_chain(self) -> ChainCheck:
        """Walk every record, the first batch with no bound on the id, so one slipped in
        anywhere is found: below the first id (0, negative, the column's least value), or,
        in SQLite, whose BIGINT key takes NULL and text, with no integer id at all (NULL
        sorts first, text after every number). Such a record breaks the chain where it
        sits (``broken_at``: the id expected there). What held is reported from this walk."""
        expected_id, prev_hash = 1, GENESIS_HASH
        for record_id, time_us, body, stored_prev, digest in self._rows():
            if not (_is_int(record_id) and _is_int(time_us)):
                return ChainCheck(expected_id, (expected_id - 1, prev_hash))
            if record_id != expected_id or stored_prev != prev_hash:
                return ChainCheck(int(record_id), (expected_id - 1, prev_hash))
            body_ok = isinstance(body, str) and _as_written(body)
            if not body_ok or chain_hash(prev_hash, record_id, time_us, body) != digest:
                return ChainCheck(int(record_id), (expected_id - 1, prev_hash))
            expected_id, prev_hash = record_id + 1, digest
        return ChainCheck(None, (expected_id - 1, prev_hash))

    def _rows(self, after_id: int | None = None) -> Iterator[tuple[Any, Any, Any, Any, Any]]:
        """Records as stored (values unchecked) in id order, in batches: those with ``id >
        after_id``, or every one (None: whatever its id, NULL and text included)."""
        columns = "SELECT id, time_us, body, prev_hash, hash FROM audit_log"
        where, params = ("", ()) if after_id is None else (" WHERE id > ?", (after_id,))
        while True:
            with self._store.transaction() as tx:
                rows = tx.fetchall(f"{columns}{where} ORDER BY id LIMIT ?", (*params, _BATCH))
            yield from (tuple(r) for r in rows)
            if len(rows) < _BATCH or not _is_int(rows[-1][0]):
                return  # a batch ending on a non-integer id has been reported broken
            where, params = " WHERE id > ?", (rows[-1][0],)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def chain_hash(prev_hash: str, record_id: int, time_us: int, body: str) -> str:
    """SHA-256 over the previous hash and the canonical JSON of the record (hex)."""
    fields = json.loads(body)
    fields.update(id=record_id, time_us=time_us)
    return hashlib.sha256(bytes.fromhex(prev_hash) + _canonical(fields).encode()).hexdigest()


def _canonical(fields: dict[str, object]) -> str:
    """Sorted keys, no spaces, UTF-8: the one text of a set of fields."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _as_written(body: str) -> bool:
    """Whether ``body`` is text :meth:`AuditLog.append_in` could have written: a JSON object
    in canonical form, without the fields the hash adds (``id``, ``time_us``). The hash is
    over the parsed fields, and JSON readers disagree on a key given twice (Python and
    PostgreSQL take the last, SQLite's ``json_extract`` the first): an edit adding a
    duplicate key hashed as the original while a query read the forgery."""
    try:
        fields = json.loads(body)
    except ValueError:
        return False
    if not isinstance(fields, dict) or fields.keys() & {"id", "time_us"}:
        return False
    return _canonical(fields) == body


def _body(event: AuditEvent) -> dict[str, object]:
    fields = asdict(event)
    del fields["time"]
    if not fields["client_request_id"]:  # keep the pre-field body (see the module docstring)
        del fields["client_request_id"]
    return fields


def _check(event: AuditEvent) -> None:
    if event.decision not in DECISIONS:
        raise InvalidRequestError("decision", f"must be one of {DECISIONS}, got {event.decision!r}")
    if not event.principal:
        raise InvalidRequestError("principal", "must be a non-empty string")
    if not event.reason:
        raise InvalidRequestError("reason", "must be a non-empty string")
