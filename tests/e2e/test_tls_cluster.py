"""TLS end to end: every hop mTLS in a real cluster, and `tandem up --tls` as a user runs it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from services.engine.sampling_params import SamplingParams
from services.launcher.local import LocalCluster, free_port
from services.rpc.server import client_channel
from services.rpc.tls import TlsConfig, client_ssl_context
from services.stubs.tandem.v1 import inference_pb2_grpc
from tests.e2e.client import UP_KEY, generate, request, wait_up
from tests.e2e.conftest import start_cluster
from tests.rpc.health import health_status

PROMPTS = [[7, 8, 9], list(range(100, 140))]


@pytest.fixture(scope="module", params=["grpc", "nixl"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tandem_home: Path
) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp(f"tls-{request.param}")
    c = start_cluster(tmp, prefill=1, decode=1, kv_transport=request.param, tls_dir=tmp / "tls")
    yield c
    c.stop()


def test_every_hop_is_mtls_and_tokens_match(cluster: LocalCluster, reference_engine) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [list(c.token_ids) for c in reference_engine.generate(PROMPTS, params)]

    async def serve() -> list:
        async with client_channel(cluster.router_address, tls=cluster.tls) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            return [await generate(stub, request(p, 12)) for p in PROMPTS]

    results = asyncio.run(serve())
    assert [r.tokens for r in results] == expected
    for r in results:
        # the KV crossed from prefill to decode: handshake (and reads) over mTLS
        assert r.final.serving.prefill_worker == "prefill-0"
        assert r.final.serving.kv_transport == cluster.config.kv_transport
        assert r.final.serving.kv_transfer_bytes > 0


def test_plaintext_and_unknown_clients_are_refused(cluster: LocalCluster, tmp_path: Path) -> None:
    from services.rpc.tls_dev_ca import DevCa

    assert cluster.tls is not None and cluster.tls.ca is not None
    stranger = DevCa.create(tmp_path / "stranger").issue("stranger")
    no_cert = TlsConfig(ca=cluster.tls.ca)
    foreign_cert = TlsConfig(stranger.cert, stranger.key, cluster.tls.ca)

    for child in cluster.children:  # router and both workers
        for tls in (None, no_cert, foreign_cert):
            assert asyncio.run(health_status(child.address, tls)) == grpc.StatusCode.UNAVAILABLE, (
                child.name,
                tls,
            )
        assert asyncio.run(health_status(child.address, cluster.tls)) == grpc.StatusCode.OK


CA = re.compile(r"--tls-ca (\S+)")


def test_up_tls_serves_the_gateway_over_tls(tmp_path: Path, tandem_home: Path) -> None:
    port, http_port, state = free_port(), free_port(), tmp_path / "state"
    up = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up", "--tls", "--prefill", "0",
         "--decode", "1", "--port", str(port), "--state-dir", str(state),
         "--kv-cache-gib", "0.25", "--http-port", str(http_port)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        line = wait_up(up)
        key, ca = UP_KEY.search(line), CA.search(line)
        assert key and ca, line
        secret, ca_path, target = key.group(1), Path(ca.group(1)), f"127.0.0.1:{port}"
        assert ca_path == state / "tls" / "ca.pem"

        cli = [sys.executable, "-m", "services.cli.main", "generate", "--target", target,
               "--prompt-token-ids", "5,6,7,8", "--max-tokens", "4", "--temperature", "0",
               "--ignore-eos", "--json"]  # fmt: skip
        env = {**os.environ, "TANDEM_API_KEY": secret}
        over_tls = subprocess.run(
            [*cli, "--tls-ca", str(ca_path)], capture_output=True, text=True, timeout=120, env=env
        )
        assert over_tls.returncode == 0, over_tls.stderr
        assert len(json.loads(over_tls.stdout)["token_ids"]) == 4
        # plaintext to a TLS port fails in the handshake, with the key or without
        plain = subprocess.run(cli, capture_output=True, text=True, timeout=120, env=env)
        assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr, plain.stderr

        # the OpenAI HTTP API is https with the same certificate
        assert f"https://127.0.0.1:{http_port}/v1" in line
        verify = client_ssl_context(TlsConfig(ca=ca_path))
        with httpx.Client(verify=verify) as http:
            client = openai.OpenAI(
                base_url=f"https://127.0.0.1:{http_port}/v1", api_key=secret, http_client=http
            )
            assert [m.id for m in client.models.list().data] == ["tandem-tiny"]
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA
            httpx.get(f"https://127.0.0.1:{http_port}/v1/models", timeout=10)
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    assert up.returncode == 0
    assert oct((state / "tls" / "gateway-key.pem").stat().st_mode & 0o777) == "0o600"
