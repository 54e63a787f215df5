"""tandem-health (deploy/grpc_health.py) against real servers: plaintext, and mTLS from the
same TANDEM_TLS_* environment the service reads its flags from."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from services.rpc.server import RunningServer, start_server
from services.rpc.tls import TlsConfig
from services.rpc.tls_dev_ca import DevCa
from tests.deploy.conftest import DEPLOY

PROBE = DEPLOY / "grpc_health.py"
"""Run as the image installs it (tandem-health): from deploy/ its own name would shadow the
grpc_health package it imports."""


@asynccontextmanager
async def serving(tls: TlsConfig | None) -> AsyncIterator[RunningServer]:
    server = await start_server([], tls=tls)
    try:
        yield server
    finally:
        await server.stop(0)


async def probe(address: str, env: dict[str, str], tmp_path: Path) -> int:
    installed = tmp_path / "bin" / "tandem-health"
    installed.parent.mkdir(exist_ok=True)
    installed.write_text(PROBE.read_text())
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_TLS_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(installed), address, env=clean | env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return await process.wait()


def test_plaintext_service_is_probed_in_plaintext(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(None) as server:
            assert await probe(server.address, {}, tmp_path) == 0

    asyncio.run(body())


def test_an_mtls_service_is_probed_with_the_containers_certificate(tmp_path: Path) -> None:
    ca = DevCa.create(tmp_path / "ca")
    server_tls, client = ca.issue("server"), ca.issue("client")
    env = {
        "TANDEM_TLS_CA": str(ca.cert),
        "TANDEM_TLS_CERT": str(client.cert),
        "TANDEM_TLS_KEY": str(client.key),
    }

    async def body() -> None:
        async with serving(server_tls) as server:
            assert await probe(server.address, env, tmp_path) == 0
            assert await probe(server.address, {}, tmp_path) == 1  # plaintext: refused
            no_cert = {"TANDEM_TLS_CA": str(ca.cert)}
            assert await probe(server.address, no_cert, tmp_path) == 1  # mTLS wants a certificate

    asyncio.run(body())
