"""Errors the router raises, each carrying the gRPC status the client should see."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from services.engine.errors import TandemError

if TYPE_CHECKING:
    from services.router.registry import WorkerState


class RouteError(TandemError):
    """The request cannot go on; ``code`` and the message are what the client sees.

    Unlike TandemError's fixed ``grpc_code``, the code is per instance: a worker's
    own status (RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...) is passed through as is.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.grpc_code = code.name


class IncompatibleWorkerError(TandemError):
    """A worker cannot serve alongside those already registered (FAILED_PRECONDITION)."""

    grpc_code = "FAILED_PRECONDITION"


class UnknownWorkerError(TandemError, LookupError):
    """A heartbeat names a worker that is not registered, or was removed (NOT_FOUND)."""

    grpc_code = "NOT_FOUND"


class SupersededWorkerError(TandemError):
    """A heartbeat or KV stream comes from a process that another registration under the
    same worker id replaced (FAILED_PRECONDITION: it must stop, not register again and
    take the id back)."""

    grpc_code = "FAILED_PRECONDITION"


class WorkerLost(Exception):
    """A worker failed in a way another worker can make good (dead, hung, shutting down).

    Internal to the orchestrator: it excludes the worker's registry entry (not its id: a
    worker that registers again under the same id, a restarted process, is a new entry
    and may serve the request) and resumes the request.
    """

    def __init__(self, worker: WorkerState, reason: str) -> None:
        super().__init__(f"worker {worker.worker_id!r} {reason}")
        self.worker = worker
        self.worker_id = worker.worker_id
        self.reason = reason
