"""Errors of KV transfer, each mapping to the gRPC status a caller should see."""

from __future__ import annotations

from services.engine.errors import TandemError


class IncompatiblePeerError(TandemError, ValueError):
    """Two workers cannot share KV blocks: another model, block size, dtype, layout or
    protocol version (FAILED_PRECONDITION). The message names the first field that differs,
    both values, and what to change."""

    grpc_code = "FAILED_PRECONDITION"


class KVTransferError(TandemError, RuntimeError):
    """Reading blocks from a peer failed or ran past its deadline (UNAVAILABLE).

    The local destination blocks hold unspecified bytes afterwards; the caller either
    retries or computes the KV itself (the decode worker prefills locally).
    """

    grpc_code = "UNAVAILABLE"

    def __init__(self, message: str, peer_code: str | None = None) -> None:
        super().__init__(message)
        self.peer_code = peer_code
        """The gRPC status name the peer answered with (e.g. "NOT_FOUND": the lease ran
        out), or None when the failure was not a status from the peer."""
