"""The gateway end to end: test OIDC issuer, real router with fake workers, SQLite store."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.gateway.api_keys import ApiKeys
from services.gateway.audit import AuditLog
from services.gateway.ledger import Ledger
from services.gateway.server import Gateway, GatewayConfig, start_gateway
from services.gateway.settler import Settler
from services.rpc.server import client_channel
from services.stubs.tandem.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.gateway.harness import gateway_id
from tests.gateway.issuer import Issuer
from tests.gateway.mgmt import error_reason, field_violations
from tests.router.fakes import MODEL, expected_completion
from tests.router.harness import DECODE, PREFILL, cluster, run

PROMPT = [5, 6, 7, 8, 9]
POLICY = f"""
admin_role = "admin"

[models."{MODEL}"]
roles = ["model-user"]
teams = ["ml"]

[models.other]
roles = ["other-user"]
"""


@dataclass
class Stack:
    gateway: Gateway
    stub: inference_pb2_grpc.InferenceStub
    issuer: Issuer

    @property
    def ledger(self) -> Ledger:
        """The ledger once every finished call is written (after its end: settler.py)."""
        self.gateway.service.pipeline.settler.wait()
        return Ledger(self.gateway.store)

    def audit(self) -> list:
        self.gateway.service.pipeline.settler.wait()
        return [r.event for r in AuditLog(self.gateway.store).records()]

    async def generate(self, credential: str | None, **fields: object):  # type: ignore[no-untyped-def]
        fields.setdefault("model", MODEL)
        metadata = () if credential is None else (("authorization", f"Bearer {credential}"),)
        call = self.stub.Generate(
            inference_pb2.GenerateRequest(**fields), metadata=metadata, timeout=10
        )
        messages = []
        try:
            async for m in call:
                messages.append(m)
        except grpc.aio.AioRpcError:
            return messages, call
        return messages, call


@asynccontextmanager
async def stack(tmp_path: Path, issuer: Issuer, limits: str = "") -> AsyncIterator[Stack]:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY + limits)
    async with cluster() as c:
        await c.add("p1", PREFILL)
        await c.add("d1", DECODE)
        config = GatewayConfig(
            router_address=c.router.address,
            policy_path=policy,
            store_url=f"sqlite:{tmp_path / 'gateway.db'}",
            issuer_url=issuer.url,
        )
        gateway = await start_gateway(config)
        channel = client_channel(gateway.address)
        try:
            yield Stack(gateway, inference_pb2_grpc.InferenceStub(channel), issuer)
        finally:
            await channel.close()
            await gateway.stop(grace=0)


def test_token_streams_and_records_exact_usage(tmp_path: Path, issuer: Issuer) -> None:
    async def body() -> None:
        async with stack(tmp_path, issuer) as s:
            token = issuer.mint(realm_roles=["model-user"], groups=["/ml"], sub="ann")
            messages, call = await s.generate(
                token, prompt_token_ids=PROMPT, max_tokens=4, request_id="r1"
            )
            assert await call.code() == grpc.StatusCode.OK
            assert [t for m in messages for t in m.token_ids] == expected_completion(5, 4)
            finals = [m for m in messages if m.finish_reason]
            assert len(finals) == 1 and finals[0] is messages[-1]
            assert {m.request_id for m in messages} == {"r1"}  # the client's id, as it sent it
            minted = await gateway_id(call)
            assert minted != "r1" and s.ledger.get("r1") is None
            row = s.ledger.get(minted)
            assert row is not None
            assert (row.request_id, row.client_request_id) == (minted, "r1")
            assert (row.principal, row.team, row.model) == ("ann", "ml", MODEL)
            assert (row.prompt_tokens, row.completion_tokens, row.outcome) == (5, 4, "ok")
            assert s.ledger.find("ann", "r1") == (row,)
            assert s.ledger.find("bob", "r1") == ()  # scoped to the principal
            [event] = s.audit()
            assert (event.decision, event.reason, event.request_id) == ("allow", "ok", minted)
            assert event.client_request_id == "r1"
            assert (event.prompt_tokens, event.completion_tokens) == (5, 4)

    run(body())


def test_without_a_client_id_messages_carry_the_gateway_id(tmp_path: Path, issuer: Issuer) -> None:
    """What clients saw before the gateway minted its own ids: no id sent, the relayed
    messages carry the id the ledger and audit log use."""

    async def body() -> None:
        async with stack(tmp_path, issuer) as s:
            token = issuer.mint(realm_roles=["model-user"], groups=["/ml"], sub="ann")
            messages, call = await s.generate(token, prompt_token_ids=PROMPT, max_tokens=2)
            assert await call.code() == grpc.StatusCode.OK
            minted = await gateway_id(call)
            assert {m.request_id for m in messages} == {minted}
            row = s.ledger.get(minted)
            assert row is not None and row.client_request_id == ""
            [event] = s.audit()
            assert (event.request_id, event.client_request_id) == (minted, "")

    run(body())


def test_an_unusable_client_id_is_invalid_argument_naming_request_id(
    tmp_path: Path, issuer: Issuer
) -> None:
    """The client's id is stored and echoed on every message: bounded, printable ASCII."""

    async def body() -> None:
        async with stack(tmp_path, issuer) as s:
            token = issuer.mint(realm_roles=["model-user"], groups=["/ml"], sub="ann")
            for bad in ("x" * 513, "tab\there", "caf\u00e9"):
                messages, call = await s.generate(
                    token, prompt_token_ids=PROMPT, max_tokens=2, request_id=bad
                )
                assert messages == []
                assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
                status = await rpc_status.aio.from_call(call)
                assert field_violations(status) == ["request_id"]
            assert s.ledger.usage(0, 2**40) == ()  # nothing admitted, nothing metered

    run(body())


