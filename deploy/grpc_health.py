#!/usr/bin/env python3
"""Probe a Tandem service through grpc.health.v1: exit 0 when it answers SERVING.

Installed in the image as ``tandem-health`` for Docker/compose healthchecks, and for the
Kubernetes probes of deploy/k8s/components/tls (kubelet's native ``grpc:`` probes, which the
plaintext manifests use, speak no TLS). Usage: ``tandem-health [HOST:PORT] [SERVICE]``;
the target defaults to $TANDEM_HEALTH_TARGET, else this container's host name on
$TANDEM_GRPC_PORT (50051): workers listen on the address they advertise, not loopback,
and the host name reaches every service whatever interface it bound.

Over TLS when $TANDEM_TLS_CA is set (the same variables the service reads its TLS flags
from): the service is verified against that CA, and $TANDEM_TLS_CERT/$TANDEM_TLS_KEY are
presented as the client certificate an mTLS service asks for.
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
        with _channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=3.0
            )
    except grpc.RpcError as exc:
        print(f"{target}: {exc.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _channel(target: str) -> grpc.Channel:
    ca = os.environ.get("TANDEM_TLS_CA")
    if not ca:
        return grpc.insecure_channel(target)
    cert, key = os.environ.get("TANDEM_TLS_CERT"), os.environ.get("TANDEM_TLS_KEY")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca),
        private_key=_read(key) if key else None,
        certificate_chain=_read(cert) if cert else None,
    )
    return grpc.secure_channel(target, credentials)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
