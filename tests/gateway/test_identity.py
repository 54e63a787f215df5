"""Keycloak access-token verification against a real (loopback) Keycloak-compatible issuer."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from jwcrypto.jwk import JWK
from keycloak import KeycloakOpenID
from keycloak.exceptions import KeycloakAuthenticationError

from services.engine.errors import TandemError
from services.gateway.auth import Authenticator
from services.gateway.identity import AuthenticationError, OidcVerifier, Principal
from tests.gateway.issuer import Issuer, ServiceClient, b64url

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = frozenset({"tandem-cli", "svc-batch"})


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    server = Issuer(
        clients={
            "svc-batch": ServiceClient(
                secret="s3cret",
                realm_roles=["default-roles-tandem", "model-user"],
                client_roles={"tandem-gateway": ["batch"], "account": ["view-profile"]},
                groups=["/data-eng"],
            )
        }
    )
    yield server
    server.close()


def verifier(issuer: Issuer, **kw: object) -> OidcVerifier:
    args: dict = {"audience": "tandem-gateway", "allowed_clients": CLIENTS, **kw}
    return OidcVerifier(issuer.url, **args)


def verify(v: OidcVerifier, token: str) -> Principal:
    return asyncio.run(v.verify(token))


def refused(v: OidcVerifier, token: str) -> str:
    with pytest.raises(AuthenticationError) as info:
        verify(v, token)
    message = str(info.value)
    assert token not in message
    if token.count(".") == 2 and token.split(".")[2]:
        assert token.split(".")[2] not in message
    return message


def test_a_valid_access_token_gives_the_principal_with_exact_roles_and_teams(
    issuer: Issuer,
) -> None:
    v = verifier(issuer)
    claims = issuer.claims(
        username="alice",
        realm_roles=["default-roles-tandem", "model-user"],
        client_roles={
            "tandem-cli": ["chat"],
            "tandem-gateway": ["gw-reader"],
            "account": ["manage-account"],
        },
        groups=["/ml-research", "/ops"],
    )
    principal = verify(v, issuer.sign(claims))
    assert principal == Principal(
        subject=claims["sub"],
        username="alice",
        client_id="tandem-cli",
        roles=frozenset({"default-roles-tandem", "model-user", "chat", "gw-reader"}),
        teams=frozenset({"ml-research", "ops"}),
        expires_at=float(claims["exp"]),
        client_granted=frozenset({"chat"}),  # tandem-cli's own: never an admin role
    )
    assert issuer.jwks_fetches == 1
    for _ in range(20):  # cached: no fetch per request
        verify(v, issuer.mint())
    assert issuer.jwks_fetches == 1


def test_audience_is_only_checked_when_configured(issuer: Issuer) -> None:
    token = issuer.mint(aud=None)
    assert "wrong audience" in refused(verifier(issuer), token)
    assert verify(verifier(issuer, audience=None), token).username == "alice"


def test_expiry_within_the_leeway_is_accepted(issuer: Issuer) -> None:
    v = verifier(issuer, leeway_s=30)
    assert verify(v, issuer.mint(lifetime_s=-10)).username == "alice"
    assert verify(v, issuer.mint(nbf=int(time.time()) + 10)).username == "alice"


def _none_alg(issuer: Issuer) -> str:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT", "kid": issuer.kid}).encode())
    return f"{header}.{b64url(json.dumps(issuer.claims()).encode())}."


def _hs256_with_public_key(issuer: Issuer) -> str:
    public_pem = issuer.key()[0].export_to_pem()  # public part, PEM bytes
    secret = JWK(kty="oct", k=b64url(public_pem))
    return issuer.sign(issuer.claims(), key=secret, alg="HS256", header={"kid": issuer.kid})


def _tampered(issuer: Issuer) -> str:
    head, payload, sig = issuer.mint(realm_roles=["model-user"]).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["realm_access"]["roles"].append("admin")
    return f"{head}.{b64url(json.dumps(claims).encode())}.{sig}"


def _foreign_key_real_kid(issuer: Issuer) -> str:
    stranger = JWK.generate(kty="RSA", size=2048)
    return issuer.sign(issuer.claims(), key=stranger, kid=issuer.kid)


def _with_header(issuer: Issuer, header: str) -> str:
    """A token whose header segment is ``header`` (JSON text), the rest a real token's."""
    _, payload, sig = issuer.mint().split(".")
    return f"{b64url(header.encode())}.{payload}.{sig}"


