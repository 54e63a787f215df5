"""/metrics follows the service's TLS: plain HTTP without it, HTTPS with it, mTLS with mTLS."""

from __future__ import annotations

import http.client
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from services.rpc.metrics_http import MetricsServer, serve_metrics
from services.rpc.tls import TlsConfig, TlsError
from tests.rpc.conftest import Pki

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
