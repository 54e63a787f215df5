"""The test PKI the TLS suites share: a dev CA, leaves it signed, a stranger's CA, and a
scrapers' CA beside the dev CA (as `tandem tls-dev-ca --scraper` lays them out)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.rpc.tls import TlsConfig
from services.rpc.tls_dev_ca import SCRAPER_CA, DevCa


@dataclass(frozen=True)
class Pki:
    ca: DevCa
    server: TlsConfig
    """The server's leaf, requiring client certificates signed by ``ca``."""
    client: TlsConfig
    """A client leaf signed by ``ca`` (trusting ``ca``)."""
    stranger: TlsConfig
    """A client leaf signed by another CA, yet trusting ``ca`` for the server."""
    other_ca: DevCa
    scraper_ca: DevCa
    """The scrapers' CA (``scraper-ca.pem``, in ``ca``'s directory): --metrics-client-ca."""
    scraper: TlsConfig
    """A client-only leaf signed by ``scraper_ca``, trusting ``ca`` for the servers."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = DevCa.create(tmp_path_factory.mktemp("ca"))
    other = DevCa.create(tmp_path_factory.mktemp("other-ca"))
    stranger = other.issue("client")
    scraper_ca = DevCa.create(ca.directory, stem=SCRAPER_CA)
    scraper = scraper_ca.issue_client("prometheus")
    return Pki(
        ca=ca,
        server=ca.issue("server"),
        client=ca.issue("client"),
        stranger=TlsConfig(stranger.cert, stranger.key, ca.cert),
        other_ca=other,
        scraper_ca=scraper_ca,
        scraper=TlsConfig(scraper.cert, scraper.key, ca.cert),
    )
