"""deploy/keycloak/realm.json agrees with the policy and the gateway's configuration."""

from __future__ import annotations

import json
import tomllib
from typing import Any

from services.gateway.server import GatewayConfig
from tests.deploy.conftest import DEPLOY

REALM: dict[str, Any] = json.loads((DEPLOY / "keycloak" / "realm.json").read_text())
POLICY = tomllib.loads((DEPLOY / "policy.example.toml").read_text())


def _client(client_id: str) -> dict[str, Any]:
    return next(c for c in REALM["clients"] if c["clientId"] == client_id)


def _mappers(client: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["protocolMapper"]: m["config"] for m in client["protocolMappers"]}


def test_realm_is_tandem() -> None:
    assert REALM["realm"] == "tandem" and REALM["enabled"]


def test_people_use_a_public_client_with_password_grant_for_dev() -> None:
    cli = _client("tandem-cli")
    assert cli["publicClient"] and cli["directAccessGrantsEnabled"]
    assert not cli.get("serviceAccountsEnabled")
    assert "tandem-cli" in GatewayConfig(router_address="", policy_path="", store_url="",
                                         issuer_url="").allowed_clients  # fmt: skip


def test_services_use_a_confidential_client_with_a_service_account() -> None:
    service = _client("tandem-service")
    assert not service["publicClient"] and service["serviceAccountsEnabled"]
    assert not service["directAccessGrantsEnabled"] and not service["standardFlowEnabled"]
    account = next(u for u in REALM["users"] if u.get("serviceAccountClientId") == "tandem-service")
    assert "tandem-user" in account["realmRoles"]


def test_tokens_carry_the_gateway_audience_and_groups() -> None:
    audience = GatewayConfig(router_address="", policy_path="", store_url="", issuer_url="")
    for client_id in ("tandem-cli", "tandem-service"):
        mappers = _mappers(_client(client_id))
        aud = mappers["oidc-audience-mapper"]
        assert aud["included.custom.audience"] == audience.audience == "tandem-gateway"
        assert aud["access.token.claim"] == "true"
        groups = mappers["oidc-group-membership-mapper"]
        assert groups["claim.name"] == "groups" and groups["access.token.claim"] == "true"


def test_policy_roles_and_teams_exist_in_the_realm() -> None:
    roles = {r["name"] for r in REALM["roles"]["realm"]}
    groups = {g["name"] for g in REALM["groups"]}
    assert POLICY["admin_role"] in roles
    for model in POLICY["models"].values():
        assert set(model["roles"]) <= roles
        assert set(model["teams"]) <= groups


def test_dev_users_can_log_in_and_have_teams() -> None:
    people = [u for u in REALM["users"] if "serviceAccountClientId" not in u]
    assert people
    for user in people:
        # Keycloak's user profile refuses a password login to an incomplete account.
        assert user["email"] and user["firstName"] and user["lastName"], user["username"]
        assert user["credentials"][0]["temporary"] is False
        assert user["groups"], user["username"]
