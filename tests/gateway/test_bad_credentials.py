"""Every bad credential, sent through the real gateway over gRPC: UNAUTHENTICATED, exactly one
audit record (deny, with the reason) per request, no ledger row, and never the credential in
the record. The JWT forgeries are ``test_identity``'s (there at the verifier level)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from jwcrypto.jwk import JWK

from services.gateway.api_keys import ApiKeys
from services.gateway.audit import AuditEvent
from services.stubs.tandem.v1 import inference_pb2
from tests.gateway.harness import MODEL, Stack, stack, token
from tests.gateway.issuer import Issuer
from tests.gateway.test_identity import BAD
from tests.router.harness import run

PROMPT = [5, 6, 7]


async def _refused(s: Stack, credential: str | None) -> tuple[AuditEvent, str]:
    """Send one request; check the refusal; return its one new audit record and ErrorInfo."""
    before = len(s.audit())
    metadata = () if credential is None else (("authorization", f"Bearer {credential}"),)
    call = s.stubs[0].Generate(
        inference_pb2.GenerateRequest(model=MODEL, prompt_token_ids=PROMPT),
        metadata=metadata,
        timeout=10,
    )
    messages = []
    try:
        async for m in call:
            messages.append(m)
    except grpc.aio.AioRpcError:
        pass
    assert messages == []
    assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
    status = await rpc_status.aio.from_call(call)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    new = s.audit()[before:]
    assert len(new) == 1, new
    event = new[0]
    assert (event.decision, event.principal, event.team) == ("deny", "anonymous", "")
    assert event.reason.startswith("unauthenticated: ")
    assert event.prompt_tokens is None and event.completion_tokens is None
    if credential:  # never echoed, not even a JWT's signature
        assert credential not in event.reason
        signature = credential.split(".")[2] if credential.count(".") == 2 else ""
        assert not signature or signature not in event.reason
    return event, info.reason


def test_each_bad_credential_is_refused_and_audited_once(tmp_path: Path, issuer: Issuer) -> None:
    async def body() -> None:
        async with stack(tmp_path, f"sqlite:{tmp_path / 'gw.db'}", issuer.url) as s:
            ok = await s.generate(token(issuer), prompt_token_ids=PROMPT, max_tokens=2)
            assert ok.code == grpc.StatusCode.OK  # keys cached; each refusal is the token's
            keys = ApiKeys(s.gateway.store)
            revoked = keys.mint("ml", [MODEL])
            keys.revoke(revoked.key.key_id)
            live = keys.mint("ml", [MODEL])
            wrong_secret = live.secret[:-4] + ("aaaa" if live.secret[-4:] != "aaaa" else "bbbb")

            # a subject naming an API key's principal would read that key's usage as its own
            as_key = issuer.mint(sub=f"key:{live.key.key_id}", groups=["/ml"])
            cases: dict[str, tuple[str | None, str, str]] = {
                "missing": (None, "missing authorization metadata", "CREDENTIAL_MISSING"),
                "subject-as-key": (as_key, "which names API keys here", "CREDENTIAL_INVALID"),
                "revoked-api-key": (revoked.secret, "invalid API key", "CREDENTIAL_INVALID"),
                "wrong-secret-api-key": (wrong_secret, "invalid API key", "CREDENTIAL_INVALID"),
            }
            for name, (make, reason) in BAD.items():
                cases[name] = (make(issuer), reason, "CREDENTIAL_INVALID")
            assert {"alg-none", "hs256-public-key", "expired", "not-yet-valid", "wrong-issuer",
                    "wrong-audience", "azp-not-allowed", "id-token", "refresh-token", "tampered",
                    "unknown-kid", "garbage"} <= set(cases)  # fmt: skip
            for name, (credential, reason, info_reason) in cases.items():
                event, got = await _refused(s, credential)
                assert reason in event.reason, (name, event.reason)
                assert got == info_reason, name
            [total] = s.ledger.usage(0, 2**40, group_by=())
            assert total.requests == 1  # only the valid request: refusals leave no row
            assert len(s.audit()) == 1 + len(cases)  # the one allow, then one deny each

    run(body())


def test_a_flood_of_unknown_kids_costs_one_jwks_refetch(tmp_path: Path, issuer: Issuer) -> None:
    async def body() -> None:
        async with stack(tmp_path, f"sqlite:{tmp_path / 'gw.db'}", issuer.url) as s:
            ok = await s.generate(token(issuer), prompt_token_ids=PROMPT, max_tokens=2)
            assert ok.code == grpc.StatusCode.OK
            assert issuer.jwks_fetches == 1
            # GatewayConfig does not expose the cooldown (default 10 s): shorten it so the
            # flood below comes after it, as it would in production 10 s after start
            s.gateway._verifier.refetch_cooldown_s = 0.2
            await asyncio.sleep(0.25)
            stranger = JWK.generate(kty="RSA", size=2048)
            ghosts = [
                issuer.sign(issuer.claims(), key=stranger, kid=f"ghost-{n}") for n in range(40)
            ]
            replies = await asyncio.gather(
                *(s.generate(t, prompt_token_ids=PROMPT, max_tokens=2) for t in ghosts)
            )
            assert [r.code for r in replies] == [grpc.StatusCode.UNAUTHENTICATED] * 40
            assert issuer.jwks_fetches == 2  # one refetch for forty unknown kids
            denies = [e for e in s.audit() if e.decision == "deny"]
            assert len(denies) == 40
            assert all("unknown key" in e.reason for e in denies)

    run(body())
