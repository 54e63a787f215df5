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

import socket
import ssl
import threading
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from services.rpc.tls import TlsConfig, TlsError, server_ssl_context

HANDSHAKE_TIMEOUT_S = 10.0
"""How long a connection may take to finish its TLS handshake, and each read or write (TLS
or not): a scraper that stalls is dropped, not waited on with a thread and a descriptor
for ever."""


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


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per scrape."""


class _TimedServer(ThreadingWSGIServer):
    """Each connection's reads and writes under HANDSHAKE_TIMEOUT_S: an idle client held a
    thread and a file descriptor (shared with the service's gRPC port) for ever."""

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        super().process_request_thread(request, client_address)


class _TlsServer(_TimedServer):
    """Handshakes in each connection's own thread, under HANDSHAKE_TIMEOUT_S.

    prometheus_client wraps the listening socket, so the handshake ran inside ``accept()``
    on the one thread that serves every connection, with no timeout: one TCP connection
    that sent nothing stalled every scrape (mTLS or not: it comes before any certificate)
    and made ``shutdown()``, and so the service's stop, wait for ever."""

    context: ssl.SSLContext

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            request = self.context.wrap_socket(request, server_side=True)
        except OSError:  # ssl.SSLError included: a stalled, plaintext or refused client
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


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
    https = tls is not None and tls.cert is not None
    # A bad file fails here, naming it, before anything listens.
    context = server_ssl_context(tls) if https and tls is not None else None
    base = _TlsServer if context is not None else _TimedServer
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server_class = type("MetricsHTTPServer", (base,), {"address_family": family})
    server = make_server(address[0], port, make_wsgi_app(registry), server_class, _Quiet)
    if context is not None:
        server.context = context
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return MetricsServer(server, "https" if context is not None else "http")


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
