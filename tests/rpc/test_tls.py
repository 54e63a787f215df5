"""TLS and mTLS on real gRPC servers: real handshakes, a dev CA and a stranger's CA."""

from __future__ import annotations

import asyncio
import datetime
import stat
from pathlib import Path

import grpc
import pytest

from services.rpc.server import start_server
from services.rpc.tls import TlsConfig, TlsError, load, server_ssl_context
from tests.rpc.conftest import Pki
from tests.rpc.health import health_status


def _call(server_tls: TlsConfig | None, client_tls: TlsConfig | None) -> grpc.StatusCode:
    """One Health.Check from a client with ``client_tls`` (None: plaintext); its status."""

    async def go() -> grpc.StatusCode:
        server = await start_server([], tls=server_tls)
        try:
            return await health_status(server.address, client_tls)
        finally:
            await server.stop(0)

    return asyncio.run(go())


def test_mtls_accepts_a_client_signed_by_the_ca(pki: Pki) -> None:
    assert _call(pki.server, pki.client) == grpc.StatusCode.OK


def test_mtls_refuses_a_plaintext_client(pki: Pki) -> None:
    assert _call(pki.server, None) == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_client_without_a_certificate(pki: Pki) -> None:
    assert _call(pki.server, TlsConfig(ca=pki.ca.cert)) == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_client_certificate_from_another_ca(pki: Pki) -> None:
    assert _call(pki.server, pki.stranger) == grpc.StatusCode.UNAVAILABLE


def test_server_auth_only_tls_serves_a_client_that_verifies_it(pki: Pki) -> None:
    server = TlsConfig(pki.server.cert, pki.server.key)  # no client certificates asked for
    assert _call(server, TlsConfig(ca=pki.ca.cert)) == grpc.StatusCode.OK
    assert _call(server, None) == grpc.StatusCode.UNAVAILABLE


def test_a_client_refuses_a_server_its_ca_did_not_sign(pki: Pki) -> None:
    server = TlsConfig(pki.server.cert, pki.server.key)
    assert _call(server, TlsConfig(ca=pki.other_ca.cert)) == grpc.StatusCode.UNAVAILABLE


def test_a_plaintext_server_is_not_dialled_in_plaintext_by_a_tls_client(pki: Pki) -> None:
    assert _call(None, pki.client) == grpc.StatusCode.UNAVAILABLE


def test_dev_ca_keys_are_private_and_names_cover_loopback(pki: Pki) -> None:
    from cryptography import x509

    for key in (pki.ca.key, pki.server.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(pki.ca.directory.stat().st_mode) == 0o700
    cert = x509.load_pem_x509_certificate(pki.server.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "server"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime <= datetime.timedelta(days=8)


# ------------------------------------------------------------------ bad files, at start


def _refused(tls: TlsConfig) -> str:
    with pytest.raises(TlsError) as info:
        load(tls)
    return str(info.value)


def test_a_missing_file_is_named(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    message = _refused(TlsConfig(missing, pki.server.key, pki.ca.cert))
    assert str(missing) in message and "does not exist" in message
    message = _refused(TlsConfig(pki.server.cert, pki.server.key, missing))
    assert str(missing) in message and "CA bundle" in message


def test_an_unreadable_key_is_named(pki: Pki, tmp_path: Path) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    key = tmp_path / "locked-key.pem"
    key.write_bytes(pki.server.key.read_bytes())
    key.chmod(0)
    message = _refused(TlsConfig(pki.server.cert, key))
    assert str(key) in message and "permissions" in message


def test_a_key_of_another_certificate_is_refused(pki: Pki) -> None:
    message = _refused(TlsConfig(pki.server.cert, pki.client.key))
    assert str(pki.client.key) in message and str(pki.server.cert) in message
    assert "does not belong" in message


def test_files_given_the_wrong_way_round_are_named(pki: Pki) -> None:
    message = _refused(TlsConfig(pki.server.key, pki.server.cert))
    assert str(pki.server.key) in message and "not a PEM certificate" in message
    message = _refused(TlsConfig(pki.server.cert, pki.server.key, pki.server.key))
    assert str(pki.server.key) in message and "CA bundle" in message


def test_an_encrypted_key_is_refused_with_the_fix(pki: Pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    plain = serialization.load_pem_private_key(pki.server.key.read_bytes(), password=None)
    key = tmp_path / "encrypted-key.pem"
    key.write_bytes(
        plain.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    message = _refused(TlsConfig(pki.server.cert, key))
    assert str(key) in message and "encrypted" in message


def test_an_expired_certificate_is_refused(pki: Pki) -> None:
    expired = pki.ca.issue("expired", validity=datetime.timedelta(minutes=-1))
    message = _refused(expired)
    assert str(expired.cert) in message and "expired" in message


def test_half_a_config_is_refused() -> None:
    with pytest.raises(TlsError, match="both"):
        TlsConfig(cert=Path("c.pem"))
    with pytest.raises(TlsError, match="CA"):
        TlsConfig(Path("c.pem"), Path("k.pem"), require_client_auth=True)


def test_a_server_with_a_bad_file_fails_to_start_naming_it(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing-key.pem"
    with pytest.raises(TlsError, match=str(missing)):
        asyncio.run(start_server([], tls=TlsConfig(pki.server.cert, missing)))
    with pytest.raises(TlsError, match=str(missing)):
        server_ssl_context(TlsConfig(pki.server.cert, missing))
