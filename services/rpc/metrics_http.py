"""Every service's Prometheus ``/metrics`` endpoint, over TLS when the service has TLS.

The metrics port follows the service's own TLS settings, so turning TLS on leaves no
plaintext port behind: with a certificate, ``/metrics`` is HTTPS with that certificate
(TLS 1.2 or newer). Who may scrape it:

- with a metrics client CA (``--metrics-client-ca``): a scraper presenting a certificate
  that CA signed, and nobody else: not even a peer of the cluster's CA. The scrapers' CA
  is a different one from the cluster's, which the gRPC port keeps trusting alone, so a
  scraper's certificate (Prometheus's, kept on a less guarded machine) cannot call the
  services, and a service's cannot read another's metrics.
- without one, when the service requires client certificates (mTLS): a certificate signed
  by the cluster's CA, like any peer, so the scraper's certificate also opens the gRPC
  ports. Prometheus ``tls_config``: ``ca_file`` (the cluster's CA, which signs the
  services), ``cert_file``, ``key_file``.

Without TLS it is plain HTTP, as the services' gRPC ports are.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from services.rpc.tls import TlsConfig, TlsError, follow_renewals, load


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
    registry: CollectorRegistry,
    port: int,
    host: str,
    tls: TlsConfig | None = None,
    client_ca: Path | None = None,
) -> MetricsServer:
    """Serve ``registry`` on ``http(s)://host:port/metrics``; over TLS when ``tls`` has a
    certificate (renewed files presented from the next handshake on), requiring client
    certificates signed by ``client_ca`` when given, else by ``tls.ca`` when
    ``tls.require_client_auth`` (:func:`scrape_tls`)."""
    tls = scrape_tls(tls, client_ca)
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
    # Renewed files, the client CA's included, are used from the next handshake on.
    follow_renewals(tls, server.socket.context)
    return MetricsServer(server, "https")


def scrape_tls(tls: TlsConfig | None, client_ca: Path | None) -> TlsConfig | None:
    """The TLS ``/metrics`` serves for a service with ``tls``: the same, or with
    ``client_ca`` its certificate with client certificates required from ``client_ca``
    alone. TlsError when ``client_ca`` comes without a certificate to serve HTTPS with."""
    if client_ca is None:
        return tls
    if tls is None or tls.cert is None:
        raise TlsError(
            f"the metrics client CA {client_ca} asks scrapers for certificates, which needs "
            "HTTPS: give the service's certificate and key too (--tls-cert, --tls-key)"
        )
    return TlsConfig(tls.cert, tls.key, client_ca, require_client_auth=True)
