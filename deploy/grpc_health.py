#!/usr/bin/env python3
"""Probe a Tandem service through grpc.health.v1: exit 0 when it answers SERVING.

Installed in the image as ``tandem-health`` for Docker/compose healthchecks (Kubernetes
uses its native ``grpc:`` probes instead). Usage: ``tandem-health [HOST:PORT] [SERVICE]``;
the target defaults to $TANDEM_HEALTH_TARGET, else this container's host name on
$TANDEM_GRPC_PORT (50051): workers listen on the address they advertise, not loopback,
and the host name reaches every service whatever interface it bound.
"""

from __future__ import annotations

import os
import socket
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else os.environ.get("TANDEM_HEALTH_TARGET")
    if not target:
        target = f"{socket.gethostname()}:{os.environ.get('TANDEM_GRPC_PORT', '50051')}"
    service = argv[2] if len(argv) > 2 else ""
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=3.0
            )
    except grpc.RpcError as exc:
        print(f"{target}: {exc.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
