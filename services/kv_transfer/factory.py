"""Pick a KV transport by name: what a worker's ``--kv-transport`` flag selects."""

from __future__ import annotations

from services.engine.kv_cache import KVCache
from services.kv_transfer.transport import KVTransport
from services.rpc.tls import TlsConfig

TRANSPORT_KINDS = ("auto", "nixl", "grpc")
"""auto: NIXL when it works on this host, else the gRPC byte stream."""


def make_transport(
    kind: str, kv: KVCache, worker_id: str, tls: TlsConfig | None = None
) -> KVTransport:
    """A transport over ``kv``. Raises ValueError for an unknown kind, RuntimeError when
    ``nixl`` is asked for explicitly on a host where NIXL does not work. ``tls`` secures the
    gRPC channels to peers (ReadBlocks; NIXL's own data path is UCX's)."""
    from services.kv_transfer.grpc_transport import GrpcTransport
    from services.kv_transfer.nixl_transport import NixlTransport, nixl_available

    if kind not in TRANSPORT_KINDS:
        choices = ", ".join(TRANSPORT_KINDS)
        raise ValueError(f"unknown KV transport {kind!r}: choose one of {choices}")
    if kind == "grpc" or (kind == "auto" and not nixl_available()):
        return GrpcTransport(kv, tls=tls)
    if not nixl_available():
        raise RuntimeError(
            "KV transport 'nixl' was asked for but NIXL with its UCX backend does not work "
            "here (see the log); use 'grpc' or 'auto'"
        )
    return NixlTransport(kv, worker_id, tls=tls)
