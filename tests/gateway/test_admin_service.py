"""tandem.v1.Admin on a real gateway: admin-only, audited, secrets shown once, clear errors."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import urllib.request
from pathlib import Path

import grpc

from services.gateway.api_keys import ApiKeys
from services.launcher.local import free_port
from services.stubs.tandem.v1 import admin_pb2
from tests.gateway.issuer import Issuer
from tests.gateway.mgmt import call, error_reason, field_violations, management


def test_admin_token_mints_lists_and_revokes(
    tmp_path: Path, store_url: str, issuer: Issuer
) -> None:
    async def body() -> None:
        async with management(tmp_path, store_url, issuer) as m:
            token = issuer.mint(realm_roles=["admin"], sub="root")
            request = admin_pb2.CreateApiKeyRequest(
                team="ml",
                models=["m1", "m2"],
                limits=admin_pb2.ApiKeyLimits(requests_per_minute=5),
                description="nightly eval",
            )
            created, code, _, _ = await call(m.admin.CreateApiKey, request, token)
            assert code == grpc.StatusCode.OK
            key = created.key
            assert created.secret.startswith(f"tdm_{key.key_id}_")
            assert (key.team, list(key.models), key.description) == (
                "ml",
                ["m1", "m2"],
                "nightly eval",
            )
            assert key.limits.requests_per_minute == 5 and not key.limits.HasField("tokens_per_day")
            assert key.created_by == "root" and not key.admin and not key.HasField("revoked_at")
            assert ApiKeys(m.store).authenticate(created.secret) is not None

            listed, code, _, _ = await call(
                m.admin.ListApiKeys, admin_pb2.ListApiKeysRequest(), token
            )
            assert code == grpc.StatusCode.OK
            assert [k.key_id for k in listed.keys] == [key.key_id]
            # The secret's random part may itself hold "_" (token_urlsafe): cut the prefix,
            # never split on the last "_" (that left a few characters, found by chance).
            secret_part = created.secret.removeprefix(f"tdm_{key.key_id}_")
            assert len(secret_part) >= 40
            assert secret_part.encode() not in listed.SerializeToString()

            revoked, code, _, _ = await call(
                m.admin.RevokeApiKey, admin_pb2.RevokeApiKeyRequest(key_id=key.key_id), token
            )
            assert code == grpc.StatusCode.OK and revoked.key.HasField("revoked_at")
            assert ApiKeys(m.store).authenticate(created.secret) is None

            events = m.audit()
            assert [e.reason.split(":")[0] for e in events] == [
                "CreateApiKey",
                "ListApiKeys",
                "RevokeApiKey",
            ]
            assert all(e.decision == "allow" and e.principal == "root" for e in events), events
            assert key.key_id in events[0].reason and events[0].team == "ml"
            assert all(secret_part not in repr(e) for e in events)

    asyncio.run(body())


def test_admin_api_key_may_administer_and_mint_admin_keys(tmp_path: Path, store_url: str) -> None:
    async def body() -> None:
        async with management(tmp_path, store_url) as m:
            admin = m.admin_key()
            request = admin_pb2.CreateApiKeyRequest(team="ops", models=["m1"], admin=True)
            created, code, _, _ = await call(m.admin.CreateApiKey, request, admin)
            assert code == grpc.StatusCode.OK and created.key.admin
            # the new admin key works for Admin in turn
            listed, code, _, _ = await call(
                m.admin.ListApiKeys, admin_pb2.ListApiKeysRequest(team="ops"), created.secret
            )
            assert code == grpc.StatusCode.OK and len(listed.keys) == 2

    asyncio.run(body())


def test_an_admin_key_mints_keys_only_for_its_own_models(
    tmp_path: Path, store_url: str, issuer: Issuer
) -> None:
    """A key scoped to some models is a delegation: it minted keys for any model (admin ones
    included). A person's admin token still mints any."""

    async def body() -> None:
        async with management(tmp_path, store_url, issuer) as m:
            scoped = ApiKeys(m.store).mint("ops", ["m1"], admin=True).secret
            request = admin_pb2.CreateApiKeyRequest(team="ops", models=["m1", "m2"], admin=True)
            _, code, status, message = await call(m.admin.CreateApiKey, request, scoped)
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert error_reason(status) == "KEY_SCOPE_EXCEEDED"
            assert "only for its own models (m1); not for m2" in message
            assert m.audit()[-1].decision == "deny"
            within = admin_pb2.CreateApiKeyRequest(team="ops", models=["m1"])
            _, code, _, _ = await call(m.admin.CreateApiKey, within, scoped)
            assert code == grpc.StatusCode.OK
            token = issuer.mint(realm_roles=["admin"], sub="root")
            _, code, _, _ = await call(m.admin.CreateApiKey, request, token)
            assert code == grpc.StatusCode.OK

    asyncio.run(body())


