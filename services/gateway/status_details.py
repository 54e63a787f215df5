"""Rich gRPC errors: ``google.rpc.Status`` with details, sent from grpc.aio servicers.

Design
------
Each helper builds a ``google.rpc.status_pb2.Status`` whose ``code`` is the numeric gRPC
code and whose ``message`` is the text the caller sees; ``abort_with_details`` converts it
with ``grpc_status.rpc_status.to_status`` (which puts the serialized Status in the
``grpc-status-details-bin`` trailer and uses the same code and message for the call), so
the call's code/message and the detail Status's always agree, as the spec requires.
Clients read it back with ``rpc_status.from_call(call)``.

Detail choice (FIELD.md §4; HTTP 429 is never used, it maps to UNAVAILABLE in gRPC):

* RESOURCE_EXHAUSTED: ``QuotaFailure`` (subject = scope, description names the limit and
  reset time) always; ``RetryInfo`` only for windowed rate limits, never for an exhausted
  day/month budget (``retry_after_s is None``), where retrying soon cannot succeed.
* INVALID_ARGUMENT: ``BadRequest`` with one field violation per bad field.
* PERMISSION_DENIED / UNAUTHENTICATED: ``ErrorInfo`` (reason, domain, metadata).

Parameters: ``domain`` defaults to ``DOMAIN`` ("tandem.gateway") for ErrorInfo.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import grpc
import grpc.aio
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.engine.errors import InvalidRequestError, TandemError
from services.gateway.limits import LimitExceeded

DOMAIN = "tandem.gateway"


def _code(code: grpc.StatusCode) -> int:
    return code.value[0]


def _status(code: grpc.StatusCode, message: str, *details: object) -> status_pb2.Status:
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    return status_pb2.Status(code=_code(code), message=message, details=packed)


def retry_delay(seconds: float) -> duration_pb2.Duration:
    """A Duration rounded up to whole milliseconds (never advises retrying too early)."""
    ms = max(0, math.ceil(seconds * 1000))
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def resource_exhausted(
    message: str, subject: str, description: str, retry_after_s: float | None
) -> status_pb2.Status:
    """RESOURCE_EXHAUSTED with QuotaFailure, plus RetryInfo when a retry delay is known."""
    failure = error_details_pb2.QuotaFailure(
        violations=[
            error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)
        ]
    )
    details: list[object] = [failure]
    if retry_after_s is not None:
        details.append(error_details_pb2.RetryInfo(retry_delay=retry_delay(retry_after_s)))
    return _status(grpc.StatusCode.RESOURCE_EXHAUSTED, message, *details)


def limit_exceeded(exc: LimitExceeded) -> status_pb2.Status:
    """The Status for a ``LimitExceeded`` (RetryInfo only for windowed limits)."""
    kind = "quota" if exc.is_quota else "rate limit"
    description = (
        f"{kind} {exc.limit_name}={exc.limit}: {exc.used} used, "
        f"{exc.requested} requested; resets at unix {int(exc.reset_at)}"
    )
    return resource_exhausted(
        str(exc), exc.scope, description, None if exc.is_quota else exc.retry_after_s
    )


def invalid_argument(message: str, violations: Iterable[tuple[str, str]]) -> status_pb2.Status:
    """INVALID_ARGUMENT with a BadRequest holding (field, description) violations."""
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
            for f, d in violations
        ]
    )
    return _status(grpc.StatusCode.INVALID_ARGUMENT, message, bad)


def _error_info(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    domain: str,
    metadata: Mapping[str, str] | None,
) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=dict(metadata or {}))
    return _status(code, message, info)


def permission_denied(
    message: str, reason: str, domain: str = DOMAIN, metadata: Mapping[str, str] | None = None
) -> status_pb2.Status:
    """PERMISSION_DENIED (known caller, not allowed; never for quota) with ErrorInfo."""
    return _error_info(grpc.StatusCode.PERMISSION_DENIED, message, reason, domain, metadata)


def unauthenticated(
    message: str, reason: str, domain: str = DOMAIN, metadata: Mapping[str, str] | None = None
) -> status_pb2.Status:
    """UNAUTHENTICATED (missing or bad credential) with ErrorInfo."""
    return _error_info(grpc.StatusCode.UNAUTHENTICATED, message, reason, domain, metadata)


def unavailable(message: str, retry_after_s: float = 1.0) -> status_pb2.Status:
    """UNAVAILABLE (safe to retry) with RetryInfo: the gateway cannot take calls now."""
    return _status(
        grpc.StatusCode.UNAVAILABLE,
        message,
        error_details_pb2.RetryInfo(retry_delay=retry_delay(retry_after_s)),
    )


def refused_credential(exc: Exception, missing: bool) -> status_pb2.Status:
    """UNAUTHENTICATED for a credential refused by authentication: ErrorInfo reason
    CREDENTIAL_MISSING when none was sent, CREDENTIAL_INVALID otherwise."""
    return unauthenticated(str(exc), "CREDENTIAL_MISSING" if missing else "CREDENTIAL_INVALID")


def from_error(exc: TandemError) -> status_pb2.Status:
    """The Status for any TandemError, with details where its type carries them."""
    if isinstance(exc, LimitExceeded):
        return limit_exceeded(exc)
    if isinstance(exc, InvalidRequestError):
        return invalid_argument(str(exc), [(exc.field, exc.description)])
    code = getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)
    return _status(code, str(exc))


async def abort_with_details(
    context: grpc.aio.ServicerContext,
    status: status_pb2.Status,
    trailing: Iterable[tuple[str, str]] = (),
) -> None:
    """Abort the call with ``status``: same code and message, details in the trailer
    (``trailing`` metadata beside them)."""
    converted = rpc_status.to_status(status)
    await context.abort(
        converted.code,
        converted.details,
        trailing_metadata=(*converted.trailing_metadata, *trailing),
    )
