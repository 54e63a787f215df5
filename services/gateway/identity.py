"""Keycloak (OIDC) access-token verification, done locally against the realm's JWKS.

The realm's signing keys come from Keycloak's ``certs`` endpoint through python-keycloak,
are built into a jwcrypto ``JWKSet`` and cached. A token whose ``kid`` is not in the cached
set triggers one refetch: concurrent verifications of such tokens share a single fetch
(single-flight), and after a fetch (good or failed) no other fetch starts for
``refetch_cooldown_s``, so a flood of made-up ``kid`` values cannot turn into one request to
Keycloak per token. A failed fetch keeps the last good key set (tokens signed with known keys
keep verifying while Keycloak is down); with no key set at all, every token is refused (fail
closed).

Checks, in order, each refusal an :class:`AuthenticationError` (UNAUTHENTICATED) naming the
reason and never echoing the token:

1. the token is a compact JWS whose header ``alg`` is on the allow-list (RS256, ES256) —
   ``none`` and every HMAC algorithm are refused before any key is touched;
2. the signature, with the key named by ``kid`` (whose type must fit ``alg``);
3. ``iss`` equals the configured issuer exactly, ``typ`` is ``Bearer`` (ID and refresh tokens
   are refused), ``exp`` is present and not passed, ``nbf`` (when present) has been reached —
   both with ``leeway_s`` — ``azp`` is an allowed client and, when an audience is configured,
   ``aud`` contains it. Expiry is checked here, not left to jwcrypto (which skips ``exp`` when
   given ``check_claims`` without ``"exp": None``); a token without ``exp`` is refused.

Roles are ``realm_access.roles`` plus ``resource_access[azp].roles`` (and
``resource_access[audience].roles`` when an audience is configured: the roles Keycloak's
client-role mapper gives for the gateway's own client). The policy's admin role counts only
from the realm or the gateway's own client: a role of the caller's client is assigned by
whoever administers that client (``Principal.client_granted``). Teams come from ``team_claim``
(Keycloak's group-membership mapper writes ``groups``; a leading ``/`` of full group paths is
dropped, so ``/ml-research`` is team ``ml-research``).

Service accounts: a confidential client with "service accounts" enabled obtains an access
token with Keycloak's client-credentials grant (``POST …/protocol/openid-connect/token`` with
``grant_type=client_credentials``, ``client_id`` and ``client_secret``; with python-keycloak:
``KeycloakOpenID(..., client_id=ID, client_secret_key=SECRET).token(grant_type=
"client_credentials")``). Its ``azp`` is that client, its ``preferred_username`` is
``service-account-<client>``, and it is verified exactly like a person's token.

Nothing here does I/O on the hot path: a verification with a cached key is pure CPU work on
the calling thread; key fetches run on a worker thread (python-keycloak is blocking) that the
event loop awaits.

Verified tokens are remembered (an LRU of ``verified_cache_size`` entries, keyed by the
whole token): a client sends the same access token with every request for its lifetime, and
the signature check with jwcrypto costs ~0.5 ms of CPU each time. A remembered token is
still refused once ``exp`` (+ leeway) has passed, and every entry is forgotten when the key
set changes, so a key dropped from the realm stops its tokens at the next refetch. Nothing
else about a token can change: its claims are signed.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from jwcrypto.common import JWException
from jwcrypto.jwk import JWK, JWKSet
from jwcrypto.jws import JWS
from keycloak import KeycloakOpenID

from services.engine.errors import TandemError

log = logging.getLogger(__name__)

#: Signature algorithms a token may use. Never ``none``, never HMAC (HS*): an HMAC "signature"
#: keyed with the realm's public key would otherwise verify.
ALLOWED_ALGORITHMS: frozenset[str] = frozenset({"RS256", "ES256"})

_KEY_TYPE_FOR_ALG = {"RS256": "RSA", "ES256": "EC"}
_MAX_TOKEN_CHARS = 16_384
_REALM_URL = re.compile(r"^(?P<server>https?://[^?#]+?/)realms/(?P<realm>[^/?#]+)/?$")


class AuthenticationError(TandemError):
    """The credential is missing or invalid (UNAUTHENTICATED). The message says why."""

    grpc_code = "UNAUTHENTICATED"


@dataclass(frozen=True)
class Principal:
    """Who a verified access token speaks for."""

    subject: str
    username: str | None
    client_id: str
    roles: frozenset[str]
    teams: frozenset[str]
    expires_at: float
    client_granted: frozenset[str] = frozenset()
    """The roles only the caller's own client (``azp``) grants: whoever administers that
    client assigns them, not the realm's or the gateway client's administrators, so they
    open models the policy lists for them but never make a gateway admin."""


def _refuse(reason: str) -> AuthenticationError:
    return AuthenticationError(f"invalid access token: {reason}")


def _quote(value: object, limit: int = 64) -> str:
    """A claim value for a message: repr'd and cut short (it came from the caller)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _b64json(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw)
    except (ValueError, TypeError, RecursionError) as e:  # RecursionError: nested too deep
        raise _refuse(f"malformed token ({what} is not base64url JSON)") from e
    if not isinstance(value, dict):
        raise _refuse(f"malformed token ({what} is not a JSON object)")
    return value


