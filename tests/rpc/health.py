"""The status of one grpc.health.v1 Check: how the TLS tests see whether a dial got in."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.rpc.server import client_channel
from services.rpc.tls import TlsConfig


async def health_status(address: str, tls: TlsConfig | None) -> grpc.StatusCode:
    """One Health.Check of ``address`` dialled with ``tls`` (None: plaintext); its code."""
    async with client_channel(address, tls=tls) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK
