"""TLS for Tandem's ports, from PEM certificate files: gRPC credentials and an ``ssl`` context.

One :class:`TlsConfig` describes a process's identity (certificate and key) and the CAs it
trusts for peers. Servers present the certificate and, with ``require_client_auth``, refuse
callers without a certificate signed by the CA (mTLS); clients verify the server against the
CA and present their own certificate when they have one.

Files are read and checked when a server starts or the first channel is made (:func:`load`),
so a missing, unreadable or mismatched file fails the start with its name in the message
rather than the first request. After that they are renewed in place: every ``RECHECK_S`` at
most, a handshake or a call looks at the files' stat, and files that changed and pass the
same checks are used from the next handshake on (gRPC servers through a certificate fetcher,
HTTP servers through the SNI callback, channels by ``RenewingChannel``); files that changed
but fail them are logged and the certificate in use is kept. So cert-manager's renewals need
no restart. Only TLS 1.2 and newer are accepted: gRPC's BoringSSL refuses older versions by
default, and the HTTP context sets the same floor.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.engine.errors import TandemError

if TYPE_CHECKING:
    import grpc

log = logging.getLogger(__name__)

RECHECK_S = 1.0
"""At most how often a process stats its TLS files to see whether they were renewed."""


class TlsError(TandemError, ValueError):
    """A certificate, key or CA file is missing, unreadable, malformed or does not match."""

    grpc_code = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class TlsConfig:
    """Where a process's certificate, key and trusted CAs are, and whether callers need certs."""

    cert: Path | None = None
    """PEM certificate (leaf first, then any intermediates): the server's identity on its
    port, and the client certificate this process presents when it dials others (mTLS).
    None: no identity (a client that only verifies the server)."""
    key: Path | None = None
    """PEM private key of ``cert``, unencrypted (protect it with file permissions, 0600)."""
    ca: Path | None = None
    """PEM bundle of the CAs that sign peers: servers this process dials are verified against
    it, and so are callers when ``require_client_auth`` is set. None: dial with the system's
    trust store."""
    require_client_auth: bool = False
    """As a server: refuse callers that present no certificate signed by ``ca`` (mTLS)."""

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise TlsError(
                "a TLS certificate needs its private key and a key its certificate: give both "
                f"(certificate {self.cert}, key {self.key})"
            )
        if self.require_client_auth and self.ca is None:
            raise TlsError(
                "requiring client certificates needs the CA that signs them: give the CA bundle"
            )

    @classmethod
    def from_files(
        cls,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        ca: str | Path | None = None,
        require_client_auth: bool = False,
    ) -> TlsConfig:
        """A config from paths as strings (CLI flags); empty strings count as not given."""
        return cls(
            Path(cert) if cert else None,
            Path(key) if key else None,
            Path(ca) if ca else None,
            require_client_auth,
        )


@dataclass(frozen=True)
class TlsMaterial:
    """The checked bytes of a TlsConfig's files, as last read."""

    cert_chain: bytes | None
    key: bytes | None
    ca: bytes | None


@dataclass
class _Watch:
    """What a process uses of one TlsConfig's files, and when it last looked at them."""

    stamp: tuple[tuple[int, int, int] | None, ...]
    material: TlsMaterial
    generation: int
    checked_at: float
    refused: tuple[tuple[int, int, int] | None, ...] | None = None
    """The files' stamp when they last failed the checks (logged once per stamp)."""


_watches: dict[TlsConfig, _Watch] = {}
_watch_lock = threading.Lock()


def load(tls: TlsConfig) -> TlsMaterial:
    """The checked contents of ``tls``'s files, renewed when they change (module docstring).
    TlsError, on the first read only, names the file and what to do when one is missing,
    unreadable, malformed, expired or the key does not belong to the certificate."""
    return _watch(tls).material


def generation(tls: TlsConfig | None) -> int:
    """How many times ``tls``'s files were renewed in this process (0 for plaintext): a
    channel made at an older generation presents the old certificate."""
    return 0 if tls is None else _watch(tls).generation


def _watch(tls: TlsConfig) -> _Watch:
    watch = _watches.get(tls)
    if watch is not None and time.monotonic() - watch.checked_at < RECHECK_S:
        return watch
    with _watch_lock:
        watch = _watches.get(tls)
        now = time.monotonic()
        if watch is not None and now - watch.checked_at < RECHECK_S:
            return watch
        stamp = _stamp(tls)
        if watch is not None and stamp == watch.stamp:
            watch.checked_at = now
            return watch
        try:
            material = _read_material(tls)
        except TlsError as e:
            if watch is None:
                raise
            # Mid-renewal (certificate written, key not yet), a certificate valid from a
            # moment ahead of this clock, or a bad renewal: keep serving, and read them
            # again at the next check.
            if stamp != watch.refused:
                log.error(
                    "TLS files changed but cannot be used yet, keeping the ones in use: %s", e
                )
                watch.refused = stamp
            watch.checked_at = now
            return watch
        if watch is not None:
            log.info("TLS certificate %s renewed; new handshakes present it", tls.cert)
        renewed = _Watch(stamp, material, 0 if watch is None else watch.generation + 1, now)
        _watches[tls] = renewed
        return renewed