def test_missing_or_bad_token_is_unauthenticated_and_audited(
    tmp_path: Path, issuer: Issuer
) -> None:
    async def body() -> None:
        async with stack(tmp_path, issuer) as s:
            denied: list[str] = []
            for credential in (None, "not-a-jwt", issuer.mint(azp="someone-else")):
                messages, call = await s.generate(credential, prompt_token_ids=PROMPT)
                assert messages == []
                assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
                status = await rpc_status.aio.from_call(call)
                assert error_reason(status).startswith("CREDENTIAL_")
                denied.append(await gateway_id(call))  # refused calls get an id too
            events = s.audit()
            assert [e.decision for e in events] == ["deny"] * 3
            assert [e.request_id for e in events] == denied and len(set(denied)) == 3
            assert all(e.reason.startswith("unauthenticated") for e in events)
            assert s.ledger.usage(0, 2**40) == ()

    run(body())


def test_model_not_allowed_is_permission_denied(tmp_path: Path, issuer: Issuer) -> None:
    async def body() -> None:
        async with stack(tmp_path, issuer) as s:
            token = issuer.mint(realm_roles=["other-user"])
            _, call = await s.generate(token, prompt_token_ids=PROMPT)
            assert await call.code() == grpc.StatusCode.PERMISSION_DENIED
            [event] = s.audit()
            assert (event.decision, event.reason) == ("deny", "model not allowed")

    run(body())


def test_request_limit_is_resource_exhausted_with_quota_failure(
    tmp_path: Path, issuer: Issuer
) -> None:
    async def body() -> None:
        limits = "\n[limits.user]\nrequests_per_minute = 1\n"
        async with stack(tmp_path, issuer, limits) as s:
            token = issuer.mint(realm_roles=["model-user"], sub="bob")
            _, first = await s.generate(token, prompt_token_ids=PROMPT, max_tokens=2)
            assert await first.code() == grpc.StatusCode.OK
            _, second = await s.generate(token, prompt_token_ids=PROMPT, max_tokens=2)
            assert await second.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            status = await rpc_status.aio.from_call(second)
            assert status is not None
            failure = error_details_pb2.QuotaFailure()
            assert status.details[0].Unpack(failure)
            assert failure.violations[0].subject == "user:bob"
            assert [e.decision for e in s.audit()] == ["allow", "deny"]

    run(body())


