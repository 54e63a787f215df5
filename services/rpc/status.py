"""Turn Tandem's errors into gRPC statuses with messages that name the problem."""

from __future__ import annotations

import grpc

from services.engine.errors import TandemError

_CODES = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}


def status_code(error: TandemError) -> grpc.StatusCode:
    return _CODES.get(error.grpc_code, grpc.StatusCode.INTERNAL)


async def abort_with(context: grpc.aio.ServicerContext, error: TandemError) -> None:
    """End the call with the status ``error`` maps to and its message (raises)."""
    await context.abort(status_code(error), str(error))
