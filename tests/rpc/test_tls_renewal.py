"""Certificates renewed in place (as cert-manager does) are used without a restart: by gRPC
servers, HTTPS servers (/metrics, its scrapers' CA too) and long-lived channels; renewed
files that fail the checks are refused and the ones in use kept."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from services.rpc import tls as tls_mod
from services.rpc.metrics_http import serve_metrics
from services.rpc.server import client_channel, start_server
from services.rpc.tls import TlsConfig, TlsError, generation, load
from services.rpc.tls_dev_ca import SCRAPER_CA, DevCa


@pytest.fixture(autouse=True)
def look_at_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls_mod, "RECHECK_S", 0.0)


def _install(leaf: TlsConfig, into: TlsConfig) -> None:
    """Renew ``into``'s files with ``leaf``'s (a copy, as a renewal writes them)."""
    assert leaf.cert and leaf.key and into.cert and into.key
    shutil.copyfile(leaf.cert, into.cert)
    shutil.copyfile(leaf.key, into.key)


def _served(ca: DevCa, name: str, directory: Path, client_auth: bool = False) -> TlsConfig:
    """A leaf naming only ``name``, copied to files of ``directory`` that will be renewed."""
    leaf = ca.issue(name, local_names=False)
    assert leaf.cert and leaf.key
    directory.mkdir(exist_ok=True)
    files = TlsConfig(directory / "tls.crt", directory / "tls.key", ca.cert, client_auth)
    _install(leaf, files)
    return files


async def _check(address: str, channel_creds: grpc.ChannelCredentials, name: str) -> bool:
    """Whether a fresh connection verifying the server as ``name`` gets a health answer."""
    options = [("grpc.ssl_target_name_override", name)]
    async with grpc.aio.secure_channel(address, channel_creds, options=options) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        except grpc.aio.AioRpcError:
            return False
        return True


def test_files_renewed_in_place_are_used_and_bad_ones_are_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = DevCa.create(tmp_path / "ca")
    files = _served(ca, "alpha", tmp_path / "served")
    first = load(files)
    assert generation(files) == 0
    _install(ca.issue("beta", local_names=False), files)
    assert load(files) != first and generation(files) == 1
    assert load(files) is load(files)  # unchanged files: nothing read again
    assert files.key is not None
    files.key.write_text("not a key\n")  # a broken renewal (or one caught half-written)
    with caplog.at_level(logging.ERROR, logger="services.rpc.tls"):
        assert generation(files) == 1
    assert "keeping the ones in use" in caplog.text and "tls.key" in caplog.text
    with pytest.raises(TlsError, match="is not a PEM private key"):
        load(TlsConfig(files.cert, files.key))  # a first read still fails loudly


@pytest.mark.parametrize("half", ["ca", "chain"])
def test_a_file_caught_half_written_is_not_taken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, half: str
) -> None:
    """A CA appended to the bundle (a rotation), or an intermediate to the chain, cut short
    mid-block: the PEM loader skipped the unfinished block, so the file passed as what came
    before it and was taken (peers of the new CA refused, nothing logged)."""
    ca = DevCa.create(tmp_path / "ca")
    files = _served(ca, "alpha", tmp_path / "served")
    assert generation(files) == 0
    other = DevCa.create(tmp_path / "other").cert.read_bytes()
    target = files.ca if half == "ca" else files.cert
    assert target is not None
    whole = target.read_bytes() + other
    target.write_bytes(whole[: len(whole) - len(other) // 2])
    with caplog.at_level(logging.ERROR, logger="services.rpc.tls"):
        assert generation(files) == 0  # refused; the files in use kept
    assert "looks partly written" in caplog.text
    target.write_bytes(whole)  # the write completes
    assert generation(files) == 1


def test_a_refused_renewal_is_read_again_until_it_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Files refused once (say, a certificate valid from a second ahead of this clock) are
    read again at each check, not only when they change again; the refusal is logged once."""
    ca = DevCa.create(tmp_path / "ca")
    files = _served(ca, "alpha", tmp_path / "served")
    assert generation(files) == 0
    _install(ca.issue("beta", local_names=False), files)
    real, attempts = tls_mod._read_material, []

    def not_yet(tls: TlsConfig) -> tls_mod.TlsMaterial:
        attempts.append(tls)
        if len(attempts) < 3:
            raise TlsError("TLS certificate is not valid before now + 1 s")
        return real(tls)

    monkeypatch.setattr(tls_mod, "_read_material", not_yet)
    with caplog.at_level(logging.ERROR, logger="services.rpc.tls"):
        assert [generation(files) for _ in range(3)] == [0, 0, 1]
    assert caplog.text.count("cannot be used yet") == 1


def test_a_grpc_server_presents_the_renewed_certificate(tmp_path: Path) -> None:
    ca = DevCa.create(tmp_path / "ca")
    files = _served(ca, "alpha", tmp_path / "served")
    assert ca.cert is not None
    trust = grpc.ssl_channel_credentials(ca.cert.read_bytes())

    async def body() -> None:
        server = await start_server([], tls=files)
        try:
            assert await _check(server.address, trust, "alpha")
            assert not await _check(server.address, trust, "beta")
            _install(ca.issue("beta", local_names=False), files)
            assert await _check(server.address, trust, "beta")  # no restart
            assert not await _check(server.address, trust, "alpha")
        finally:
            await server.stop(0)

    asyncio.run(body())


