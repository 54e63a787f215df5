"""`tandem tls-dev-ca`: the files it writes, what a second run keeps, --renew and --owner."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from services.cli.main import main
from services.rpc.tls import TlsConfig, load


def _names(cert: Path) -> list[str]:
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in sans]


def test_a_ca_and_a_leaf_per_name_keys_private(tmp_path: Path) -> None:
    assert main(["tls-dev-ca", "--dir", str(tmp_path), "router", "decode-1"]) == 0
    for name in ("router", "decode-1"):
        cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert name in _names(cert) and "localhost" in _names(cert)
        load(TlsConfig(cert, key, tmp_path / "ca.pem", require_client_auth=True))
    assert stat.S_IMODE((tmp_path / "ca-key.pem").stat().st_mode) == 0o600


def test_a_second_run_keeps_what_is_there_and_adds_names(tmp_path: Path) -> None:
    main(["tls-dev-ca", "--dir", str(tmp_path), "router"])
    ca, router = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "router.pem").read_bytes()
    assert main(["tls-dev-ca", "--dir", str(tmp_path), "router", "gateway-1"]) == 0
    assert (tmp_path / "ca.pem").read_bytes() == ca
    assert (tmp_path / "router.pem").read_bytes() == router
    assert (tmp_path / "gateway-1.pem").exists()
    (tmp_path / "ca-key.pem").unlink()  # a CA without its key cannot sign: a new one
    assert main(["tls-dev-ca", "--dir", str(tmp_path), "router", "decode-1"]) == 0
    assert (tmp_path / "ca.pem").read_bytes() != ca
    ca = (tmp_path / "ca.pem").read_bytes()
    assert main(["tls-dev-ca", "--dir", str(tmp_path), "--renew", "router"]) == 0
    assert (tmp_path / "ca.pem").read_bytes() != ca
    assert (tmp_path / "router.pem").read_bytes() != router


@pytest.mark.parametrize(
    ("owner", "says"),
    [("abc", "give UID or NAME=UID"), ("nobody=65534", "'nobody' is not one of the names")],
)
def test_bad_owners_are_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], owner: str, says: str
) -> None:
    assert main(["tls-dev-ca", "--dir", str(tmp_path / "d"), "--owner", owner, "router"]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_owners_per_leaf_and_a_readable_directory(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    argv = ["tls-dev-ca", "--dir", str(d), "--owner", "prometheus=65534", "--owner", "10001"]
    assert main([*argv, "router", "prometheus"]) == 0
    assert (d / "router-key.pem").stat().st_uid == 10001
    assert (d / "prometheus-key.pem").stat().st_uid == 65534
    assert (d / "ca-key.pem").stat().st_uid == os.geteuid()  # the CA key stays the caller's
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert stat.S_IMODE((d / "ca.pem").stat().st_mode) == 0o644