BAD: dict[str, tuple[Callable[[Issuer], str], str]] = {
    "garbage": (lambda i: "this-is-not-a-jwt", "malformed token"),
    "garbage-3-parts": (lambda i: "abc.def.ghi", "malformed token"),
    "alg-none": (_none_alg, "algorithm 'none' is not allowed"),
    "hs256-public-key": (_hs256_with_public_key, "algorithm 'HS256' is not allowed"),
    "expired": (lambda i: i.mint(lifetime_s=-120), "token expired"),
    "no-exp": (lambda i: i.mint(exp=None), "no expiry"),
    # a JSON reader as lax as Python's takes these; "now > Infinity" never expires
    "exp-infinity": (
        lambda i: i.sign({**i.claims(), "exp": float("inf")}),
        "claim 'exp' is not a finite number",
    ),
    "nbf-nan": (
        lambda i: i.sign({**i.claims(), "nbf": float("nan")}),
        "claim 'nbf' is not a finite number",
    ),
    "not-yet-valid": (lambda i: i.mint(nbf=int(time.time()) + 120), "not yet valid"),
    "wrong-issuer": (
        lambda i: i.mint(iss="http://127.0.0.1:1/realms/other"),
        "wrong issuer 'http://127.0.0.1:1/realms/other'",
    ),
    "wrong-audience": (lambda i: i.mint(aud=["account"]), "wrong audience"),
    "azp-not-allowed": (lambda i: i.mint(azp="evil-app"), "client (azp) 'evil-app' is not allowed"),
    "id-token": (lambda i: i.mint(typ="ID"), "not an access token (typ 'ID'"),
    "refresh-token": (lambda i: i.mint(typ="Refresh"), "not an access token (typ 'Refresh'"),
    "tampered": (_tampered, "bad signature"),
    "foreign-key": (_foreign_key_real_kid, "bad signature"),
    "unknown-kid": (
        lambda i: i.sign(i.claims(), key=JWK.generate(kty="RSA", size=2048), kid="ghost"),
        "unknown key",
    ),
    "no-kid": (lambda i: i.sign(i.claims(), header={"kid": None}), "names no key"),
    # Shapes a check might not foresee must be refusals, never an internal error.
    "alg-not-a-string": (
        lambda i: _with_header(i, json.dumps({"alg": ["RS256"], "kid": i.kid})),
        "algorithm ['RS256'] is not allowed",
    ),
    "header-nested-too-deep": (
        lambda i: _with_header(i, '{"alg": "RS256", "x": ' + "[" * 1200 + "]" * 1200 + "}"),
        "malformed token (header is not base64url JSON)",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tokens_are_refused_naming_the_reason(issuer: Issuer, case: str) -> None:
    make, reason = BAD[case]
    v = verifier(issuer)
    verify(v, issuer.mint())  # keys cached, so each refusal is about the token itself
    message = refused(v, make(issuer))
    assert message.startswith("invalid access token: ")
    assert reason in message


def test_authentication_error_is_unauthenticated() -> None:
    assert issubclass(AuthenticationError, TandemError)
    assert AuthenticationError.grpc_code == "UNAUTHENTICATED"


def test_a_flood_of_unknown_kids_refetches_once_and_rotation_then_works(issuer: Issuer) -> None:
    v = verifier(issuer, refetch_cooldown_s=0.5)
    verify(v, issuer.mint())
    assert issuer.jwks_fetches == 1
    stranger = JWK.generate(kty="RSA", size=2048)
    ghosts = [issuer.sign(issuer.claims(), key=stranger, kid=f"ghost-{n}") for n in range(50)]

    async def flood(tokens: list[str]) -> list[object]:
        return await asyncio.gather(*(v.verify(t) for t in tokens), return_exceptions=True)

    time.sleep(0.55)  # past the cooldown of the first fetch
    results = asyncio.run(flood(ghosts))
    assert all(isinstance(r, AuthenticationError) for r in results)
    assert issuer.jwks_fetches == 2  # one refetch for fifty unknown kids
    asyncio.run(flood(ghosts))
    assert issuer.jwks_fetches == 2  # within the cooldown: no fetch at all

    old_token = issuer.mint()
    new_kid = issuer.add_key(drop_old=True)
    time.sleep(0.55)
    fresh = [issuer.mint(username=f"user{n}") for n in range(20)]
    principals = asyncio.run(flood(fresh))
    assert [p.username for p in principals] == [f"user{n}" for n in range(20)]
    assert issuer.kid == new_kid
    assert issuer.jwks_fetches == 3
    assert "unknown key" in refused(v, old_token)  # the dropped key is gone from the set
    assert issuer.jwks_fetches == 3


def test_rotation_to_an_es256_key_works(issuer: Issuer) -> None:
    v = verifier(issuer, refetch_cooldown_s=0)
    verify(v, issuer.mint())
    issuer.add_key("EC")
    token = issuer.mint()
    assert json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))["alg"] == "ES256"
    assert verify(v, token).username == "alice"
    assert issuer.jwks_fetches == 2


