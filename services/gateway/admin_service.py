"""The gateway's ``tandem.v1.Admin`` servicer: mint, list and revoke API keys.

Every call needs the policy's admin role (a Keycloak token carrying it, or an API key minted
with ``admin``); others get PERMISSION_DENIED (ErrorInfo ``ADMIN_ROLE_REQUIRED``). Every call,
allowed or denied, leaves one audit record whose reason names the action and its target (key
id, team); secrets never appear in records, logs or errors. Requests are validated as a whole:
INVALID_ARGUMENT carries one BadRequest field violation per bad field. An unknown key id to
revoke is NOT_FOUND.

Order of a create: mint, then audit. If the audit record cannot be written the call fails
UNAVAILABLE and the secret is never returned, so the minted key is unusable (nobody has its
secret); it stays listed, and an operator may revoke it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc.aio

from services.engine.errors import TandemError
from services.gateway.api_keys import KEY_ID, MAX_DESCRIPTION, ApiKey, ApiKeys
from services.gateway.auth import Identity
from services.gateway.call_auth import CallGuard, abort_error
from services.gateway.policy import LIMIT_FIELDS, Policy
from services.stubs.tandem.v1 import admin_pb2, admin_pb2_grpc


def key_info(key: ApiKey) -> admin_pb2.ApiKeyInfo:
    """The public description of ``key`` (no secret, no hash)."""
    info = admin_pb2.ApiKeyInfo(
        key_id=key.key_id,
        team=key.team,
        models=list(key.models),
        limits=admin_pb2.ApiKeyLimits(
            **{name: int(v) for name, v in key.limits.items() if name in LIMIT_FIELDS}
        ),
        description=key.description,
        admin=key.admin,
        created_by=key.created_by,
    )
    info.created_at.FromMicroseconds(round(key.created_at * 1e6))
    if key.revoked_at is not None:
        info.revoked_at.FromMicroseconds(round(key.revoked_at * 1e6))
    return info


def create_violations(request: admin_pb2.CreateApiKeyRequest) -> list[tuple[str, str]]:
    """Every (field, problem) of a CreateApiKeyRequest; empty when it is valid."""
    bad = []
    if not request.team.strip():
        bad.append(("team", "must be a non-empty team name"))
    if not request.models:
        bad.append(("models", "must name at least one model"))
    for i, model in enumerate(request.models):
        if not model.strip():
            bad.append((f"models[{i}]", "must be a non-empty model name"))
    for name in LIMIT_FIELDS:
        if request.limits.HasField(name) and getattr(request.limits, name) < 1:
            bad.append(
                (f"limits.{name}", f"must be at least 1, got {getattr(request.limits, name)}")
            )
    if len(request.description) > MAX_DESCRIPTION:
        bad.append(("description", f"must be at most {MAX_DESCRIPTION} characters"))
    return bad


class AdminService(admin_pb2_grpc.AdminServicer):
    """API key administration; see the module docstring."""

    def __init__(self, guard: CallGuard, policy: Policy, api_keys: ApiKeys) -> None:
        self._guard = guard
        self._policy = policy
        self._keys = api_keys

    async def _admin(self, context: grpc.aio.ServicerContext, action: str) -> Identity:
        who = await self._guard.authenticate(context, action)
        if not self._policy.is_admin(who.caller):
            await self._guard.deny(
                context,
                who,
                action,
                f"{action} requires the admin role {self._policy.admin_role!r}",
                "ADMIN_ROLE_REQUIRED",
                {"role": self._policy.admin_role},
            )
        return who

    async def CreateApiKey(
        self, request: admin_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateApiKeyResponse:
        who = await self._admin(context, "CreateApiKey")
        bad = create_violations(request)
        if bad:
            message = "invalid CreateApiKeyRequest: " + "; ".join(f"{f}: {d}" for f, d in bad)
            await self._guard.invalid(context, who, "CreateApiKey", message, bad)
        await self._within_own_models(context, who, request.models)
        limits = {n: getattr(request.limits, n) for n in LIMIT_FIELDS if request.limits.HasField(n)}
        try:
            minted = await asyncio.to_thread(
                self._keys.mint,
                request.team,
                list(request.models),
                limits,
                who.principal,
                admin=request.admin,
                description=request.description,
            )
        except TandemError as exc:
            await abort_error(context, exc)
        key = minted.key
        reason = (
            f"CreateApiKey: key {key.key_id} for team {key.team}, models {','.join(key.models)}"
            + (", admin" if key.admin else "")
        )
        await self._guard.record(
            context, self._guard.event(context, who, "allow", reason, key.team)
        )
        return admin_pb2.CreateApiKeyResponse(secret=minted.secret, key=key_info(key))

    async def _within_own_models(
        self, context: grpc.aio.ServicerContext, who: Identity, models: Iterable[str]
    ) -> None:
        """An admin API key mints keys only for models it may use itself: a key scoped to
        some models is a delegation, and must not hand out more than it was given (a
        person's admin token, unscoped, mints any)."""
        own = who.caller.key_models
        beyond = sorted(set(models) - own) if own is not None else []
        if beyond:
            await self._guard.deny(
                context,
                who,
                "CreateApiKey",
                f"this API key may mint keys only for its own models ({', '.join(sorted(own))}); "
                f"not for {', '.join(beyond)}: use an admin token or a key minted for them",
                "KEY_SCOPE_EXCEEDED",
                {"models": ",".join(beyond)},
            )

    async def ListApiKeys(
        self, request: admin_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListApiKeysResponse:
        who = await self._admin(context, "ListApiKeys")
        try:
            keys = await asyncio.to_thread(self._keys.list, request.team or None)
        except TandemError as exc:
            await abort_error(context, exc)
        reason = f"ListApiKeys: team {request.team or '*'}, {len(keys)} keys"
        await self._guard.record(
            context, self._guard.event(context, who, "allow", reason, request.team)
        )
        return admin_pb2.ListApiKeysResponse(keys=[key_info(k) for k in keys])

    async def RevokeApiKey(
        self, request: admin_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevokeApiKeyResponse:
        who = await self._admin(context, "RevokeApiKey")
        if not KEY_ID.fullmatch(request.key_id):
            await self._guard.invalid(
                context,
                who,
                "RevokeApiKey",
                # The value is not echoed: a confused caller may have pasted a secret.
                "key_id must be 16 lowercase hex digits (the id ListApiKeys shows)",
                [("key_id", "must be 16 lowercase hex digits")],
            )
        try:
            key = await asyncio.to_thread(self._keys.revoke, request.key_id)
        except TandemError as exc:  # KeyNotFoundError → NOT_FOUND
            event = self._guard.event(
                context, who, "allow", f"RevokeApiKey: key {request.key_id}: {exc}"
            )
            await self._guard.record(context, event)
            await abort_error(context, exc)
        reason = f"RevokeApiKey: key {key.key_id} of team {key.team}"
        await self._guard.record(
            context, self._guard.event(context, who, "allow", reason, key.team)
        )
        return admin_pb2.RevokeApiKeyResponse(key=key_info(key))
