"""A throwaway local certificate authority for development: ``tandem up --tls`` and the tests.

:meth:`DevCa.create` makes a CA (``ca.pem``, ``ca-key.pem``) in a directory and
:meth:`DevCa.issue` a leaf per service (``<name>.pem``, ``<name>-key.pem``) valid for
localhost, 127.0.0.1, ::1, the service's name and any names given. Every leaf may serve and
dial (server and client auth), as each Tandem service does both. A second CA in the same
directory, the scrapers' (``scraper-ca.pem``, ``scraper-ca-key.pem``: ``stem`` SCRAPER_CA),
issues client-only leaves (:meth:`DevCa.issue_client`) that ``/metrics`` accepts with
``--metrics-client-ca`` and no gRPC port does. Keys are EC P-256 (fast to
make, every TLS stack takes them) and written 0600; certificates live a few days, because
nothing here is meant to outlive a development run. Never use this CA in production: its
key sits next to the certificates it signs.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.rpc.tls import TlsConfig

VALIDITY = datetime.timedelta(days=7)
"""How long the CA and leaves live: long enough for a development session, short enough
that a leaked one soon stops mattering."""
CLOCK_SKEW = datetime.timedelta(minutes=5)
"""Leaves are valid from a little before now, so a peer whose clock lags accepts them."""
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
"""The CA signs certificates (and would sign CRLs), nothing else."""
CLUSTER_CA = "ca"
"""File stem of the services' CA (``ca.pem``, ``ca-key.pem``): the --tls-ca they trust."""
SCRAPER_CA = "scraper-ca"
"""File stem of the scrapers' CA (``scraper-ca.pem``): the --metrics-client-ca of the
services, a CA apart from theirs so that its leaves open /metrics and nothing else."""
_TITLES = {CLUSTER_CA: "Tandem development CA", SCRAPER_CA: "Tandem development scraper CA"}


@dataclass(frozen=True)
class DevCa:
    """A CA whose certificate and key are files in ``directory``."""

    directory: Path
    stem: str = CLUSTER_CA
    """The CA's files are ``<stem>.pem`` and ``<stem>-key.pem``: CLUSTER_CA or SCRAPER_CA."""

    @property
    def cert(self) -> Path:
        """The CA certificate peers and clients trust (``--tls-ca``; the scrapers' CA:
        ``--metrics-client-ca``)."""
        return self.directory / f"{self.stem}.pem"

    @property
    def key(self) -> Path:
        return self.directory / f"{self.stem}-key.pem"

    @classmethod
    def create(
        cls, directory: Path, validity: datetime.timedelta = VALIDITY, stem: str = CLUSTER_CA
    ) -> DevCa:
        """A fresh CA in ``directory`` (made 0700; an older CA of that ``stem`` there is
        replaced)."""
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        title = _TITLES.get(stem, f"Tandem development {stem}")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, title)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_CA_KEY_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        ca = cls(directory, stem)
        _write_key(ca.key, key)
        ca.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return ca

    def issue(
        self,
        name: str,
        extra_names: Iterable[str] = (),
        validity: datetime.timedelta = VALIDITY,
        local_names: bool = True,
    ) -> TlsConfig:
        """A leaf for service ``name`` signed by this CA, as the TlsConfig that uses it (with
        this CA as the peers' CA and client certificates required, as internal hops want).
        It names ``name``, ``extra_names`` and, with ``local_names``, LOCAL_NAMES (loopback,
        where `tandem up` dials every service)."""
        names = [*(LOCAL_NAMES if local_names else ()), name, *extra_names]
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        cert, key = self._sign(name, names, usages, validity)
        return TlsConfig(cert, key, self.cert, require_client_auth=True)

    def issue_client(self, name: str, validity: datetime.timedelta = VALIDITY) -> TlsConfig:
        """A client-only leaf ``name`` signed by this CA (a scraper's: client auth, no
        server use, no host names but ``name``), as a TlsConfig without a CA: the client
        verifies servers with the CA that signed them, which is not this one."""
        cert, key = self._sign(name, [name], [ExtendedKeyUsageOID.CLIENT_AUTH], validity)
        return TlsConfig(cert, key)

    def signed(self, cert: Path) -> bool:
        """Whether the certificate file ``cert`` (its first, the leaf) was issued by this
        CA; False for a missing or unreadable file."""
        try:
            leaf = x509.load_pem_x509_certificate(cert.read_bytes())
            leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(self.cert.read_bytes()))
        except (OSError, ValueError, TypeError, InvalidSignature):
            return False
        return True

    def _sign(
        self,
        name: str,
        alt_names: Iterable[str],
        usages: list[x509.ObjectIdentifier],
        validity: datetime.timedelta,
    ) -> tuple[Path, Path]:
        """Write ``<name>.pem`` and ``<name>-key.pem``: a fresh key, certified by this CA
        for ``alt_names`` and ``usages``, no longer than the CA lives."""
        ca_key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + validity, ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(_alt_names(dict.fromkeys(alt_names))),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        cert_path = self.directory / f"{name}.pem"
        key_path = self.directory / f"{name}-key.pem"
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path


def _alt_names(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write ``key`` readable by its owner only, also when the file already existed."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(pem)