def _stamp(tls: TlsConfig) -> tuple[tuple[int, int, int] | None, ...]:
    """Each file's (mtime, size, inode), following links (csi-driver and Kubernetes secrets
    swap a symlink to renew); None for a file that cannot be stat'ed."""
    stamps: list[tuple[int, int, int] | None] = []
    for path in (tls.cert, tls.key, tls.ca):
        try:
            st = os.stat(path) if path is not None else None
        except OSError:
            st = None
        stamps.append(None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(stamps)


def _check_whole(pem: bytes, parsed: int, path: Path, what: str) -> None:
    """TlsError unless every certificate block in ``pem`` was parsed: the loader skips a
    last block cut short (no END line), so a file caught half-written (a CA appended
    during a rotation) passed as the certificates before it, silently."""
    begins = pem.count(b"-----BEGIN CERTIFICATE-----")
    ends = pem.count(b"-----END CERTIFICATE-----")
    if begins != parsed or ends != parsed:
        raise TlsError(
            f"TLS {what} {path} looks partly written ({begins} certificate(s) begun, "
            f"{ends} ended, {parsed} readable); finish writing it (write a new file and "
            "rename it over the old one)"
        )


def _read_material(tls: TlsConfig) -> TlsMaterial:
    """Read and check ``tls``'s files (TlsError saying what is wrong)."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cert_pem = key_pem = ca_pem = None
    if tls.cert is not None and tls.key is not None:
        cert_pem = _read(tls.cert, "certificate")
        key_pem = _read(tls.key, "private key")
        try:
            chain = x509.load_pem_x509_certificates(cert_pem)
        except ValueError as exc:
            raise TlsError(
                f"TLS certificate {tls.cert} is not a PEM certificate ({exc}); give the "
                "certificate file (-----BEGIN CERTIFICATE-----), not the key or a DER file"
            ) from None
        _check_whole(cert_pem, len(chain), tls.cert, "certificate chain")
        try:
            private_key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:
            raise TlsError(
                f"TLS private key {tls.key} is encrypted; services read keys unattended, so "
                "give an unencrypted key (openssl pkey -in KEY -out KEY.plain) kept 0600"
            ) from None
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise TlsError(
                f"TLS private key {tls.key} is not a PEM private key ({exc}); give the key "
                "file (-----BEGIN PRIVATE KEY-----), not the certificate"
            ) from None
        leaf = chain[0]
        if _public_der(leaf.public_key()) != _public_der(private_key.public_key()):
            raise TlsError(
                f"TLS private key {tls.key} does not belong to certificate {tls.cert}; give "
                "the key the certificate was issued for"
            )
        _check_validity(leaf, tls.cert)
    if tls.ca is not None:
        ca_pem = _read(tls.ca, "CA bundle")
        try:
            cas = x509.load_pem_x509_certificates(ca_pem)
        except ValueError as exc:
            raise TlsError(
                f"TLS CA bundle {tls.ca} holds no PEM certificate ({exc}); give the CA's "
                "certificate (e.g. ca.pem of `tandem up --tls`)"
            ) from None
        _check_whole(ca_pem, len(cas), tls.ca, "CA bundle")
    return TlsMaterial(cert_pem, key_pem, ca_pem)


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """gRPC server credentials: ``tls.cert`` presented; with ``require_client_auth``,
    callers must present a certificate signed by ``tls.ca``. Renewed files are presented
    from the next connection on (gRPC asks the fetcher before each handshake)."""
    import grpc

    first = _watch(tls)
    if first.material.cert_chain is None or first.material.key is None:
        raise TlsError("a TLS server needs a certificate and its private key")
    presented = [first.generation]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        current = _watch(tls)
        if current.generation == presented[0]:
            return None  # unchanged: gRPC keeps the configuration it has
        presented[0] = current.generation
        return _server_configuration(current.material, tls)

    return grpc.dynamic_ssl_server_credentials(
        _server_configuration(first.material, tls),
        fetch,
        require_client_authentication=tls.require_client_auth,
    )


def _server_configuration(
    material: TlsMaterial, tls: TlsConfig
) -> grpc.ServerCertificateConfiguration:
    import grpc

    assert material.key is not None and material.cert_chain is not None
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert_chain)],
        root_certificates=material.ca if tls.require_client_auth else None,
    )


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """gRPC channel credentials: the server is verified against ``tls.ca`` (or the system's
    trust store), and ``tls.cert`` is presented as the client certificate when set."""
    import grpc

    material = load(tls)
    return grpc.ssl_channel_credentials(
        root_certificates=material.ca,
        private_key=material.key,
        certificate_chain=material.cert_chain,
    )


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """An ``ssl`` context for an HTTP server (the gateway's OpenAI API): TLS 1.2+,
    ``tls.cert`` presented, client certificates signed by ``tls.ca`` required with
    ``require_client_auth``; renewed files are presented from the next handshake on."""
    load(tls)  # the same checks and messages as the gRPC port, before ssl's terser ones
    if tls.cert is None or tls.key is None:
        raise TlsError("a TLS server needs a certificate and its private key")
    return follow_renewals(tls, _context(tls))


def follow_renewals(tls: TlsConfig, context: ssl.SSLContext) -> ssl.SSLContext:
    """Make a server's ``context`` present ``tls``'s renewed files: its SNI callback, which
    runs on every ClientHello, moves each new connection to a context made from the files
    of the moment. Returns ``context``."""
    current: list[Any] = [generation(tls), context]  # generation, its context

    def on_hello(connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        watch = _watch(tls)
        if watch.generation != current[0]:
            fresh = _context(tls, watch.material)
            fresh.sni_callback = on_hello
            current[:] = [watch.generation, fresh]
        if connection.context is not current[1]:
            connection.context = current[1]

    context.sni_callback = on_hello
    return context


def _context(tls: TlsConfig, material: TlsMaterial | None = None) -> ssl.SSLContext:
    """A server context presenting ``material`` (the checked bytes; None: ``load(tls)``)."""
    material = load(tls) if material is None else material
    assert material.cert_chain is not None and material.key is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_identity(context, material.cert_chain, material.key)
    if tls.require_client_auth and material.ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=_der(material.ca))
    return context


def _der(ca_pem: bytes) -> bytes:
    """A checked CA bundle as ``ssl``'s ``cadata`` takes it: the certificates in DER, one
    after another (as PEM text it must be pure ASCII, and bundles carry comments that
    are not)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cas = x509.load_pem_x509_certificates(ca_pem)
    return b"".join(ca.public_bytes(Encoding.DER) for ca in cas)


def _load_identity(context: ssl.SSLContext, cert_chain: bytes, key: bytes) -> None:
    """Load the checked certificate chain and key: the bytes the checks passed, not the files
    again (a renewal being written meanwhile would fail the handshake, or slip in unchecked).
    ``ssl`` reads them only from a path, so they go through an in-memory file (Linux's
    memfd; elsewhere a private temporary file, removed at once)."""
    pem = cert_chain + b"\n" + key  # ssl takes the key from the certificate file
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("tandem-tls", os.MFD_CLOEXEC)
        try:
            with os.fdopen(fd, "wb", closefd=False) as file:
                file.write(pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory() as private:  # mode 0700
        path = Path(private) / "identity.pem"
        path.write_bytes(pem)
        context.load_cert_chain(path)


def client_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """An ``ssl`` context for an HTTPS client: verifies the server against ``tls.ca`` (or the
    system's trust store) and the host name, presents ``tls.cert`` when set."""
    material = load(tls)
    ca = _der(material.ca) if material.ca is not None else None
    context = ssl.create_default_context(cadata=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if material.cert_chain is not None and material.key is not None:
        _load_identity(context, material.cert_chain, material.key)
    return context


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TlsError(f"TLS {what} {path} does not exist; check the path") from None
    except PermissionError:
        raise TlsError(
            f"TLS {what} {path} cannot be read by this user; fix its owner or permissions"
        ) from None
    except OSError as exc:
        raise TlsError(f"TLS {what} {path} cannot be read: {exc.strerror}") from None
    if not data.strip():
        raise TlsError(f"TLS {what} {path} is empty")
    return data


def _public_der(public_key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_validity(cert: object, path: Path) -> None:
    """An expired or not-yet-valid certificate would fail every handshake: say so now."""
    now = datetime.datetime.now(datetime.UTC)
    not_before = cert.not_valid_before_utc  # type: ignore[attr-defined]
    not_after = cert.not_valid_after_utc  # type: ignore[attr-defined]
    if now > not_after:
        raise TlsError(
            f"TLS certificate {path} expired on {not_after:%Y-%m-%d %H:%M} UTC; renew it "
            "(`tandem up --tls` mints fresh ones every run)"
        )
    if now < not_before:
        raise TlsError(
            f"TLS certificate {path} is not valid before {not_before:%Y-%m-%d %H:%M} UTC; "
            "check this machine's clock"
        )
