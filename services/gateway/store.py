"""The gateway's durable store: API keys, the usage ledger and the audit log.

One small interface, two backends, chosen by :func:`open_store`:

- ``sqlite:PATH`` (stdlib :mod:`sqlite3`; the embedded default, WAL journal; ``sqlite::memory:``
  for a throwaway store);
- ``postgresql://…`` (psycopg 3), for several gateway replicas sharing one database.

The schema is created on open by numbered migrations recorded in ``schema_migrations``; opening
is idempotent and safe when several replicas open at once (PostgreSQL: an advisory lock;
SQLite: ``BEGIN IMMEDIATE``). The same portable SQL serves both backends (``?`` placeholders,
rewritten for psycopg); times are integer microseconds since the epoch.

Every method is synchronous and short: the gateway calls them through
:func:`asyncio.to_thread`. A store holds one connection guarded by a lock, so it is safe to
share between threads; a PostgreSQL connection that broke is replaced on the next call.
Database failures surface as :class:`StoreError` (UNAVAILABLE): callers fail closed.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from services.engine.errors import InvalidRequestError, TandemError


class StoreError(TandemError, RuntimeError):
    """The store cannot be reached or refused an operation (UNAVAILABLE)."""

    grpc_code = "UNAVAILABLE"


@dataclass(frozen=True)
class Migration:
    """One step of the schema, applied once per database in ``version`` order."""

    version: int
    """Position in the sequence; recorded in ``schema_migrations`` when applied."""
    description: str
    """What the step does, for people reading the table."""
    statements: tuple[str, ...]
    """Portable DDL run by both backends, in one transaction."""


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        description="api_keys, usage_ledger, audit_log",
        statements=(
            """CREATE TABLE IF NOT EXISTS api_keys (
                key_id TEXT PRIMARY KEY,
                team TEXT NOT NULL,
                models TEXT NOT NULL,
                limits TEXT NOT NULL,
                salt BLOB_OR_BYTEA NOT NULL,
                iterations BIGINT NOT NULL,
                secret_hash BLOB_OR_BYTEA NOT NULL,
                created_by TEXT NOT NULL,
                created_us BIGINT NOT NULL,
                revoked_us BIGINT
            )""",
            "CREATE INDEX IF NOT EXISTS api_keys_team ON api_keys (team)",
            """CREATE TABLE IF NOT EXISTS usage_ledger (
                request_id TEXT PRIMARY KEY,
                principal TEXT NOT NULL,
                team TEXT NOT NULL,
                key_id TEXT,
                model TEXT NOT NULL,
                prompt_tokens BIGINT NOT NULL,
                completion_tokens BIGINT NOT NULL,
                cached_tokens BIGINT NOT NULL,
                latency_ms DOUBLE PRECISION NOT NULL,
                outcome TEXT NOT NULL,
                time_us BIGINT NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS usage_ledger_time ON usage_ledger (time_us)",
            """CREATE TABLE IF NOT EXISTS audit_log (
                id BIGINT PRIMARY KEY,
                time_us BIGINT NOT NULL,
                body TEXT NOT NULL,
                prev_hash TEXT NOT NULL,
                hash TEXT NOT NULL
            )""",
        ),
    ),
    Migration(
        version=2,
        description="api_keys.admin (the policy's admin role) and api_keys.description",
        statements=(
            # An integer, not BOOLEAN: the same 0/1 parameters work on both backends.
            "ALTER TABLE api_keys ADD COLUMN admin BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE api_keys ADD COLUMN description TEXT NOT NULL DEFAULT ''",
        ),
    ),
    Migration(
        version=3,
        description="usage_ledger.client_request_id (the caller's id, for correlation only)",
        statements=(
            # The primary key is the id the gateway mints; the client's own id is not unique
            # (clients reuse ids), so it is kept beside it and indexed per principal.
            "ALTER TABLE usage_ledger ADD COLUMN client_request_id TEXT NOT NULL DEFAULT ''",
            "CREATE INDEX IF NOT EXISTS usage_ledger_client"
            " ON usage_ledger (principal, client_request_id)",
        ),
    ),
    Migration(
        version=4,
        description="usage_ledger (principal, time_us) index, for callers' own usage reports",
        statements=(
            # A caller without the admin role reads only its own rows: on usage_ledger_time
            # alone its report over a period scanned every principal's rows of it.
            "CREATE INDEX IF NOT EXISTS usage_ledger_principal_time"
            " ON usage_ledger (principal, time_us)",
        ),
    ),
)