def test_non_admin_is_denied_and_audited(tmp_path: Path, store_url: str, issuer: Issuer) -> None:
    async def body() -> None:
        async with management(tmp_path, store_url, issuer) as m:
            plain_key = ApiKeys(m.store).mint("ml", ["m1"]).secret
            token = issuer.mint(realm_roles=["model-user"], sub="ann")
            requests = [
                (m.admin.CreateApiKey, admin_pb2.CreateApiKeyRequest(team="ml", models=["m1"])),
                (m.admin.ListApiKeys, admin_pb2.ListApiKeysRequest()),
                (m.admin.RevokeApiKey, admin_pb2.RevokeApiKeyRequest(key_id="0" * 16)),
            ]
            for credential in (plain_key, token):
                for method, request in requests:
                    _, code, status, message = await call(method, request, credential)
                    assert code == grpc.StatusCode.PERMISSION_DENIED
                    assert error_reason(status) == "ADMIN_ROLE_REQUIRED"
                    assert "requires the admin role 'admin'" in message
            events = m.audit()
            assert len(events) == 6 and all(e.decision == "deny" for e in events)
            assert len(ApiKeys(m.store).list()) == 1  # nothing minted

    asyncio.run(body())


def test_missing_or_bad_credentials_are_unauthenticated(tmp_path: Path, store_url: str) -> None:
    async def body() -> None:
        async with management(tmp_path, store_url) as m:  # no OIDC issuer configured
            request = admin_pb2.ListApiKeysRequest()
            _, code, status, _ = await call(m.admin.ListApiKeys, request, None)
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert error_reason(status) == "CREDENTIAL_MISSING"
            _, code, _, message = await call(m.admin.ListApiKeys, request, "tdm_" + "0" * 16 + "_x")
            assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid API key" in message
            jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
            _, code, status, message = await call(m.admin.ListApiKeys, request, jwt)
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert "OIDC is not configured" in message and jwt not in message
            assert [e.decision for e in m.audit()] == ["deny"] * 3

    asyncio.run(body())


def test_invalid_requests_name_every_bad_field(tmp_path: Path, store_url: str) -> None:
    async def body() -> None:
        async with management(tmp_path, store_url) as m:
            admin = m.admin_key()
            request = admin_pb2.CreateApiKeyRequest(
                team=" ",
                models=["m1", ""],
                limits=admin_pb2.ApiKeyLimits(tokens_per_day=0),
                description="x" * 201,
            )
            _, code, status, _ = await call(m.admin.CreateApiKey, request, admin)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert field_violations(status) == [
                "team",
                "models[1]",
                "limits.tokens_per_day",
                "description",
            ]
            request = admin_pb2.CreateApiKeyRequest(team="ml")
            _, code, status, _ = await call(m.admin.CreateApiKey, request, admin)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert field_violations(status) == ["models"]

            secret = ApiKeys(m.store).mint("ml", ["m1"]).secret
            bad_id = admin_pb2.RevokeApiKeyRequest(key_id=secret)  # a pasted secret
            _, code, status, message = await call(m.admin.RevokeApiKey, bad_id, admin)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert field_violations(status) == ["key_id"] and secret not in message
            # Each refusal left one record, naming the fields and never a value.
            reasons = [e.reason for e in m.audit() if e.decision == "deny"]
            assert reasons == [
                "CreateApiKey: invalid argument (description, limits.tokens_per_day, models[1], "
                "team)",
                "CreateApiKey: invalid argument (models)",
                "RevokeApiKey: invalid argument (key_id)",
            ]
            assert all(secret not in e.reason for e in m.audit())

            unknown = admin_pb2.RevokeApiKeyRequest(key_id="0123456789abcdef")
            _, code, _, message = await call(m.admin.RevokeApiKey, unknown, admin)
            assert code == grpc.StatusCode.NOT_FOUND and "0123456789abcdef" in message
            assert "not found" in m.audit()[-1].reason or "no API key" in m.audit()[-1].reason

    asyncio.run(body())


def test_metrics_port_serves_prometheus_and_stops(tmp_path: Path) -> None:
    port = free_port()

    async def body() -> None:
        async with management(tmp_path, f"sqlite:{tmp_path / 'g.db'}", metrics_port=port) as m:
            await call(m.admin.ListApiKeys, admin_pb2.ListApiKeysRequest(), None)  # a denial
            url = f"http://127.0.0.1:{port}/metrics"
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
            assert b"tandem_gateway_decisions_total" in text

    asyncio.run(body())
    # stopped with the gateway: nothing listens there any more
    with socket.socket() as s, contextlib.suppress(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
        raise AssertionError("/metrics still served after the gateway stopped")
