"""DevCa's leaves: the names they hold, with and without the loopback names; the scrapers'
CA and its client-only leaves."""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.rpc.tls import TlsConfig
from services.rpc.tls_dev_ca import SCRAPER_CA, DevCa


def _names(cert: Path | None) -> set[str]:
    assert cert is not None
    san = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    return {str(n.value) for n in san.value}


def test_a_leaf_names_its_service_and_loopback_unless_told_not_to(tmp_path: Path) -> None:
    ca = DevCa.create(tmp_path)
    router = ca.issue("router", extra_names=["tandem-router"])
    assert _names(router.cert) == {"router", "tandem-router", "localhost", "127.0.0.1", "::1"}
    # A Kubernetes pod's leaf names only what peers dial it by (tests/cli/test_worker_advertise).
    pod = ca.issue("worker-0.tandem-prefill", local_names=False)
    assert _names(pod.cert) == {"worker-0.tandem-prefill"}


def test_the_scrapers_ca_sits_beside_the_services_and_issues_client_only_leaves(
    tmp_path: Path,
) -> None:
    ca = DevCa.create(tmp_path)
    scrapers = DevCa.create(tmp_path, stem=SCRAPER_CA)
    assert (ca.cert.name, ca.key.name) == ("ca.pem", "ca-key.pem")
    assert (scrapers.cert.name, scrapers.key.name) == ("scraper-ca.pem", "scraper-ca-key.pem")
    assert stat.S_IMODE(scrapers.key.stat().st_mode) == 0o600
    assert _common_name(scrapers.cert) == "Tandem development scraper CA"
    assert _common_name(ca.cert) == "Tandem development CA"  # the services' CA is kept
    leaf = scrapers.issue_client("prometheus")
    assert leaf == TlsConfig(tmp_path / "prometheus.pem", tmp_path / "prometheus-key.pem")
    assert _names(leaf.cert) == {"prometheus"}
    usage = _cert(leaf.cert).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # it can serve nothing
    assert scrapers.signed(tmp_path / "prometheus.pem")
    assert not ca.signed(tmp_path / "prometheus.pem")
    assert not scrapers.signed(tmp_path / "absent.pem")


def _cert(path: Path | None) -> x509.Certificate:
    assert path is not None
    return x509.load_pem_x509_certificate(path.read_bytes())


def _common_name(path: Path) -> str:
    return str(_cert(path).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
