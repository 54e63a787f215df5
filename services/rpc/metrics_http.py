"""Every service's Prometheus ``/metrics`` endpoint, over TLS when the service has TLS.

The metrics port follows the service's own TLS settings, so turning TLS on leaves no
plaintext port behind: with a certificate, ``/metrics`` is HTTPS with that certificate
(TLS 1.2 or newer); when the service requires client certificates (mTLS), so does
``/metrics``, signed by the same CA: the scraper (Prometheus ``tls_config``: ``ca_file``,
``cert_file``, ``key_file``) then needs a certificate from the cluster's CA, like any peer.
Without TLS it is plain HTTP, as the services' gRPC ports are.
"""

from __future__ import annotations

import ssl
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from services.rpc.tls import TlsConfig, follow_renewals, load


class MetricsServer:
    """A running ``/metrics`` endpoint (a daemon thread); ``close`` stops it."""

    def __init__(self, server: Any, scheme: str) -> None:
        self._server = server
        self.scheme = scheme
        """``http`` or ``https``."""

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(
    registry: CollectorRegistry, port: int, host: str, tls: TlsConfig | None = None
) -> MetricsServer:
    """Serve ``registry`` on ``http(s)://host:port/metrics``; over TLS when ``tls`` has a
    certificate (renewed files presented from the next handshake on), requiring client
    certificates when ``tls.require_client_auth``."""
    if tls is None or tls.cert is None:
        server, _thread = start_http_server(port, addr=host, registry=registry)
        return MetricsServer(server, "http")
    load(tls)  # a bad file fails here, naming it, rather than inside the HTTP server
    server, _thread = start_http_server(
        port,
        addr=host,
        registry=registry,
        certfile=str(tls.cert),
        keyfile=str(tls.key),
        client_cafile=str(tls.ca) if tls.require_client_auth else None,
        client_auth_required=tls.require_client_auth,
        tls_min_version=ssl.TLSVersion.TLSv1_2,
    )
    follow_renewals(tls, server.socket.context)  # renewed files: no restart
    return MetricsServer(server, "https")
