"""`tandem tls-dev-ca`: the files it writes, what a second run keeps, --renew, --owner and
--scraper (a second CA whose client-only leaves are the scrapers')."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from services.cli.main import main
from services.cli.tls_ca import RESERVED
from services.rpc.tls import TlsConfig, load
from services.rpc.tls_dev_ca import CLUSTER_CA, SCRAPER_CA, DevCa


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


def _usages(cert: Path) -> list[x509.ObjectIdentifier]:
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    return list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_scrapers_get_client_only_leaves_from_a_ca_of_their_own(tmp_path: Path) -> None:
    argv = ["tls-dev-ca", "--dir", str(tmp_path), "router", "--scraper", "prometheus"]
    assert main([*argv, "--scraper", "grafana-agent"]) == 0
    services, scrapers = DevCa(tmp_path), DevCa(tmp_path, SCRAPER_CA)
    assert scrapers.cert == tmp_path / "scraper-ca.pem"
    assert stat.S_IMODE((tmp_path / "scraper-ca-key.pem").stat().st_mode) == 0o600
    for name in ("prometheus", "grafana-agent"):
        cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem"
        assert scrapers.signed(cert) and not services.signed(cert)
        assert _usages(cert) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
        assert _names(cert) == [name]
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        load(TlsConfig(cert, key, tmp_path / "ca.pem"))  # verifies the services with ca.pem
    assert services.signed(tmp_path / "router.pem")
    assert not scrapers.signed(tmp_path / "router.pem")


def test_a_leaf_of_another_ca_is_issued_again_by_the_one_now_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A volume minted before --scraper holds prometheus.pem from the services' CA: naming
    it a scraper issues it from the scrapers' CA, so the old leaf opens no gRPC port."""
    d = str(tmp_path)
    assert main(["tls-dev-ca", "--dir", d, "router", "prometheus"]) == 0
    router = (tmp_path / "router.pem").read_bytes()
    capsys.readouterr()
    assert main(["tls-dev-ca", "--dir", d, "router", "--scraper", "prometheus"]) == 0
    out = capsys.readouterr().out
    assert f"kept {tmp_path / 'router.pem'}" in out
    assert f"issued {tmp_path / 'prometheus.pem'}" in out
    assert DevCa(tmp_path, SCRAPER_CA).signed(tmp_path / "prometheus.pem")
    assert (tmp_path / "router.pem").read_bytes() == router
    scraper = (tmp_path / "prometheus.pem").read_bytes()
    assert main(["tls-dev-ca", "--dir", d, "router", "--scraper", "prometheus"]) == 0
    assert (tmp_path / "prometheus.pem").read_bytes() == scraper  # now it is kept
    scrapers_ca = (tmp_path / "scraper-ca.pem").read_bytes()
    assert main(["tls-dev-ca", "--dir", d, "--renew", "router"]) == 0
    assert (tmp_path / "scraper-ca.pem").read_bytes() == scrapers_ca  # not named: kept
    assert main(["tls-dev-ca", "--dir", d, "--renew", "--scraper", "prometheus"]) == 0
    assert (tmp_path / "scraper-ca.pem").read_bytes() != scrapers_ca
    assert DevCa(tmp_path, SCRAPER_CA).signed(tmp_path / "prometheus.pem")


@pytest.mark.parametrize(
    ("names", "says"),
    [
        ([], "give at least one service NAME or --scraper NAME"),
        (["router", "--scraper", "router"], "'router' is also a service NAME"),
        (["ca"], "'ca' would overwrite the CA's ca.pem"),
        (["--scraper", "scraper-ca"], "'scraper-ca' would overwrite the CA's scraper-ca.pem"),
        (["router", "--owner", "prom=1", "--scraper", "prometheus"], "'prom' is not one of"),
        # wrote d/../evil.pem, outside --dir
        (["../evil"], "'../evil' is not a host name"),
        (["--scraper", "bad name/x"], "'bad name/x' is not a host name"),
    ],
)
def test_names_that_clash_are_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], names: list[str], says: str
) -> None:
    assert main(["tls-dev-ca", "--dir", str(tmp_path / "d"), *names]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_the_reserved_names_are_the_cas_file_stems() -> None:
    assert RESERVED == (CLUSTER_CA, SCRAPER_CA)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_scrapers_files_go_to_its_owner_and_its_ca_is_readable(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    argv = ["tls-dev-ca", "--dir", str(d), "--owner", "prometheus=65534", "--owner", "10001"]
    assert main([*argv, "router", "--scraper", "prometheus"]) == 0
    assert (d / "prometheus-key.pem").stat().st_uid == 65534
    assert (d / "router-key.pem").stat().st_uid == 10001
    assert (d / "scraper-ca-key.pem").stat().st_uid == os.geteuid()
    assert stat.S_IMODE((d / "scraper-ca-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "scraper-ca.pem").stat().st_mode) == 0o644  # services read it