def _verified_as(client: ssl.SSLContext, port: int, name: str) -> bool:
    """Whether a TLS handshake with 127.0.0.1:``port`` verifies the server as ``name``."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with client.wrap_socket(raw, server_hostname=name):
                return True
        except (ssl.SSLError, ConnectionError):
            return False


def test_an_https_server_presents_the_renewed_certificate(tmp_path: Path) -> None:
    ca = DevCa.create(tmp_path / "ca")
    files = _served(ca, "alpha", tmp_path / "served")
    metrics = serve_metrics(CollectorRegistry(), 0, "127.0.0.1", files)
    assert ca.cert is not None
    client = ssl.create_default_context(cafile=ca.cert)

    def handshake(name: str) -> bool:
        return _verified_as(client, metrics.port, name)

    try:
        assert handshake("alpha") and not handshake("beta")
        _install(ca.issue("beta", local_names=False), files)
        assert handshake("beta") and not handshake("alpha")
    finally:
        metrics.close()


def test_an_https_server_presents_the_checked_renewal_not_a_file_rewritten_since(
    tmp_path: Path,
) -> None:
    """The renewal was read and checked; the certificate file is then caught half written
    (the next renewal) when a client connects: the handshake presents the checked bytes
    rather than reading the file again (and failing, or presenting what no check saw)."""
    ca = DevCa.create(tmp_path / "ca")
    files = _served(ca, "alpha", tmp_path / "served")
    metrics = serve_metrics(CollectorRegistry(), 0, "127.0.0.1", files)
    assert ca.cert is not None and files.cert is not None
    client = ssl.create_default_context(cafile=ca.cert)

    def handshake(name: str) -> bool:
        return _verified_as(client, metrics.port, name)

    try:
        assert handshake("alpha")
        renewed = generation(files)
        _install(ca.issue("beta", local_names=False), files)
        assert generation(files) == renewed + 1  # checked and taken
        pem = files.cert.read_bytes()
        files.cert.write_bytes(pem[: len(pem) // 2])  # the next write, caught mid-way
        assert handshake("beta") and not handshake("alpha")
    finally:
        metrics.close()


def test_an_https_server_follows_a_renewed_metrics_client_ca(tmp_path: Path) -> None:
    """The scrapers' CA file replaced in place (a new scrapers' CA): the next scrape needs a
    certificate of the new CA, and one of the old is refused, without a restart."""
    ca = DevCa.create(tmp_path / "ca")
    old, new = (DevCa.create(tmp_path / n, stem=SCRAPER_CA) for n in ("old", "new"))
    client_ca = tmp_path / "scrapers.pem"
    shutil.copyfile(old.cert, client_ca)
    metrics = serve_metrics(CollectorRegistry(), 0, "127.0.0.1", ca.issue("server"), client_ca)

    def scrapes(scrapers: DevCa) -> bool:
        leaf = scrapers.issue_client("prometheus")
        assert leaf.cert and leaf.key and ca.cert
        client = ssl.create_default_context(cafile=ca.cert)
        client.load_cert_chain(leaf.cert, leaf.key)
        with socket.create_connection(("127.0.0.1", metrics.port), timeout=5) as raw:
            try:
                with client.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                    return tls.makefile("rb").readline().split()[1:2] == [b"200"]
            except (ssl.SSLError, ConnectionError):
                return False

    try:
        assert scrapes(old) and not scrapes(new)
        shutil.copyfile(new.cert, client_ca)
        assert scrapes(new) and not scrapes(old)
    finally:
        metrics.close()


def test_a_long_lived_channel_presents_the_renewed_client_certificate(tmp_path: Path) -> None:
    """The channel is made once; after its files are renewed with a leaf of a CA the server
    does not trust, its next call is refused: it presented the new files, not the old."""
    ca, other = DevCa.create(tmp_path / "ca"), DevCa.create(tmp_path / "other")
    server_files = ca.issue("server")
    client_files = _served(ca, "client", tmp_path / "client")

    async def body() -> None:
        server = await start_server([], tls=server_files)
        channel = client_channel(server.address, tls=client_files)
        stub = health_pb2_grpc.HealthStub(channel)  # made once, as services do
        request = health_pb2.HealthCheckRequest()
        try:
            await stub.Check(request, timeout=5)
            _install(ca.issue("client-renewed", local_names=False), client_files)
            await stub.Check(request, timeout=5)  # a new connection, the renewed leaf
            _install(other.issue("client-foreign"), client_files)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Check(request, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await channel.close()
            await server.stop(0)

    asyncio.run(body())


def test_a_replaced_channel_finishes_its_calls_and_closing_cuts_them_short(
    tmp_path: Path,
) -> None:
    """A stream open on the channel of before a renewal goes on (the old inner channel waits
    for it), and closing the RenewingChannel ends it within the grace it is given."""
    ca = DevCa.create(tmp_path / "ca")
    server_files = ca.issue("server")
    client_files = _served(ca, "client", tmp_path / "client")

    async def body() -> None:
        server = await start_server([], tls=server_files)
        channel = client_channel(server.address, tls=client_files)
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            watch = stub.Watch(health_pb2.HealthCheckRequest())  # a stream that stays open
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            _install(ca.issue("client-renewed", local_names=False), client_files)
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)  # the new channel
            assert not watch.done()  # the old channel still carries its stream
            start = asyncio.get_running_loop().time()
            await channel.close(0)
            assert asyncio.get_running_loop().time() - start < 5  # not the 60 s grace
            assert await watch.code() == grpc.StatusCode.CANCELLED
        finally:
            await server.stop(0)

    asyncio.run(body())
