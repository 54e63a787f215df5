"""API keys against real SQLite and PostgreSQL: mint, authenticate, revoke, list, storage."""

from __future__ import annotations

import hashlib

import pytest

from services.engine.errors import InvalidRequestError
from services.gateway.api_keys import ApiKeys, KeyNotFoundError
from services.gateway.store import Store
from tests.gateway.conftest import StoreFactory, all_rows


def test_mint_then_authenticate_returns_the_scoped_key(store: Store) -> None:
    keys = ApiKeys(store)
    minted = keys.mint("ml", ["tandem-tiny", "llama"], {"requests_per_minute": 60}, "alice")
    assert minted.secret.startswith(f"tdm_{minted.key.key_id}_")
    assert minted.secret not in repr(minted)
    key = keys.authenticate(minted.secret)
    assert key is not None
    assert key == minted.key
    assert key.team == "ml" and key.models == ("llama", "tandem-tiny")
    assert dict(key.limits) == {"requests_per_minute": 60}
    assert key.created_by == "alice" and not key.revoked


def test_wrong_secret_with_a_valid_id_is_refused(store: Store) -> None:
    keys = ApiKeys(store)
    minted = keys.mint("ml", ["m"])
    prefix, key_id, random_part = minted.secret.split("_", 2)
    flipped = ("A" if random_part[0] != "A" else "B") + random_part[1:]
    assert keys.authenticate(f"{prefix}_{key_id}_{flipped}") is None
    other = keys.mint("ml", ["m"])
    assert keys.authenticate(f"tdm_{key_id}_{other.secret.split('_', 2)[2]}") is None
    for garbage in ("", "tdm_", "Bearer x", minted.secret + "x", minted.secret[:-1]):
        assert keys.authenticate(garbage) is None
    assert keys.authenticate(f"tdm_{'0' * 16}_{random_part}") is None  # unknown id


def test_revoked_keys_never_authenticate(open_same: StoreFactory) -> None:
    keys = ApiKeys(open_same())
    minted = keys.mint("ml", ["m"])
    keep = keys.mint("ml", ["m"])
    revoked = keys.revoke(minted.key.key_id)
    assert revoked.revoked and revoked.revoked_at is not None
    assert keys.authenticate(minted.secret) is None
    assert keys.revoke(minted.key.key_id).revoked_at == revoked.revoked_at  # idempotent
    replica = ApiKeys(open_same())  # another gateway replica sees the revocation
    assert replica.authenticate(minted.secret) is None
    assert replica.authenticate(keep.secret) == keep.key
    with pytest.raises(KeyNotFoundError) as err:
        keys.revoke("0" * 16)
    assert err.value.grpc_code == "NOT_FOUND"


def test_list_filters_by_team_and_never_exposes_secrets(store: Store) -> None:
    keys = ApiKeys(store)
    a1, a2 = keys.mint("a", ["m"]), keys.mint("a", ["m"])
    b = keys.mint("b", ["m"])
    keys.revoke(a2.key.key_id)
    assert {k.key_id for k in keys.list()} == {a1.key.key_id, a2.key.key_id, b.key.key_id}
    listed = keys.list(team="a")
    assert [k.key_id for k in listed] == [a1.key.key_id, a2.key.key_id]
    assert [k.revoked for k in listed] == [False, True]
    assert keys.list(team="nobody") == ()
    text = repr(keys.list())
    for minted in (a1, a2, b):
        assert minted.secret.split("_", 2)[2] not in text
        assert "hash" not in text and "salt" not in text


def test_the_secret_is_not_stored(store: Store) -> None:
    keys = ApiKeys(store)
    minted = keys.mint("ml", ["m"], created_by="admin")
    random_part = minted.secret.split("_", 2)[2]
    plain_digests = {
        hashlib.sha256(minted.secret.encode()).digest(),
        hashlib.sha256(minted.secret.encode()).hexdigest(),
    }
    rows = all_rows(store, "api_keys")
    assert len(rows) == 1
    for value in rows[0]:
        raw = bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode()
        assert minted.secret.encode() not in raw
        assert random_part.encode() not in raw
        assert raw not in {d if isinstance(d, bytes) else d.encode() for d in plain_digests}


def test_each_key_has_its_own_salt(store: Store) -> None:
    keys = ApiKeys(store)
    keys.mint("ml", ["m"])
    keys.mint("ml", ["m"])
    with store.transaction() as tx:
        salts = [bytes(r[0]) for r in tx.fetchall("SELECT salt FROM api_keys")]
    assert len(set(salts)) == 2 and all(len(s) == 16 for s in salts)


def test_bad_mint_arguments_are_refused(store: Store) -> None:
    keys = ApiKeys(store)
    with pytest.raises(InvalidRequestError, match="team"):
        keys.mint("", ["m"])
    with pytest.raises(InvalidRequestError, match="models"):
        keys.mint("ml", [])
    with pytest.raises(InvalidRequestError, match=r"limits\.rpm"):
        keys.mint("ml", ["m"], {"rpm": -1})
    assert keys.list() == ()