@contextlib.contextmanager
def _malformed_is_refused() -> Iterator[None]:
    """Fail closed: a token shaped in a way no check foresaw (a claim of an unexpected JSON
    type reaching a comparison, say) is refused, never an internal error."""
    try:
        yield
    except AuthenticationError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as e:
        log.warning("refused a malformed access token (%s)", type(e).__name__)
        raise _refuse("malformed token") from e


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse(f"claim {name!r} is not a number")
    if not math.isfinite(value):  # JSON as Python reads it allows NaN and Infinity
        raise _refuse(f"claim {name!r} is not a finite number")
    return float(value)


def _strings(value: Any, what: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset({value})
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    raise _refuse(f"claim {what!r} is not a list of strings")


def build_keyset(certs: Mapping[str, Any], algorithms: Iterable[str]) -> JWKSet:
    """A jwcrypto key set of the signing keys in a JWKS document (``enc`` keys are skipped)."""
    allowed = set(algorithms)
    keyset = JWKSet()
    keys = certs.get("keys") if isinstance(certs, Mapping) else None
    if not isinstance(keys, list):
        raise ValueError("JWKS document has no 'keys' list")
    for entry in keys:
        if not isinstance(entry, dict) or not entry.get("kid"):
            continue
        if entry.get("use", "sig") != "sig":
            continue
        if "alg" in entry and entry["alg"] not in allowed:
            continue
        try:
            key = JWK(**entry)
        except JWException as e:
            log.warning("skipping JWKS key %r: %s", entry.get("kid"), e)
            continue
        if key.has_private:
            log.warning("JWKS key %r carries private material; skipped", entry.get("kid"))
            continue
        keyset.add(key)
    return keyset


class OidcVerifier:
    """Verifies Keycloak access tokens for one realm; see the module docstring."""

    def __init__(
        self,
        issuer_url: str,
        audience: str | None,
        allowed_clients: frozenset[str],
        team_claim: str = "groups",
        leeway_s: float = 30,
        refetch_cooldown_s: float = 10,
        *,
        algorithms: Iterable[str] = ALLOWED_ALGORITHMS,
        fetch_timeout_s: int = 5,
        gateway_client_id: str = "tandem-gateway",
        verified_cache_size: int = 4096,
    ) -> None:
        match = _REALM_URL.match(issuer_url)
        if match is None:
            raise ValueError(
                f"OIDC issuer URL must look like https://HOST/realms/NAME, got {issuer_url!r}"
            )
        if not allowed_clients:
            raise ValueError("allowed_clients must name at least one client (azp)")
        algs = frozenset(algorithms)
        bad = algs - ALLOWED_ALGORITHMS
        if bad or not algs:
            raise ValueError(f"algorithms must be a non-empty subset of RS256/ES256, got {algs}")
        self.issuer = issuer_url.rstrip("/")
        self.audience = audience
        self.allowed_clients = frozenset(allowed_clients)
        self.team_claim = team_claim
        self.leeway_s = float(leeway_s)
        self.refetch_cooldown_s = float(refetch_cooldown_s)
        self.algorithms = algs
        self._oidc = KeycloakOpenID(
            server_url=match["server"],
            realm_name=match["realm"],
            client_id=gateway_client_id,
            timeout=fetch_timeout_s,
        )
        self._keys: JWKSet | None = None
        self._state = threading.Lock()
        self._inflight: concurrent.futures.Future[bool] | None = None
        self._last_fetch = float("-inf")
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="jwks-fetch"
        )
        self.fetches = 0  # JWKS fetches attempted (for metrics and tests)
        # token -> (principal, the key set it was verified with); see the module docstring
        self._verified: OrderedDict[str, tuple[Principal, JWKSet]] = OrderedDict()
        self.verified_cache_size = verified_cache_size
        self.cache_hits = 0  # verifications answered from memory (for tests)

    # ---- key set -------------------------------------------------------------------------

    def _fetch(self) -> bool:
        """Blocking: fetch and install the realm's keys; False (last good set kept) on failure."""
        ok = False
        try:
            keyset = build_keyset(self._oidc.certs(), self.algorithms)
            if not keyset["keys"]:
                raise ValueError("JWKS has no usable signing keys")
            self._keys = keyset
            ok = True
        except Exception as e:  # any failure keeps the last good set
            log.warning("fetching signing keys from %s failed: %s", self.issuer, e)
        finally:
            with self._state:
                self._last_fetch = time.monotonic()
                self._inflight = None
        return ok

    def _start_fetch(self, force: bool) -> concurrent.futures.Future[bool] | None:
        with self._state:
            if self._inflight is not None:
                return self._inflight
            if not force and time.monotonic() - self._last_fetch < self.refetch_cooldown_s:
                return None
            self.fetches += 1
            self._inflight = self._executor.submit(self._fetch)
            return self._inflight

    async def refresh(self) -> bool:
        """Fetch the key set now (joining a fetch in flight). True when it succeeded."""
        future = self._start_fetch(force=True)
        assert future is not None
        return await asyncio.shield(asyncio.wrap_future(future))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _key(self, kid: str) -> JWK | None:
        keys = self._keys
        return None if keys is None else keys.get_key(kid)

    async def _key_for(self, kid: str) -> JWK | None:
        key = self._key(kid)
        if key is not None:
            return key
        future = self._start_fetch(force=False)
        if future is not None:
            await asyncio.shield(asyncio.wrap_future(future))
        return self._key(kid)

    # ---- verification --------------------------------------------------------------------

    async def verify(self, token: str) -> Principal:
        """Verify an access token; raises :class:`AuthenticationError` saying why not."""
        remembered = self._remembered(token)
        if remembered is not None:
            return remembered
        with _malformed_is_refused():
            header = self._header(token)
        key = await self._key_for(header["kid"])
        keys = self._keys
        if key is None or keys is None:
            if keys is None:
                raise _refuse("the identity provider's signing keys are unavailable")
            raise _refuse("signed with an unknown key (kid not in the realm's JWKS)")
        with _malformed_is_refused():
            principal = self._check(token, header, key)
        self._remember(token, principal, keys)
        return principal

    def _remembered(self, token: str) -> Principal | None:
        entry = self._verified.get(token) if isinstance(token, str) else None
        if entry is None:
            return None
        principal, keys = entry
        if keys is not self._keys or time.time() > principal.expires_at + self.leeway_s:
            del self._verified[token]  # re-verified below, and refused if now invalid
            return None
        self._verified.move_to_end(token)
        self.cache_hits += 1
        return principal

    def _remember(self, token: str, principal: Principal, keys: JWKSet) -> None:
        if self.verified_cache_size <= 0:
            return
        self._verified[token] = (principal, keys)
        while len(self._verified) > self.verified_cache_size:
            self._verified.popitem(last=False)

    def _header(self, token: str) -> dict[str, Any]:
        if not isinstance(token, str) or not token:
            raise _refuse("no token")
        if len(token) > _MAX_TOKEN_CHARS:
            raise _refuse(f"token longer than {_MAX_TOKEN_CHARS} characters")
        parts = token.split(".")
        if len(parts) != 3:
            raise _refuse("malformed token (not a compact JWS with three parts)")
        header = _b64json(parts[0], "header")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise _refuse(
                f"algorithm {_quote(alg)} is not allowed (allowed: {sorted(self.algorithms)})"
            )
        if "crit" in header:
            raise _refuse("unsupported critical header parameters")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _refuse("token header names no key (kid)")
        return header

    def _check(self, token: str, header: Mapping[str, Any], key: JWK) -> Principal:
        alg = header["alg"]
        if key.get("kty") != _KEY_TYPE_FOR_ALG[alg]:
            raise _refuse(f"key {_quote(header['kid'])} cannot verify {alg}")
        jws = JWS()
        jws.allowed_algs = [alg]
        try:
            jws.deserialize(token)
            jws.verify(key, alg=alg)
        except JWException as e:
            raise _refuse("bad signature") from e
        try:
            claims = json.loads(jws.payload)
        except (ValueError, TypeError, RecursionError) as e:
            raise _refuse("malformed token (payload is not JSON)") from e
        if not isinstance(claims, dict):
            raise _refuse("malformed token (payload is not a JSON object)")
        return self._principal(claims)

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        if claims.get("iss") != self.issuer:
            raise _refuse(f"wrong issuer {_quote(claims.get('iss'))}")
        typ = claims.get("typ")
        if typ != "Bearer":
            raise _refuse(f"not an access token (typ {_quote(typ)}, expected 'Bearer')")
        now = time.time()
        exp = _number(claims, "exp")
        if exp is None:
            raise _refuse("token has no expiry (exp)")
        if now > exp + self.leeway_s:
            raise _refuse(f"token expired {now - exp:.0f} s ago")
        nbf = _number(claims, "nbf")
        if nbf is not None and now + self.leeway_s < nbf:
            raise _refuse(f"token not yet valid (nbf is {nbf - now:.0f} s in the future)")
        azp = claims.get("azp")
        if not isinstance(azp, str) or azp not in self.allowed_clients:
            raise _refuse(f"client (azp) {_quote(azp)} is not allowed")
        if self.audience is not None and self.audience not in _strings(claims.get("aud"), "aud"):
            raise _refuse(f"wrong audience (expected {self.audience!r})")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise _refuse("token has no subject (sub)")
        username = claims.get("preferred_username")
        roles = set(self._roles(claims.get("realm_access"), "realm_access"))
        resource_access = claims.get("resource_access") or {}
        if not isinstance(resource_access, dict):
            raise _refuse("claim 'resource_access' is not an object")
        if self.audience is not None:
            roles |= self._roles(resource_access.get(self.audience), "resource_access.audience")
        own = self._roles(resource_access.get(azp), f"resource_access.{azp}")
        teams = _strings(claims.get(self.team_claim), self.team_claim)
        return Principal(
            subject=subject,
            username=username if isinstance(username, str) else None,
            client_id=azp,
            roles=frozenset(roles | own),
            client_granted=frozenset(own - roles),
            teams=frozenset(t.lstrip("/") for t in teams if t.lstrip("/")),
            expires_at=exp,
        )

    @staticmethod
    def _roles(access: Any, what: str) -> frozenset[str]:
        if access is None:
            return frozenset()
        if not isinstance(access, dict):
            raise _refuse(f"claim {what!r} is not an object")
        return _strings(access.get("roles"), f"{what}.roles")
