"""Errors the engine raises for bad input, each naming what was wrong.

Services map them to gRPC status codes (``grpc_code``); the CLI prints the
message. Nothing here imports torch, so the router and gateway can use them.
"""

from __future__ import annotations


class TandemError(Exception):
    """Base class: a clear, user-facing message and the gRPC status it maps to."""

    grpc_code: str = "INTERNAL"


class InvalidRequestError(TandemError, ValueError):
    """A request field is out of range or malformed (INVALID_ARGUMENT)."""

    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class ModelNotFoundError(TandemError, LookupError):
    """The model name is neither a built-in model nor a checkpoint directory, or a worker
    was asked for another model than the one it serves (NOT_FOUND)."""

    grpc_code = "NOT_FOUND"


class CheckpointError(TandemError, ValueError):
    """A checkpoint directory is incomplete or inconsistent (FAILED_PRECONDITION)."""

    grpc_code = "FAILED_PRECONDITION"


class OutOfBlocksError(TandemError, RuntimeError):
    """The KV pool cannot hold a request even when it runs alone (RESOURCE_EXHAUSTED)."""

    grpc_code = "RESOURCE_EXHAUSTED"
