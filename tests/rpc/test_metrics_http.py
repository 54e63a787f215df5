"""/metrics follows the service's TLS: plain HTTP without it, HTTPS with it, mTLS with mTLS;
with a metrics client CA, only the scrapers that CA certified get in, and they get nowhere
else."""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter

from services.rpc import metrics_http
from services.rpc.metrics_http import MetricsServer, serve_metrics
from services.rpc.server import start_server
from services.rpc.tls import TlsConfig, TlsError
from tests.rpc.conftest import Pki
from tests.rpc.health import health_status

# What a refused scrape raises: a TLS alert, a reset, or a server that hung up.
REFUSED = (ssl.SSLError, ConnectionError, urllib.error.URLError, http.client.HTTPException)


@pytest.fixture
def registry() -> CollectorRegistry:
    r = CollectorRegistry()
    Counter("tandem_test_scrapes", "A counter to find on the page", registry=r).inc(3)
    return r


def scrape(server: MetricsServer, scheme: str, client: ssl.SSLContext | None = None) -> str:
    url = f"{scheme}://127.0.0.1:{server.port}/metrics"
    with urllib.request.urlopen(url, timeout=5, context=client) as page:
        return page.read().decode()


def client_context(ca: Path, leaf: TlsConfig | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    if leaf is not None:
        context.load_cert_chain(leaf.cert, leaf.key)
    return context


def server_auth(pki: Pki) -> TlsConfig:
    return TlsConfig(pki.server.cert, pki.server.key, pki.ca.cert)


def test_without_tls_metrics_are_plain_http(registry: CollectorRegistry) -> None:
    served = serve_metrics(registry, 0, "127.0.0.1")
    try:
        assert served.scheme == "http"
        assert "tandem_test_scrapes_total 3.0" in scrape(served, "http")
    finally:
        served.close()


def test_with_a_certificate_metrics_are_https_only(pki: Pki, registry: CollectorRegistry) -> None:
    served = serve_metrics(registry, 0, "127.0.0.1", server_auth(pki))
    try:
        assert served.scheme == "https"
        page = scrape(served, "https", client_context(pki.ca.cert))
        assert "tandem_test_scrapes_total 3.0" in page
        with pytest.raises(REFUSED):
            scrape(served, "http")
        with pytest.raises(REFUSED):  # a scraper that does not trust our CA
            scrape(served, "https", client_context(pki.other_ca.cert))
    finally:
        served.close()


def test_with_mtls_a_scraper_needs_a_certificate_from_the_ca(
    pki: Pki, registry: CollectorRegistry
) -> None:
    served = serve_metrics(registry, 0, "127.0.0.1", pki.server)
    try:
        page = scrape(served, "https", client_context(pki.ca.cert, pki.client))
        assert "tandem_test_scrapes_total 3.0" in page
        with pytest.raises(REFUSED):  # no client certificate
            scrape(served, "https", client_context(pki.ca.cert))
        with pytest.raises(REFUSED):  # a certificate from another CA
            scrape(served, "https", client_context(pki.ca.cert, pki.stranger))
    finally:
        served.close()


def test_a_bad_certificate_file_is_named_before_serving(
    pki: Pki, registry: CollectorRegistry, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(TlsError, match=r"nope\.pem"):
        serve_metrics(registry, 0, "127.0.0.1", TlsConfig(missing, pki.server.key))


# ------------------------------------------------------------ a CA of the scrapers' own


def test_with_a_metrics_client_ca_only_certificates_it_signed_get_in(
    pki: Pki, registry: CollectorRegistry
) -> None:
    served = serve_metrics(registry, 0, "127.0.0.1", pki.server, pki.scraper_ca.cert)
    try:
        page = scrape(served, "https", client_context(pki.ca.cert, pki.scraper))
        assert "tandem_test_scrapes_total 3.0" in page
        with pytest.raises(REFUSED):  # a peer of the cluster's CA: not a scraper
            scrape(served, "https", client_context(pki.ca.cert, pki.client))
        with pytest.raises(REFUSED):  # no client certificate
            scrape(served, "https", client_context(pki.ca.cert))
        with pytest.raises(REFUSED):  # a certificate from a third CA
            scrape(served, "https", client_context(pki.ca.cert, pki.stranger))
    finally:
        served.close()


def test_a_metrics_client_ca_asks_scrapers_for_certificates_on_a_server_auth_service(
    pki: Pki, registry: CollectorRegistry
) -> None:
    served = serve_metrics(registry, 0, "127.0.0.1", server_auth(pki), pki.scraper_ca.cert)
    try:
        assert "tandem_test_scrapes_total 3.0" in scrape(
            served, "https", client_context(pki.ca.cert, pki.scraper)
        )
        with pytest.raises(REFUSED):
            scrape(served, "https", client_context(pki.ca.cert))
    finally:
        served.close()


def test_a_scraper_reads_metrics_and_cannot_call_the_same_services_grpc_port(
    pki: Pki, registry: CollectorRegistry
) -> None:
    """One service, as the CLI configures it: its gRPC port trusts the cluster's CA, its
    /metrics the scrapers'. Each certificate opens its own door and not the other."""

    async def body() -> None:
        server = await start_server([], tls=pki.server)
        served = serve_metrics(registry, 0, "127.0.0.1", pki.server, pki.scraper_ca.cert)
        try:
            assert await health_status(server.address, pki.scraper) == grpc.StatusCode.UNAVAILABLE
            assert await health_status(server.address, pki.client) == grpc.StatusCode.OK
            scraper, peer = (client_context(pki.ca.cert, t) for t in (pki.scraper, pki.client))
            page = await asyncio.to_thread(scrape, served, "https", scraper)
            assert "tandem_test_scrapes_total 3.0" in page
            with pytest.raises(REFUSED):
                await asyncio.to_thread(scrape, served, "https", peer)
        finally:
            served.close()
            await server.stop(0)

    asyncio.run(body())


@pytest.mark.parametrize("tls", [None, "ca only"])
def test_a_metrics_client_ca_without_a_certificate_to_serve_is_refused(
    pki: Pki, registry: CollectorRegistry, tls: str | None
) -> None:
    service = None if tls is None else TlsConfig(ca=pki.ca.cert)
    with pytest.raises(TlsError, match=r"scraper-ca\.pem .*--tls-cert, --tls-key"):
        serve_metrics(registry, 0, "127.0.0.1", service, pki.scraper_ca.cert)


def test_a_missing_metrics_client_ca_is_named_before_serving(
    pki: Pki, registry: CollectorRegistry, tmp_path: Path
) -> None:
    missing = tmp_path / "scrapers.pem"
    with pytest.raises(TlsError, match=r"CA bundle .*scrapers\.pem does not exist"):
        serve_metrics(registry, 0, "127.0.0.1", pki.server, missing)


@pytest.mark.parametrize("mtls", [False, True])
def test_an_idle_connection_stalls_neither_scrapes_nor_the_stop(
    pki: Pki, registry: CollectorRegistry, mtls: bool
) -> None:
    """With the handshake inside accept() on the one serving thread, a TCP connection that
    sent nothing stalled every scrape (certificates or not: it comes first) and close()
    never returned, hanging the service's stop."""
    served = serve_metrics(registry, 0, "127.0.0.1", pki.server if mtls else server_auth(pki))
    idle = socket.create_connection(("127.0.0.1", served.port))
    try:
        client = client_context(pki.ca.cert, pki.client if mtls else None)
        assert "tandem_test_scrapes_total 3.0" in scrape(served, "https", client)
        closing = threading.Thread(target=served.close)
        closing.start()
        closing.join(5)
        assert not closing.is_alive(), "close() waited on the idle connection"
    finally:
        idle.close()


def test_an_idle_plain_connection_is_dropped_after_the_timeout(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without TLS an idle client held its thread and descriptor (shared with the gRPC
    port) for ever; it is dropped after HANDSHAKE_TIMEOUT_S like a TLS one."""
    monkeypatch.setattr(metrics_http, "HANDSHAKE_TIMEOUT_S", 0.3)
    served = serve_metrics(registry, 0, "127.0.0.1")
    try:
        with socket.create_connection(("127.0.0.1", served.port)) as idle:
            idle.settimeout(5)
            assert idle.recv(1) == b""  # the server closed it (was: blocked for ever)
    finally:
        served.close()
