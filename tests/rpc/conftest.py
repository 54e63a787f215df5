"""The test PKI the TLS suites share: a dev CA, leaves it signed, and a stranger's CA."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.rpc.tls import TlsConfig
from services.rpc.tls_dev_ca import DevCa


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


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = DevCa.create(tmp_path_factory.mktemp("ca"))
    other = DevCa.create(tmp_path_factory.mktemp("other-ca"))
    stranger = other.issue("client")
    return Pki(
        ca=ca,
        server=ca.issue("server"),
        client=ca.issue("client"),
        stranger=TlsConfig(stranger.cert, stranger.key, ca.cert),
        other_ca=other,
    )