def test_requests_the_router_refuses_as_the_callers_mistake_count_against_its_rate(
    tmp_path: Path, issuer: Issuer
) -> None:
    """The router did the work (tokenizing, checking) before refusing: refunded, a key at
    its requests-per-minute limit could send such requests without end (was: every one
    refunded, the limit never reached)."""

    async def body() -> None:
        limits = "\n[limits.user]\nrequests_per_minute = 2\n"
        async with stack(tmp_path, issuer, limits) as s:
            token = issuer.mint(realm_roles=["model-user"], sub="bob")
            for _ in range(2):
                _, bad = await s.generate(token, prompt_token_ids=PROMPT, temperature=-1.0)
                assert await bad.code() == grpc.StatusCode.INVALID_ARGUMENT
            _, third = await s.generate(token, prompt_token_ids=PROMPT, max_tokens=2)
            assert await third.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert [e.decision for e in s.audit()] == ["allow", "allow", "deny"]

    run(body())


def test_api_key_works_until_revoked(tmp_path: Path, issuer: Issuer) -> None:
    async def body() -> None:
        async with stack(tmp_path, issuer) as s:
            keys = ApiKeys(s.gateway.store)
            minted = keys.mint("ml", [MODEL])
            messages, call = await s.generate(
                minted.secret, prompt_token_ids=PROMPT, max_tokens=3, request_id="k1"
            )
            assert await call.code() == grpc.StatusCode.OK
            assert [t for m in messages for t in m.token_ids] == expected_completion(5, 3)
            row = s.ledger.get(await gateway_id(call))
            assert row is not None and row.key_id == minted.key.key_id
            assert s.ledger.find(f"key:{minted.key.key_id}", "k1") == (row,)
            assert (row.principal, row.team) == (f"key:{minted.key.key_id}", "ml")
            keys.revoke(minted.key.key_id)
            _, call = await s.generate(minted.secret, prompt_token_ids=PROMPT)
            assert await call.code() == grpc.StatusCode.UNAUTHENTICATED

    run(body())


def test_list_models_is_filtered_by_policy(tmp_path: Path, issuer: Issuer) -> None:
    async def body() -> None:
        async with stack(tmp_path, issuer) as s:
            for roles, expected in ((["model-user"], [MODEL]), (["other-user"], [])):
                token = issuer.mint(realm_roles=roles)
                reply = await s.stub.ListModels(
                    inference_pb2.ListModelsRequest(),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=10,
                )
                assert [m.id for m in reply.models] == expected
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await s.stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    run(body())


def test_a_caller_reads_its_usage_as_soon_as_its_call_ends(tmp_path: Path, issuer: Issuer) -> None:
    """The ledger is written after the call's status (settler.py); GetUsage on the same
    replica waits for those writes. A settler that would otherwise linger for a minute
    shows that the read waited for the write, not for time to pass."""

    async def body() -> None:
        async with stack(tmp_path, issuer) as s:
            pipeline = s.gateway.service.pipeline
            slow = Settler(pipeline.admission, pipeline.ledger, pipeline.audit, linger_s=60)
            pipeline.settler, old = slow, pipeline.settler
            old.close()
            token = issuer.mint(realm_roles=["model-user"], groups=["/ml"], sub="ann")
            async with client_channel(s.gateway.address) as channel:
                usage = admin_pb2_grpc.UsageServiceStub(channel)
                for n in (1, 2):
                    _, call = await s.generate(token, prompt_token_ids=PROMPT, max_tokens=3)
                    assert await call.code() == grpc.StatusCode.OK
                    reply = await usage.GetUsage(
                        admin_pb2.GetUsageRequest(month=time.strftime("%Y-%m", time.gmtime())),
                        metadata=(("authorization", f"Bearer {token}"),),
                        timeout=10,
                    )
                    assert [(r.requests, r.completion_tokens) for r in reply.rows] == [(n, 3 * n)]

    run(body())