def test_issuer_down_during_refetch_keeps_the_last_good_key_set(issuer: Issuer) -> None:
    v = verifier(issuer, refetch_cooldown_s=0)
    verify(v, issuer.mint())
    good = issuer.mint()
    ghost = issuer.sign(issuer.claims(), key=JWK.generate(kty="RSA", size=2048), kid="ghost")
    issuer.close()
    assert "unknown key" in refused(v, ghost)  # the refetch failed ...
    assert verify(v, good).username == "alice"  # ... and the old keys still verify
    assert v.fetches == 2


def test_no_key_set_at_all_fails_closed(issuer: Issuer) -> None:
    token = issuer.mint()
    issuer.close()
    v = verifier(issuer)
    assert "signing keys are unavailable" in refused(v, token)


def test_a_client_credentials_token_verifies_with_the_service_accounts_roles(
    issuer: Issuer,
) -> None:
    server = f"http://127.0.0.1:{issuer.port}/"
    client = KeycloakOpenID(
        server_url=server, realm_name="tandem", client_id="svc-batch", client_secret_key="s3cret"
    )
    assert client.well_known()["issuer"] == issuer.url
    token = client.token(grant_type="client_credentials")
    principal = verify(verifier(issuer), token["access_token"])
    assert principal.client_id == "svc-batch"
    assert principal.username == "service-account-svc-batch"
    assert principal.roles == frozenset({"default-roles-tandem", "model-user", "batch"})
    assert principal.teams == frozenset({"data-eng"})

    wrong = KeycloakOpenID(
        server_url=server, realm_name="tandem", client_id="svc-batch", client_secret_key="nope"
    )
    with pytest.raises(KeycloakAuthenticationError):
        wrong.token(grant_type="client_credentials")


def test_configuration_mistakes_are_refused_at_construction(issuer: Issuer) -> None:
    with pytest.raises(ValueError, match="realms/NAME"):
        OidcVerifier("http://127.0.0.1:1/not-a-realm", None, CLIENTS)
    with pytest.raises(ValueError, match="allowed_clients"):
        OidcVerifier(issuer.url, None, frozenset())
    with pytest.raises(ValueError, match="RS256/ES256"):
        OidcVerifier(issuer.url, None, CLIENTS, algorithms={"HS256"})


def test_the_gateway_identity_module_does_not_import_torch() -> None:
    code = "import sys, services.gateway.identity; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_a_verified_token_is_remembered_until_it_expires(issuer: Issuer) -> None:
    v = verifier(issuer, leeway_s=0)
    # exp is whole seconds (int(now) + lifetime): 2 s leaves at least 1 s to verify it in.
    token = issuer.mint(lifetime_s=2)
    assert verify(v, token).username == "alice"
    assert (verify(v, token).username, v.cache_hits) == ("alice", 1)
    time.sleep(2.1)
    assert "expired" in refused(v, token)  # remembered, but not past its exp
    assert v.cache_hits == 1


def test_a_key_dropped_from_the_realm_stops_remembered_tokens(issuer: Issuer) -> None:
    v = verifier(issuer, refetch_cooldown_s=0)
    token = issuer.mint()
    verify(v, token)
    issuer.add_key(drop_old=True)
    assert asyncio.run(v.refresh())  # the new key set replaces the remembered verdicts
    assert "unknown key" in refused(v, token)
    assert v.cache_hits == 0


def test_the_verified_cache_is_bounded(issuer: Issuer) -> None:
    v = verifier(issuer, verified_cache_size=2)
    first, second, third = (issuer.mint(username=f"user{n}") for n in range(3))
    for token in (first, second, third):
        verify(v, token)
    verify(v, third)
    assert v.cache_hits == 1
    verify(v, first)  # evicted (least recently used): verified again, not remembered
    assert v.cache_hits == 1


def test_the_admin_role_counts_from_the_realm_or_the_gateway_client_not_the_callers_own(
    issuer: Issuer,
) -> None:
    """Whoever administers an allowed client (a team's own chat front-end) can give its users
    that client's roles: one named like the policy's admin role made them gateway admins."""
    authenticator = Authenticator(verifier(issuer), None, admin_role="tandem-admin")

    def roles(**claims: object) -> frozenset[str]:
        token = issuer.sign(issuer.claims(**claims))
        who = asyncio.run(authenticator.authenticate([("authorization", f"Bearer {token}")]))
        return who.caller.roles

    own = roles(client_roles={"tandem-cli": ["tandem-admin", "chat"]})
    assert "tandem-admin" not in own and "chat" in own  # still opens what the policy lists
    assert "tandem-admin" in roles(realm_roles=["tandem-admin"])
    assert "tandem-admin" in roles(client_roles={"tandem-gateway": ["tandem-admin"]})
    both = roles(realm_roles=["tandem-admin"], client_roles={"tandem-cli": ["tandem-admin"]})
    assert "tandem-admin" in both  # granted by the realm as well