_BINARY_TYPE = {"sqlite": "BLOB", "postgresql": "BYTEA"}
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_PG_MIGRATION_LOCK = 0x54616E64  # "Tand": serializes concurrent opens across replicas
PG_CONNECT_OPTIONS: dict[str, int] = {
    "connect_timeout": 10,
    # A stalled network (no RST) held a query, and every store call queued behind its
    # lock, forever: TCP keepalives and a user timeout end the connection in ~30 s.
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
"""libpq options of every PostgreSQL connection (a URL's own settings of these lose)."""
PG_STATEMENT_TIMEOUT_MS = 30_000
"""Longest statement: a usage query over a huge ledger ends UNAVAILABLE, not holding the
store (API-key checks and settles share its connection) for minutes."""


def now_us() -> int:
    """The current wall-clock time in integer microseconds since the epoch."""
    return time.time_ns() // 1000


class Tx:
    """One transaction: run statements with ``?`` placeholders on the store's connection."""

    def __init__(self, cursor: Any, dialect: str) -> None:
        self._cursor = cursor
        self._dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; return the number of rows it changed."""
        self._cursor.execute(self._sql(sql), tuple(params))
        return int(self._cursor.rowcount)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one query; return every row."""
        self._cursor.execute(self._sql(sql), tuple(params))
        return [tuple(row) for row in self._cursor.fetchall()]

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """Run one query; return its first row, or None."""
        self._cursor.execute(self._sql(sql), tuple(params))
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self._dialect == "postgresql" else sql


class Store(ABC):
    """A connection to the gateway's tables, shared safely between threads."""

    dialect: str
    """``"sqlite"`` or ``"postgresql"``."""

    @abstractmethod
    @contextmanager
    def transaction(self, exclusive: str | None = None) -> Iterator[Tx]:
        """One transaction, committed on success and rolled back on error.

        ``exclusive`` names a table whose writers must be serialized for the duration (the
        audit chain's append): concurrent appenders, in this process or another replica,
        wait for each other; readers do not.
        """

    @abstractmethod
    def close(self) -> None:
        """Close the connection; the store is unusable afterwards."""

    def reporting(self) -> Store:
        """This database through a connection of its own, for long read-only queries (usage
        reports): on the shared one, behind its lock, a year's report held up every API-key
        check and settle for seconds (9 s over 3 million rows). Opened on first use, closed
        with this store; an in-memory SQLite store has no other connection and answers
        itself."""
        with self._reporting_lock:
            if self._reporting is None:
                self._reporting = self._sibling()
            return self._reporting

    def _sibling(self) -> Store:
        """Another connection to the same database (no migrations: this store ran them)."""
        return self

    def _close_reporting(self) -> None:
        with self._reporting_lock:
            reporting, self._reporting = self._reporting, None
        if reporting is not None and reporting is not self:  # outside the lock: it takes it
            reporting.close()

    _reporting: Store | None = None
    _reporting_lock = threading.Lock()  # class-wide: opening one is rare and quick

    def migrate(self) -> None:
        """Apply the migrations this database lacks (idempotent)."""
        with self.transaction(exclusive="schema_migrations") as tx:
            applied = {row[0] for row in tx.fetchall("SELECT version FROM schema_migrations")}
            known = max(m.version for m in MIGRATIONS)
            if applied and max(applied) > known:
                # A newer gateway migrated it: this code would write rows that schema may
                # refuse (a column it added NOT NULL) or misread. Refuse to start instead.
                raise StoreError(
                    f"the store's schema is at version {max(applied)}, newer than this "
                    f"gateway knows ({known}): run the newer gateway, or restore a backup "
                    "from before the upgrade"
                )
            for migration in MIGRATIONS:
                if migration.version in applied:
                    continue
                for statement in migration.statements:
                    tx.execute(statement.replace("BLOB_OR_BYTEA", _BINARY_TYPE[self.dialect]))
                tx.execute(
                    "INSERT INTO schema_migrations (version, description, applied_us)"
                    " VALUES (?, ?, ?)",
                    (migration.version, migration.description, now_us()),
                )

    def schema_version(self) -> int:
        """The highest migration applied to this database."""
        with self.transaction() as tx:
            row = tx.fetchone("SELECT MAX(version) FROM schema_migrations")
        return int(row[0]) if row and row[0] is not None else 0

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    applied_us BIGINT NOT NULL
)"""


def _create_private(path: str) -> None:
    """Create the store's file readable by its owner only (0600) if it does not exist yet;
    SQLite gives its -wal and -shm files the same mode. It holds key ids, teams, usage and
    the audit log's client addresses: nothing for other users of the machine."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return  # an existing store keeps the mode its operator gave it
    except OSError as exc:
        raise StoreError(f"cannot create SQLite store {path!r}: {exc}") from exc


