"""Wait, from a launcher, until a service answers grpc.health.v1 with SERVING."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

POLL_S = 0.2
"""Pause between health checks while a service starts."""


class NotServing(TimeoutError):
    """The service did not report SERVING by the deadline; ``last`` is the last check's
    error ("" when it answered NOT_SERVING), e.g. a TLS handshake refused."""

    def __init__(self, message: str, last: str) -> None:
        super().__init__(message)
        self.last = last

    def hint(self) -> str:
        """What to append to a launcher's message when the dial itself was refused by TLS
        (this never fixes itself by waiting); "" otherwise (not listening yet says
        nothing the deadline does not)."""
        if "handshake" not in self.last.lower():
            return ""
        return (
            f"; it refused the TLS handshake: {self.last} (is its certificate signed by the "
            "CA this process trusts, and does it name the address dialled?)"
        )


def wait_serving(
    channel: grpc.Channel,
    name: str,
    deadline: float,
    check_alive: Callable[[], None] = lambda: None,
) -> None:
    """Return once the service behind ``channel`` reports SERVING.

    ``check_alive`` runs before every check and raises when the service's process has
    died (a launcher should say so at once, not after the deadline); NotServing (a
    TimeoutError carrying the last check's error) at ``deadline`` (a ``time.monotonic()``
    value).
    """
    stub = health_pb2_grpc.HealthStub(channel)
    last = ""
    while True:
        check_alive()
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = ""
        except grpc.RpcError as error:  # not listening yet, or a dial that cannot succeed
            last = f"{error.code().name}: {error.details()}"
        if time.monotonic() > deadline:
            raise NotServing(f"{name} did not start serving in time", last)
        time.sleep(POLL_S)
