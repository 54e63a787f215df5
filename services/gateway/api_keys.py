"""Gateway API keys for applications: minted once, stored hashed, scoped to a team and models.

A secret looks like ``tdm_<key id>_<random>``: the key id (16 hex digits) is public and names
the row; the random part is 32 bytes from :mod:`secrets`, URL-safe base64. Only a salted hash
of the whole secret is stored (PBKDF2-HMAC-SHA256 with a per-key 16-byte salt; the iteration
count is stored per key so it can be raised later). Because the secret carries 256 random bits,
stretching buys nothing against guessing, so the default iteration count is kept small: one
authentication costs well under a millisecond on the request path.

:meth:`ApiKeys.authenticate` looks the key up by the id embedded in the secret and compares
hashes with :func:`hmac.compare_digest`; an unknown id still hashes once (against a dummy
salt) so the two refusals take the same time. Revoked keys never authenticate. Secrets are
never logged, stored or returned after :meth:`ApiKeys.mint`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from services.engine.errors import InvalidRequestError, TandemError
from services.gateway.store import Store, now_us

log = logging.getLogger(__name__)

PREFIX = "tdm"
DEFAULT_ITERATIONS = 1_000
MAX_DESCRIPTION = 200
_SECRET = re.compile(r"^tdm_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
KEY_ID = re.compile(r"^[0-9a-f]{16}$")
"""What a key id looks like (the part of a secret after ``tdm_``)."""
_DUMMY_SALT = b"\x00" * 16


class KeyNotFoundError(TandemError, LookupError):
    """No API key has the given id (NOT_FOUND)."""

    grpc_code = "NOT_FOUND"


@dataclass(frozen=True)
class ApiKey:
    """What the gateway knows about a key: never its secret or hash."""

    key_id: str
    """Public id, embedded in the secret; names the key in lists, logs and the ledger."""
    team: str
    """The team the key acts for (quotas and usage are charged to it)."""
    models: tuple[str, ...]
    """The models the key may use (the policy file may narrow this further)."""
    limits: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """Optional per-key limits, e.g. ``{"requests_per_minute": 60}`` (read-only)."""
    created_by: str = ""
    """The principal that minted the key."""
    created_at: float = 0.0
    """Mint time, seconds since the epoch."""
    revoked_at: float | None = None
    """Revocation time, or None while the key is live."""
    admin: bool = False
    """The key carries the policy's admin role (Admin API, all usage); see ``auth``."""
    description: str = ""
    """Free text given at mint time: what the key is for."""

    @property
    def revoked(self) -> bool:
        """True once the key has been revoked."""
        return self.revoked_at is not None


@dataclass(frozen=True)
class MintedKey:
    """The result of minting: the secret, shown once, and the stored key."""

    secret: str = field(repr=False)
    """The full bearer secret; the caller must hand it over now, it cannot be recovered."""
    key: ApiKey
    """The stored key's public description."""


