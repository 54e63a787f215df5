"""Opt-in (TANDEM_DOCKER_TESTS=1 and a Docker daemon): build the image, bring the whole
compose stack up, get a token from its Keycloak and call a gateway with it.

Slow (image build, Keycloak start): minutes, not seconds. Skipped, saying why, otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from services.stubs.tandem.v1 import inference_pb2, inference_pb2_grpc
from tests.deploy.conftest import ROOT

COMPOSE = ["docker", "compose", "-f", str(ROOT / "deploy" / "compose.yaml")]


def _why_not() -> str | None:
    if os.environ.get("TANDEM_DOCKER_TESTS") != "1":
        return "opt-in: set TANDEM_DOCKER_TESTS=1 (needs a Docker daemon; builds the image)"
    try:
        subprocess.run(["docker", "info"], capture_output=True, check=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"TANDEM_DOCKER_TESTS=1 but no Docker daemon answers `docker info`: {exc}"
    return None


@pytest.fixture(scope="module")
def stack() -> Iterator[None]:
    if reason := _why_not():
        pytest.skip(reason)
    subprocess.run([*COMPOSE, "build"], cwd=ROOT, check=True, timeout=3600)
    try:
        # --wait returns once every service with a healthcheck is healthy
        subprocess.run([*COMPOSE, "up", "-d", "--wait"], cwd=ROOT, check=True, timeout=900)
        yield
    finally:
        subprocess.run([*COMPOSE, "down", "-v"], cwd=ROOT, check=False, timeout=300)


def _token() -> str:
    form = urllib.parse.urlencode(
        {
            "grant_type": "password",
            "client_id": "tandem-cli",
            "username": "alice",
            "password": "alice-dev-password",
        }
    ).encode()
    url = "http://localhost:8080/realms/tandem/protocol/openid-connect/token"
    with urllib.request.urlopen(url, data=form, timeout=30) as reply:
        return json.load(reply)["access_token"]


@pytest.mark.slow
@pytest.mark.parametrize("port", [50050, 50052])  # both gateway replicas
def test_a_token_from_the_realm_gets_tokens_from_each_gateway(stack: None, port: int) -> None:
    token = _token()
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.GenerateRequest(
            model="tandem-tiny", prompt="Hello", max_tokens=8, temperature=0.0
        )
        replies = list(
            stub.Generate(request, metadata=(("authorization", f"Bearer {token}"),), timeout=120)
        )
    assert replies and replies[-1].finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
    assert sum(len(r.token_ids) for r in replies) == 8
