"""wait_serving, as launchers call it: a service whose TLS handshake the launcher refuses is
reported as such at the deadline (it was "did not start serving in time", like a slow one)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from services.rpc.health_wait import NotServing, wait_serving
from services.rpc.server import start_server
from services.rpc.tls import TlsConfig, channel_credentials
from services.rpc.tls_dev_ca import DevCa


def test_a_refused_tls_handshake_is_named_at_the_deadline(tmp_path: Path) -> None:
    ca, other = DevCa.create(tmp_path / "ca"), DevCa.create(tmp_path / "other")

    async def body() -> NotServing:
        server = await start_server([], tls=ca.issue("localhost"))
        credentials = channel_credentials(TlsConfig(ca=other.cert))  # not the server's CA
        try:
            channel = grpc.secure_channel(f"localhost:{server.port}", credentials)
            with channel, pytest.raises(NotServing) as late:
                deadline = time.monotonic() + 0.5
                await asyncio.to_thread(wait_serving, channel, "router", deadline)
            return late.value
        finally:
            await server.stop(0)

    late = asyncio.run(body())
    assert str(late) == "router did not start serving in time"
    assert late.hint().startswith("; it refused the TLS handshake: UNAVAILABLE: ")
    assert "CERTIFICATE_VERIFY_FAILED" in late.hint() and "signed by the CA" in late.hint()


def test_a_service_not_listening_yet_gets_no_hint() -> None:
    with grpc.insecure_channel("127.0.0.1:1") as channel, pytest.raises(NotServing) as late:
        wait_serving(channel, "router", time.monotonic() + 0.3)
    assert late.value.last.startswith("UNAVAILABLE") and late.value.hint() == ""