class ApiKeys:
    """Mint, authenticate, list and revoke API keys in a :class:`Store`."""

    def __init__(self, store: Store, *, iterations: int = DEFAULT_ITERATIONS) -> None:
        if iterations < 1:
            raise InvalidRequestError("iterations", "must be at least 1")
        self._store = store
        self._iterations = iterations

    def mint(
        self,
        team: str,
        models: Iterable[str],
        limits: Mapping[str, float] | None = None,
        created_by: str = "",
        *,
        admin: bool = False,
        description: str = "",
    ) -> MintedKey:
        """Create a key for ``team`` and ``models``; return its secret (this one time only).

        ``admin`` stores a flag, not a role name: the authenticator maps it to whatever the
        policy's ``admin_role`` is, so renaming that role does not strand admin keys.
        """
        model_list = _check_scope(team, models)
        limit_map = _check_limits(limits or {})
        if len(description) > MAX_DESCRIPTION:
            raise InvalidRequestError("description", f"at most {MAX_DESCRIPTION} characters")
        key_id = secrets.token_hex(8)
        secret = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        salt = secrets.token_bytes(16)
        created_us = now_us()
        with self._store.transaction() as tx:
            tx.execute(
                "INSERT INTO api_keys (key_id, team, models, limits, salt, iterations,"
                " secret_hash, created_by, created_us, revoked_us, admin, description)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                (
                    key_id,
                    team,
                    json.dumps(model_list),
                    json.dumps(limit_map, sort_keys=True),
                    salt,
                    self._iterations,
                    _hash(secret, salt, self._iterations),
                    created_by,
                    created_us,
                    int(admin),
                    description,
                ),
            )
        log.info("minted API key %s for team %s by %s", key_id, team, created_by or "?")
        key = ApiKey(
            key_id=key_id,
            team=team,
            models=tuple(model_list),
            limits=MappingProxyType(limit_map),
            created_by=created_by,
            created_at=created_us / 1e6,
            admin=admin,
            description=description,
        )
        return MintedKey(secret=secret, key=key)

    def authenticate(self, secret: str) -> ApiKey | None:
        """The live key whose secret this is, or None (malformed, unknown, wrong or revoked)."""
        match = _SECRET.match(secret)
        if match is None:
            return None
        with self._store.transaction() as tx:
            row = tx.fetchone(
                f"SELECT {_COLUMNS}, salt, iterations, secret_hash FROM api_keys WHERE key_id = ?",
                (match.group(1),),
            )
        if row is None:
            _hash(secret, _DUMMY_SALT, self._iterations)  # same work as a wrong secret
            return None
        salt, iterations, stored = bytes(row[-3]), int(row[-2]), bytes(row[-1])
        if not hmac.compare_digest(_hash(secret, salt, iterations), stored):
            return None
        key = _key_from_row(row[:-3])
        return None if key.revoked else key

    def list(self, team: str | None = None) -> tuple[ApiKey, ...]:
        """Every key (of ``team`` when given), oldest first; revoked keys included."""
        sql = f"SELECT {_COLUMNS} FROM api_keys"
        params: tuple[str, ...] = ()
        if team is not None:
            sql, params = sql + " WHERE team = ?", (team,)
        with self._store.transaction() as tx:
            rows = tx.fetchall(sql + " ORDER BY created_us, key_id", params)
        return tuple(_key_from_row(row) for row in rows)

    def get(self, key_id: str) -> ApiKey:
        """The key with this id (revoked or not); :class:`KeyNotFoundError` if none."""
        with self._store.transaction() as tx:
            row = tx.fetchone(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,))
        if row is None:
            if not KEY_ID.fullmatch(key_id):  # not echoed: it may be a pasted secret
                raise KeyNotFoundError(
                    "no API key with the id given: a key id is 16 hex digits (the part after "
                    "tdm_; never pass the secret itself)"
                )
            raise KeyNotFoundError(f"no API key with id {key_id!r}")
        return _key_from_row(row)

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke the key (idempotent: a second revoke keeps the first time); return it."""
        with self._store.transaction() as tx:
            changed = tx.execute(
                "UPDATE api_keys SET revoked_us = ? WHERE key_id = ? AND revoked_us IS NULL",
                (now_us(), key_id),
            )
        key = self.get(key_id)
        if changed:
            log.info("revoked API key %s of team %s", key_id, key.team)
        return key


_COLUMNS = "key_id, team, models, limits, created_by, created_us, revoked_us, admin, description"


def _key_from_row(row: tuple[object, ...]) -> ApiKey:
    key_id, team, models, limits, created_by, created_us, revoked_us, admin, description = row
    return ApiKey(
        key_id=str(key_id),
        team=str(team),
        models=tuple(json.loads(str(models))),
        limits=MappingProxyType(json.loads(str(limits))),
        created_by=str(created_by),
        created_at=int(created_us) / 1e6,  # type: ignore[call-overload]
        revoked_at=None if revoked_us is None else int(revoked_us) / 1e6,  # type: ignore[call-overload]
        admin=bool(admin),
        description=str(description),
    )


def _hash(secret: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)


def _check_scope(team: str, models: Iterable[str]) -> list[str]:
    if not isinstance(team, str) or not team.strip():
        raise InvalidRequestError("team", "must be a non-empty string")
    model_list = sorted(set(models)) if not isinstance(models, str) else [models]
    if not model_list or not all(isinstance(m, str) and m.strip() for m in model_list):
        raise InvalidRequestError("models", "must be a non-empty list of model names")
    return model_list


def _check_limits(limits: Mapping[str, float]) -> dict[str, float]:
    checked: dict[str, float] = {}
    for name, value in limits.items():
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("limits", f"limit names must be strings, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise InvalidRequestError(f"limits.{name}", f"must be a number >= 0, got {value!r}")
        checked[name] = value
    return checked
