"""DevCa's leaves: the names they hold, with and without the loopback names."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from services.rpc.tls_dev_ca import DevCa


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
