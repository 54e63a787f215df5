"""Authenticate, authorize and audit one call of the gateway's Admin and Usage services.

Inference does the same in its pipeline (``pipeline.py``) because it also meters; the management
services share these helpers so that every refusal has the same shape: UNAUTHENTICATED or
PERMISSION_DENIED with ``google.rpc.ErrorInfo``, and one ``deny`` audit record naming the
action and why.

Audit records of management calls are not best effort: an admin action whose record cannot
be written fails (UNAVAILABLE) instead of happening unrecorded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import NoReturn

import grpc.aio

from services.engine.errors import TandemError
from services.gateway import status_details
from services.gateway.audit import AuditEvent, AuditLog
from services.gateway.auth import Authenticator, Identity, MissingCredential
from services.gateway.identity import AuthenticationError


class CallGuard:
    """What the Admin and Usage servicers share: who is calling, and the audit trail."""

    def __init__(self, authenticator: Authenticator, audit: AuditLog) -> None:
        self._auth = authenticator
        self._audit = audit

    async def authenticate(self, context: grpc.aio.ServicerContext, action: str) -> Identity:
        """The caller, or abort UNAUTHENTICATED (audited as a denial of ``action``)."""
        try:
            return await self._auth.authenticate(context.invocation_metadata())
        except AuthenticationError as exc:
            event = AuditEvent(
                principal="anonymous",
                decision="deny",
                reason=f"{action}: unauthenticated: {exc}",
                source=context.peer() or "",
            )
            await self.record(context, event)
            refused = status_details.refused_credential(exc, isinstance(exc, MissingCredential))
            await status_details.abort_with_details(context, refused)
            raise  # abort raises; never reached

    async def deny(
        self,
        context: grpc.aio.ServicerContext,
        who: Identity,
        action: str,
        message: str,
        reason: str,
        metadata: Mapping[str, str] | None = None,
    ) -> NoReturn:
        """Audit a denial of ``action`` and abort PERMISSION_DENIED with ErrorInfo ``reason``."""
        await self.record(context, self.event(context, who, "deny", f"{action}: {message}"))
        await status_details.abort_with_details(
            context, status_details.permission_denied(message, reason, metadata=metadata)
        )
        raise AssertionError("abort_with_details returned")  # grpc's abort always raises

    async def invalid(
        self,
        context: grpc.aio.ServicerContext,
        who: Identity,
        action: str,
        message: str,
        violations: Sequence[tuple[str, str]],
    ) -> NoReturn:
        """Audit a refusal of ``action`` for invalid arguments and abort INVALID_ARGUMENT with
        BadRequest. The record names the fields, never their values: a confused caller may
        have pasted a secret into one."""
        fields = ", ".join(sorted({f for f, _ in violations}))
        reason = f"{action}: invalid argument ({fields})"
        await self.record(context, self.event(context, who, "deny", reason))
        await status_details.abort_with_details(
            context, status_details.invalid_argument(message, violations)
        )
        raise AssertionError("abort_with_details returned")  # grpc's abort always raises

    def event(
        self,
        context: grpc.aio.ServicerContext,
        who: Identity,
        decision: str,
        reason: str,
        team: str = "",
    ) -> AuditEvent:
        """An audit event for ``who``; ``team`` is the team acted on (default: the caller's)."""
        return AuditEvent(
            principal=who.principal,
            decision=decision,
            reason=reason,
            team=team or who.team,
            client=who.client,
            source=context.peer() or "",
        )

    async def record(self, context: grpc.aio.ServicerContext, event: AuditEvent) -> None:
        """Append ``event``; if the audit log cannot be written, abort the call UNAVAILABLE."""
        try:
            await asyncio.to_thread(self._audit.append, event)
        except TandemError as exc:
            await abort_error(context, exc)


async def abort_error(context: grpc.aio.ServicerContext, exc: TandemError) -> NoReturn:
    """Abort with the status ``exc`` maps to (details where its type has them)."""
    await status_details.abort_with_details(context, status_details.from_error(exc))
    raise AssertionError("abort_with_details returned")  # grpc's abort always raises
