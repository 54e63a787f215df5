"""Resolve a call's ``authorization: Bearer X`` metadata to an authenticated caller.

A bearer value starting with ``tdm_`` is an API key (:class:`ApiKeys`); anything else is an
OIDC access token (:class:`OidcVerifier`). An API key minted with ``admin`` gets the policy's
admin role; otherwise a key has no roles, only its team and models. Either way the result is an
:class:`Identity`: the policy :class:`Caller` plus who to charge and audit. Missing or invalid
credentials raise :class:`AuthenticationError` with a short reason (never the credential itself).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from services.gateway.api_keys import PREFIX, ApiKeys
from services.gateway.identity import AuthenticationError, OidcVerifier
from services.gateway.policy import Caller


class MissingCredential(AuthenticationError):
    """No usable ``authorization: Bearer …`` metadata (UNAUTHENTICATED)."""


KEY_PRINCIPAL_PREFIX = "key:"
"""An API key's principal is ``key:<key id>``; no token subject may start so."""


@dataclass(frozen=True)
class Identity:
    """An authenticated caller."""

    principal: str
    """Token subject, or ``key:<id>`` for an API key."""
    caller: Caller
    """What the policy checks."""
    team: str = ""
    """The team charged (the key's team; for a token, its first team in sorted order)."""
    key_id: str | None = None
    """The API key used, if any."""
    client: str = ""
    """The OIDC client (``azp``) or the API key id."""
    key_limits: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """Per-key limit overrides (API keys only)."""


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The bearer value of the ``authorization`` metadata; AuthenticationError if none."""
    for name, value in metadata or ():
        if name.lower() != "authorization":
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, credential = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise MissingCredential("authorization metadata must be 'Bearer <credential>'")
        return credential.strip()
    raise MissingCredential("missing authorization metadata (expected 'Bearer <credential>')")


class Authenticator:
    """API keys first (by prefix), then OIDC tokens."""

    def __init__(
        self, verifier: OidcVerifier | None, api_keys: ApiKeys | None, admin_role: str = ""
    ) -> None:
        self._verifier = verifier
        self._api_keys = api_keys
        # The policy's admin role, given to keys minted with ``admin`` (empty: none). Keys
        # store a flag rather than the role's name so that renaming the role in the policy
        # does not strand them.
        self._admin_role = admin_role

    async def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Identity:
        credential = bearer(metadata)
        if credential.startswith(PREFIX + "_"):
            if self._api_keys is None:
                raise AuthenticationError("API keys are not accepted here")
            key = await asyncio.to_thread(self._api_keys.authenticate, credential)
            if key is None:
                raise AuthenticationError("invalid API key (unknown, wrong or revoked)")
            return Identity(
                principal=f"{KEY_PRINCIPAL_PREFIX}{key.key_id}",
                caller=Caller(
                    roles=frozenset({self._admin_role} if key.admin and self._admin_role else ()),
                    teams=frozenset({key.team}),
                    key_models=frozenset(key.models),
                ),
                team=key.team,
                key_id=key.key_id,
                client=key.key_id,
                key_limits=key.limits,
            )
        if self._verifier is None:
            raise AuthenticationError(
                "OIDC is not configured on this gateway (no issuer): use an API key (tdm_…)"
            )
        principal = await self._verifier.verify(credential)
        if principal.subject.startswith(KEY_PRINCIPAL_PREFIX):
            # API keys' principals: a token naming one would read that key's usage as its own
            raise AuthenticationError(
                f"token subject starts with {KEY_PRINCIPAL_PREFIX!r}, which names API keys here"
            )
        roles = principal.roles
        if self._admin_role in principal.client_granted:  # see Principal.client_granted
            roles = roles - {self._admin_role}
        return Identity(
            principal=principal.subject,
            caller=Caller(roles=roles, teams=principal.teams),
            team=min(principal.teams, default=""),
            client=principal.client_id,
        )