class SqliteStore(Store):
    """The embedded backend: one SQLite file (WAL), or ``:memory:``."""

    dialect = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            if path != ":memory:":
                _create_private(path)
            self._conn = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=30.0
            )
            if path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._conn.execute(_MIGRATIONS_TABLE)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite store {path!r}: {exc}") from exc

    @contextmanager
    def transaction(self, exclusive: str | None = None) -> Iterator[Tx]:
        with self._lock:
            cursor = self._conn.cursor()
            try:
                # IMMEDIATE takes the database's write lock up front: writers serialize.
                cursor.execute("BEGIN IMMEDIATE" if exclusive else "BEGIN")
                yield Tx(cursor, self.dialect)
                cursor.execute("COMMIT")
            except BaseException as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):
                    raise StoreError(f"SQLite store {self.path!r}: {exc}") from exc
                raise
            finally:
                cursor.close()

    def _sibling(self) -> Store:
        # WAL: its reads never wait for this connection's writes, nor block them.
        return self if self.path == ":memory:" else SqliteStore(self.path)

    def close(self) -> None:
        self._close_reporting()
        with self._lock:
            self._conn.close()


class PostgresStore(Store):
    """The shared backend: one PostgreSQL database (optionally one schema of it)."""

    dialect = "postgresql"

    def __init__(self, url: str, schema: str | None = None) -> None:
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise InvalidRequestError("schema", f"not a plain SQL identifier: {schema!r}")
        self.url = url
        self.schema = schema
        self._lock = threading.Lock()
        self._conn = self._connect()

    def _connect(self) -> Any:
        import psycopg
        from psycopg import sql

        try:
            conn = psycopg.connect(self.url, autocommit=True, **PG_CONNECT_OPTIONS)
            conn.execute(f"SET statement_timeout = {PG_STATEMENT_TIMEOUT_MS}")
            with conn.transaction():
                # One lock for the schema and the migrations table: replicas starting at
                # once raced on CREATE SCHEMA IF NOT EXISTS (a duplicate-key error).
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_MIGRATION_LOCK,))
                if self.schema is not None:
                    ident = sql.Identifier(self.schema)
                    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
                    conn.execute(sql.SQL("SET search_path TO {}").format(ident))
                conn.execute(_MIGRATIONS_TABLE)
        except psycopg.Error as exc:
            raise StoreError(f"cannot open PostgreSQL store: {_redact(str(exc))}") from exc
        return conn

    @contextmanager
    def transaction(self, exclusive: str | None = None) -> Iterator[Tx]:
        import psycopg
        from psycopg import sql

        with self._lock:
            if self._conn.closed or self._conn.broken:
                self._conn = self._connect()
            try:
                with self._conn.transaction(), self._conn.cursor() as cursor:
                    if exclusive == "schema_migrations":
                        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_MIGRATION_LOCK,))
                    elif exclusive:
                        cursor.execute(
                            sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(
                                sql.Identifier(exclusive)
                            )
                        )
                    yield Tx(cursor, self.dialect)
            except psycopg.Error as exc:  # not only lost connections: UNAVAILABLE, named
                raise StoreError(f"PostgreSQL store: {_redact(str(exc))}") from exc

    def _sibling(self) -> Store:
        return PostgresStore(self.url, self.schema)

    def close(self) -> None:
        self._close_reporting()
        with self._lock:
            self._conn.close()


def _redact(message: str) -> str:
    """Drop a password that a connection error may echo from the URL."""
    return re.sub(r"(password=)\S+", r"\1***", message)


def sqlite_path(target: str) -> str | None:
    """The file of a ``sqlite:PATH`` (or ``sqlite:///abs/path``) store URL; None for others."""
    if not target.startswith("sqlite:"):
        return None
    path = target.removeprefix("sqlite:")
    return path[2:] if path.startswith("///") else path  # URL style keeps one slash


def open_store(target: str, *, schema: str | None = None) -> Store:
    """Open (and migrate) the store named by ``sqlite:PATH`` or ``postgresql://…``.

    ``schema`` (PostgreSQL only) keeps the tables in that schema, created if missing.
    """
    if (path := sqlite_path(target)) is not None:
        if not path:
            raise InvalidRequestError("store", "sqlite: needs a path, e.g. sqlite:gateway.db")
        store: Store = SqliteStore(path)
    elif target.startswith(("postgresql://", "postgres://")):
        store = PostgresStore(target, schema=schema)
    else:
        raise InvalidRequestError(
            "store", f"expected sqlite:PATH or postgresql://…, got {target.split(':', 1)[0]!r}"
        )
    try:
        store.migrate()
    except BaseException:
        store.close()
        raise
    return store
