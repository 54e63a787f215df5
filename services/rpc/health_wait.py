"""Wait, from a launcher, until a service answers grpc.health.v1 with SERVING."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

POLL_S = 0.2
"""Pause between health checks while a service starts."""


def wait_serving(
    channel: grpc.Channel,
    name: str,
    deadline: float,
    check_alive: Callable[[], None] = lambda: None,
) -> None:
    """Return once the service behind ``channel`` reports SERVING.

    ``check_alive`` runs before every check and raises when the service's process has
    died (a launcher should say so at once, not after the deadline); TimeoutError at
    ``deadline`` (a ``time.monotonic()`` value).
    """
    stub = health_pb2_grpc.HealthStub(channel)
    while True:
        check_alive()
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not start serving in time")
        time.sleep(POLL_S)
