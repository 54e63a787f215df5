"""The real Keycloak image with deploy/keycloak/realm.json in front of a real gateway.

Tokens come from Keycloak itself: a realm user's password grant through the public
`tandem-cli` client, and the `tandem-service` client's client-credentials grant. The
gateway must accept both (audience `tandem-gateway`, both clients allowed, teams from
the `groups` claim). Needs a Docker daemon (testcontainers); skipped, saying why, where
there is none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.gateway.server import GatewayConfig, start_gateway
from services.rpc.server import client_channel
from services.stubs.tandem.v1 import inference_pb2, inference_pb2_grpc
from tests.router.fakes import MODEL
from tests.router.harness import DECODE, PREFILL, cluster

REALM = Path(__file__).resolve().parents[2] / "deploy" / "keycloak" / "realm.json"
KEYCLOAK_IMAGE = "quay.io/keycloak/keycloak:26.4"  # as in deploy/compose.yaml


def _docker_unavailable() -> str | None:
    try:
        import docker

        docker.from_env().ping()
    except Exception as exc:
        return f"no Docker daemon reachable ({type(exc).__name__}: {exc})"
    return None


@pytest.fixture(scope="module")
def keycloak_url() -> Iterator[str]:
    if reason := _docker_unavailable():
        pytest.skip(reason)
    from testcontainers.community.keycloak import KeycloakContainer

    with KeycloakContainer(KEYCLOAK_IMAGE).with_realm_import_file(str(REALM)) as keycloak:
        yield keycloak.get_url().rstrip("/")


def _tokens(base_url: str) -> dict[str, str]:
    from keycloak import KeycloakOpenID

    person = KeycloakOpenID(server_url=base_url, realm_name="tandem", client_id="tandem-cli")
    service = KeycloakOpenID(
        server_url=base_url,
        realm_name="tandem",
        client_id="tandem-service",
        client_secret_key="tandem-service-dev-secret",  # realm.json's public dev secret
    )
    return {
        "alice": person.token("alice", "alice-dev-password")["access_token"],
        "service": service.token(grant_type="client_credentials")["access_token"],
    }


@pytest.mark.slow
def test_realm_tokens_are_accepted_by_a_real_gateway(keycloak_url: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(f'admin_role = "tandem-admin"\n[models."{MODEL}"]\nroles = ["tandem-user"]\n')
    tokens = _tokens(keycloak_url)

    async def body() -> None:
        async with cluster() as c:
            await c.add("p1", PREFILL)
            await c.add("d1", DECODE)
            gateway = await start_gateway(
                GatewayConfig(
                    router_address=c.router.address,
                    policy_path=policy,
                    store_url=f"sqlite:{tmp_path / 'gateway.db'}",
                    issuer_url=f"{keycloak_url}/realms/tandem",
                    audience="tandem-gateway",
                    allowed_clients=frozenset({"tandem-cli", "tandem-service"}),
                )
            )
            channel = client_channel(gateway.address)
            try:
                stub = inference_pb2_grpc.InferenceStub(channel)
                for who, token in tokens.items():
                    request = inference_pb2.GenerateRequest(
                        model=MODEL, prompt_token_ids=[5, 6, 7], max_tokens=4, temperature=0.0
                    )
                    metadata = (("authorization", f"Bearer {token}"),)
                    replies = [m async for m in stub.Generate(request, metadata=metadata)]
                    assert replies[-1].finish_reason, who
            finally:
                await channel.close()
                await gateway.stop(grace=0)

    asyncio.run(body())


def test_realm_tokens_carry_roles_and_teams(keycloak_url: str) -> None:
    from services.gateway.identity import OidcVerifier

    tokens = _tokens(keycloak_url)

    async def body() -> None:
        verifier = OidcVerifier(
            f"{keycloak_url}/realms/tandem",
            "tandem-gateway",
            frozenset({"tandem-cli", "tandem-service"}),
        )
        try:
            alice = await verifier.verify(tokens["alice"])
            service = await verifier.verify(tokens["service"])
        finally:
            verifier.close()
        assert alice.client_id == "tandem-cli" and alice.username == "alice"
        assert "tandem-user" in alice.roles and alice.teams == {"ml-research"}
        assert service.client_id == "tandem-service"
        assert "tandem-user" in service.roles and service.teams == {"platform"}

    asyncio.run(body())
