"""Stores for the gateway tests: a real SQLite file and a real PostgreSQL schema per test.

PostgreSQL comes from ``TANDEM_TEST_POSTGRES_URL`` (default: the local server); each test
gets a uniquely named schema, dropped afterwards. If the server is unreachable the
PostgreSQL cases are skipped, saying why.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from services.gateway.store import Store, open_store
from tests.gateway.issuer import Issuer

POSTGRES_URL = os.environ.get(
    "TANDEM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)

StoreFactory = Callable[[], Store]


def _postgres_unreachable() -> str | None:
    try:
        import psycopg

        with psycopg.connect(POSTGRES_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"PostgreSQL at {POSTGRES_URL} unreachable: {type(exc).__name__}: {exc}"
    return None


def _drop_schema(schema: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=["sqlite", "postgresql"])
def open_same(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens stores on one fresh database (SQLite file or PostgreSQL schema); closes them."""
    opened: list[Store] = []
    schema = f"tandem_test_{uuid.uuid4().hex[:16]}"
    if request.param == "postgresql" and (reason := _postgres_unreachable()):
        pytest.skip(reason)

    def factory() -> Store:
        if request.param == "sqlite":
            store = open_store(f"sqlite:{tmp_path / 'gateway.db'}")
        else:
            store = open_store(POSTGRES_URL, schema=schema)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()
    if request.param == "postgresql":
        _drop_schema(schema)


@pytest.fixture
def store(open_same: StoreFactory) -> Store:
    """One open store on a fresh database, parametrized over SQLite and PostgreSQL."""
    return open_same()


def all_rows(store: Store, table: str) -> list[tuple[object, ...]]:
    """Every row of ``table`` (a test helper: raw SQL)."""
    with store.transaction() as tx:
        return tx.fetchall(f"SELECT * FROM {table}")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store URL a gateway opens by itself on a fresh database: a SQLite file, or a
    PostgreSQL schema selected through libpq's ``options=-csearch_path=…``."""
    if request.param == "sqlite":
        yield f"sqlite:{tmp_path / 'gateway.db'}"
        return
    if reason := _postgres_unreachable():
        pytest.skip(reason)
    import psycopg
    from psycopg import sql

    schema = f"tandem_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    sep = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{sep}options={quote(f'-csearch_path={schema}')}"
    _drop_schema(schema)


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    """The Keycloak-compatible test issuer, on loopback for one test."""
    server = Issuer()
    yield server
    server.close()


@pytest.fixture
def rds() -> Iterator[redis.Redis]:
    """A client of the local Redis (127.0.0.1:6379); the test is skipped when it is down."""
    client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("Redis not running at 127.0.0.1:6379")
    yield client
    client.close()


@pytest.fixture
def prefix(rds: redis.Redis) -> Iterator[str]:
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    p = f"test:{uuid.uuid4().hex}:"
    yield p
    keys = list(rds.scan_iter(match=p + "*", count=1000))
    if keys:
        rds.delete(*keys)
