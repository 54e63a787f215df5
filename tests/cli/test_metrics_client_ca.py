"""$TANDEM_METRICS_CLIENT_CA reaches every service that serves /metrics, as
deploy/compose.tls.yaml sets it: with the files `tandem tls-dev-ca --scraper` mints and the
environment alone, the router's, a decode worker's and the gateway's /metrics take the
scraper's certificate and refuse a peer's, and their mTLS gRPC ports refuse the scraper's.
Real servers on loopback, configured by the commands' own flags-to-config functions."""

from __future__ import annotations

import asyncio
import ssl
import urllib.request
from pathlib import Path

import grpc
import pytest

from services.cli.main import build_parser, main
from services.launcher.local import free_port
from services.rpc.tls import TlsConfig
from tests.rpc.health import health_status

ROOT = Path(__file__).resolve().parents[2]
OPEN, REFUSED = "open", "refused"
DOORS = {"scraper /metrics": OPEN, "peer /metrics": REFUSED}
"""What a service with a metrics client CA lets each certificate reach."""
MTLS_DOORS = {**DOORS, "scraper gRPC": REFUSED, "peer gRPC": OPEN}
"""The same, for a service whose gRPC port requires client certificates (mTLS)."""


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    names = ["router", "decode-1", "gateway-1", "peer"]
    assert main(["tls-dev-ca", "--dir", str(tmp_path), *names, "--scraper", "prometheus"]) == 0
    return tmp_path


def _environment(monkeypatch: pytest.MonkeyPatch, tls_dir: Path, name: str) -> None:
    """The environment compose.tls.yaml gives service ``name``."""
    monkeypatch.setenv("TANDEM_TLS_CERT", str(tls_dir / f"{name}.pem"))
    monkeypatch.setenv("TANDEM_TLS_KEY", str(tls_dir / f"{name}-key.pem"))
    monkeypatch.setenv("TANDEM_TLS_CA", str(tls_dir / "ca.pem"))
    monkeypatch.setenv("TANDEM_METRICS_CLIENT_CA", str(tls_dir / "scraper-ca.pem"))


def _leaf(tls_dir: Path, name: str) -> TlsConfig:
    """``name``'s certificate, verifying servers with the services' CA."""
    return TlsConfig(tls_dir / f"{name}.pem", tls_dir / f"{name}-key.pem", tls_dir / "ca.pem")


def _scrape(port: int, leaf: TlsConfig, metric: str) -> str:
    assert leaf.ca and leaf.cert and leaf.key
    context = ssl.create_default_context(cafile=leaf.ca)
    context.load_cert_chain(leaf.cert, leaf.key)
    url = f"https://127.0.0.1:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as page:
            return OPEN if metric in page.read().decode() else "open, without " + metric
    except (OSError, ssl.SSLError):  # URLError and a reset are OSErrors
        return REFUSED


async def _doors(
    tls_dir: Path, metrics_port: int, metric: str, grpc_at: str | None
) -> dict[str, str]:
    """Which of /metrics (and the gRPC port at ``grpc_at``) each certificate opens."""
    seen: dict[str, str] = {}
    for who in ("scraper", "peer"):
        leaf = _leaf(tls_dir, "prometheus" if who == "scraper" else "peer")
        seen[f"{who} /metrics"] = await asyncio.to_thread(_scrape, metrics_port, leaf, metric)
        if grpc_at is not None:
            code = await health_status(grpc_at, leaf)
            seen[f"{who} gRPC"] = OPEN if code == grpc.StatusCode.OK else REFUSED
    return seen


def test_the_router(tls_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.cli.router import router_config
    from services.router.server import start_router

    _environment(monkeypatch, tls_dir, "router")
    port = free_port()
    config = router_config(
        build_parser().parse_args(["router", "--port", "0", "--metrics-port", str(port)])
    )

    async def body() -> dict[str, str]:
        router = await start_router(config)
        try:
            return await _doors(tls_dir, port, "tandem_requests_in_flight", router.address)
        finally:
            await router.stop(grace=0)

    assert asyncio.run(body()) == MTLS_DOORS


def test_a_decode_worker(
    tls_dir: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, engine_flags: list[str]
) -> None:
    from services.cli.tls_args import service_tls
    from services.cli.worker import worker_config
    from services.decode import server as decode_server
    from services.stubs.tandem.v1 import worker_pb2
    from services.worker.host import WorkerHost

    _environment(monkeypatch, tls_dir, "decode-1")
    port = free_port()
    argv = ["decode", "--model", str(tiny_model_dir), *engine_flags, "--metrics-port", str(port)]
    args = build_parser().parse_args([*argv, "--kv-transport", "grpc"])
    config = worker_config(args, tls=service_tls(args))

    async def body() -> dict[str, str]:
        host = WorkerHost(config, worker_pb2.WORKER_ROLE_DECODE)
        await host.start(decode_server._servicers)
        try:
            return await _doors(tls_dir, port, "tandem_kv_free_blocks", host.address)
        finally:
            await host.stop()

    assert asyncio.run(body()) == MTLS_DOORS


def test_the_gateway(tls_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's public port asks no client certificate (bearer tokens do): /metrics
    is the door the scrapers' CA guards there."""
    from services.cli.gateway import gateway_config
    from services.gateway.server import start_gateway

    _environment(monkeypatch, tls_dir, "gateway-1")
    port = free_port()
    policy = ROOT / "deploy" / "policy.example.toml"
    store = f"sqlite:{tls_dir / 'gateway.db'}"
    argv = ["gateway", "--port", "0", "--router", "127.0.0.1:1", "--policy", str(policy)]
    args = build_parser().parse_args([*argv, "--store", store, "--metrics-port", str(port)])
    config = gateway_config(args)

    async def body() -> dict[str, str]:
        gateway = await start_gateway(config)
        try:
            return await _doors(tls_dir, port, "tandem_gateway_requests", None)
        finally:
            await gateway.stop(0)

    assert asyncio.run(body()) == DOORS


def test_a_worker_whose_scrapers_ca_is_missing_stops_before_loading_its_model(
    tls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.cli.tls_args import service_tls
    from services.cli.worker import worker_config
    from services.decode import server as decode_server
    from services.rpc.tls import TlsError
    from services.stubs.tandem.v1 import worker_pb2
    from services.worker.host import WorkerHost

    _environment(monkeypatch, tls_dir, "decode-1")
    monkeypatch.setenv("TANDEM_METRICS_CLIENT_CA", str(tls_dir / "scrapers.pem"))
    args = build_parser().parse_args(["decode", "--metrics-port", str(free_port())])
    host = WorkerHost(worker_config(args, tls=service_tls(args)), worker_pb2.WORKER_ROLE_DECODE)
    with pytest.raises(TlsError, match=r"scrapers\.pem does not exist"):
        asyncio.run(host.start(decode_server._servicers))
    assert host.engine is None and host.server is None  # nothing loaded, nothing listening
