"""A small Keycloak-compatible OIDC issuer, served for real over HTTP on loopback.

Same URL layout as Keycloak (``/realms/NAME/.well-known/openid-configuration``,
``/realms/NAME/protocol/openid-connect/certs`` and ``.../token``), a JWKS with rotating keys
(plus an ``enc`` key, as Keycloak publishes), and RS256/ES256 tokens shaped like Keycloak's.
The token endpoint implements the client-credentials grant for configured confidential
clients. ``jwks_fetches`` counts requests to the certs endpoint.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote

from jwcrypto.jwk import JWK
from jwcrypto.jwt import JWT


@dataclass
class ServiceClient:
    """A confidential client with a service account (client-credentials grant)."""

    secret: str
    realm_roles: list[str] = field(default_factory=list)
    client_roles: dict[str, list[str]] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Issuer:
    """Start with ``Issuer()`` (serving at once); ``close()`` stops the server for good."""

    def __init__(
        self,
        realm: str = "tandem",
        audience: str = "tandem-gateway",
        clients: dict[str, ServiceClient] | None = None,
    ) -> None:
        self.realm = realm
        self.audience = audience
        self.clients = dict(clients or {})
        self.jwks_fetches = 0
        self.token_requests = 0
        self._lock = threading.Lock()
        self._keys: list[tuple[JWK, str]] = []  # (private key, alg), newest last
        self._enc_key = JWK.generate(kty="RSA", size=2048, kid=f"enc-{uuid.uuid4().hex[:8]}")
        self.add_key()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    # ---- keys ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/realms/{self.realm}"

    @property
    def kid(self) -> str:
        """The kid tokens are signed with by default (the newest key)."""
        return self._keys[-1][0]["kid"]

    def add_key(self, kty: str = "RSA", *, drop_old: bool = False) -> str:
        """Rotate: publish a new signing key (new kid), optionally dropping the old ones."""
        kid = uuid.uuid4().hex
        if kty == "RSA":
            key, alg = JWK.generate(kty="RSA", size=2048, kid=kid), "RS256"
        else:
            key, alg = JWK.generate(kty="EC", crv="P-256", kid=kid), "ES256"
        with self._lock:
            if drop_old:
                self._keys.clear()
            self._keys.append((key, alg))
        return kid

    def key(self, kid: str | None = None) -> tuple[JWK, str]:
        kid = kid or self.kid
        return next((k, a) for k, a in self._keys if k["kid"] == kid)

    def jwks(self) -> dict[str, Any]:
        with self._lock:
            keys = [
                {**k.export_public(as_dict=True), "use": "sig", "alg": a} for k, a in self._keys
            ]
        enc = {**self._enc_key.export_public(as_dict=True), "use": "enc", "alg": "RSA-OAEP"}
        return {"keys": [*keys, enc]}

    # ---- tokens --------------------------------------------------------------------------

    def claims(
        self,
        *,
        typ: str = "Bearer",
        azp: str = "tandem-cli",
        sub: str | None = None,
        username: str = "alice",
        realm_roles: list[str] | None = None,
        client_roles: dict[str, list[str]] | None = None,
        groups: list[str] | None = None,
        lifetime_s: float = 300,
        **overrides: Any,
    ) -> dict[str, Any]:
        """Claims shaped like a Keycloak access token (override or drop any with ``None``)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "exp": now + int(lifetime_s),
            "iat": now,
            "jti": str(uuid.uuid4()),
            "iss": self.url,
            "aud": [self.audience, "account"],
            "sub": sub or str(uuid.uuid5(uuid.NAMESPACE_URL, username)),
            "typ": typ,
            "azp": azp,
            "sid": str(uuid.uuid4()),
            "acr": "1",
            "allowed-origins": ["/*"],
            "realm_access": {
                "roles": realm_roles if realm_roles is not None else ["default-roles-tandem"]
            },
            "resource_access": {
                c: {"roles": r}
                for c, r in (client_roles or {"account": ["manage-account"]}).items()
            },
            "scope": "openid profile email",
            "email_verified": True,
            "preferred_username": username,
            "groups": groups if groups is not None else [],
        }
        for name, value in overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def sign(
        self,
        claims: dict[str, Any],
        *,
        kid: str | None = None,
        key: JWK | None = None,
        alg: str | None = None,
        header: dict[str, Any] | None = None,
    ) -> str:
        if key is None:
            key, own_alg = self.key(kid)
            alg = alg or own_alg
        alg = alg or "RS256"
        hdr = {"alg": alg, "typ": "JWT", "kid": kid or key.get("kid"), **(header or {})}
        token = JWT(header=hdr, claims=claims)
        token.make_signed_token(key)
        return token.serialize()

    def mint(self, **kw: Any) -> str:
        """A signed access token; keyword arguments go to :meth:`claims`."""
        return self.sign(self.claims(**kw))

    def client_credentials(self, client_id: str) -> dict[str, Any]:
        client = self.clients[client_id]
        claims = self.claims(
            azp=client_id,
            username=f"service-account-{client_id}",
            realm_roles=client.realm_roles,
            client_roles=client.client_roles,
            groups=client.groups,
            scope="profile email",
        )
        claims["client_id"] = client_id
        return {
            "access_token": self.sign(claims),
            "expires_in": 300,
            "refresh_expires_in": 0,
            "token_type": "Bearer",
            "not-before-policy": 0,
            "scope": "profile email",
        }

    # ---- HTTP ----------------------------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        oidc = f"{self.url}/protocol/openid-connect"
        return {
            "issuer": self.url,
            "authorization_endpoint": f"{oidc}/auth",
            "token_endpoint": f"{oidc}/token",
            "userinfo_endpoint": f"{oidc}/userinfo",
            "jwks_uri": f"{oidc}/certs",
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        }

    def _token_response(self, body: bytes, authorization: str | None) -> tuple[int, dict]:
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        client_id, secret = form.get("client_id"), form.get("client_secret")
        if authorization and authorization.lower().startswith("basic "):
            raw = base64.b64decode(authorization[6:]).decode()
            client_id, _, secret = raw.partition(":")
            client_id, secret = unquote(client_id), unquote(secret)
        if form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type"}
        client = self.clients.get(client_id or "")
        if client is None or secret != client.secret:
            return 401, {"error": "unauthorized_client", "error_description": "Invalid client"}
        return 200, self.client_credentials(client_id)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self
        base = f"/realms/{self.realm}"

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == f"{base}/.well-known/openid-configuration":
                    self._send(200, issuer.discovery())
                elif path == f"{base}/protocol/openid-connect/certs":
                    with issuer._lock:
                        issuer.jwks_fetches += 1
                    self._send(200, issuer.jwks())
                else:
                    self._send(404, {"error": "Realm does not exist"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.path.split("?")[0] != f"{base}/protocol/openid-connect/token":
                    self._send(404, {"error": "not found"})
                    return
                with issuer._lock:
                    issuer.token_requests += 1
                self._send(*issuer._token_response(body, self.headers.get("Authorization")))

        return Handler

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
