"""What a caller sends that no check has bounded yet must not reach the append-only audit
log or an error's metadata at the caller's chosen size: over gRPC, a refused caller's model
and request id are cut short in its record, and a model name too long to be one is
INVALID_ARGUMENT before authorization (whose refusal echoes it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import grpc
import pytest

from services.gateway import openai_http
from services.gateway import settler as settler_module
from services.gateway.pipeline import CLIENT_REQUEST_ID_MAX, MODEL_NAME_MAX, unchecked
from tests.gateway.harness import stack, token
from tests.gateway.issuer import Issuer
from tests.router.harness import run

HUGE = 1_000_000


def test_a_refused_callers_strings_are_cut_short_in_its_audit_record(
    tmp_path: Path, issuer: Issuer
) -> None:
    async def body() -> None:
        async with stack(tmp_path, f"sqlite:{tmp_path / 'gw.db'}", issuer.url) as s:
            reply = await s.generate(
                "not-a-credential", model="m" * HUGE, request_id="r" * HUGE, prompt_token_ids=[1]
            )
            assert reply.code == grpc.StatusCode.UNAUTHENTICATED
            [event] = s.audit()
            assert event.model == "m" * MODEL_NAME_MAX + f"...({HUGE} characters)"
            assert event.client_request_id == (
                "r" * CLIENT_REQUEST_ID_MAX + f"...({HUGE} characters)"
            )

    run(body())


def test_a_model_name_too_long_is_invalid_argument_before_authorization(
    tmp_path: Path, issuer: Issuer
) -> None:
    async def body() -> None:
        async with stack(tmp_path, f"sqlite:{tmp_path / 'gw.db'}", issuer.url) as s:
            reply = await s.generate(token(issuer), model="y" * 3000, prompt_token_ids=[1])
            # It was PERMISSION_DENIED up to a few thousand characters, then
            # RESOURCE_EXHAUSTED once the echo outgrew the status metadata.
            assert reply.code == grpc.StatusCode.INVALID_ARGUMENT
            assert reply.details.startswith("model: must be printable")
            assert s.audit() == []  # no policy decision was made

    run(body())


def test_unchecked_values_are_kept_when_short_and_escaped_when_cut() -> None:
    assert unchecked("llama-3", 8) == "llama-3"
    assert unchecked("a\nb", 8) == "a\\nb...(3 characters)"
    assert unchecked("é" * 10, 4) == "\\xe9...(10 characters)"


def test_slow_http_clients_are_cut_off(
    tmp_path: Path, issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection trickling its headers, and an authenticated request whose body never
    comes, each held a connection (a file descriptor) open for ever: the first is closed
    after IDLE_TIMEOUT_S, the second answered 408 after BODY_TIMEOUT_S and closed LINGER_S
    later."""
    monkeypatch.setattr(openai_http, "IDLE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(openai_http, "BODY_TIMEOUT_S", 0.5)
    monkeypatch.setattr(openai_http, "LINGER_S", 0.5)  # what is still read after the 408

    async def body() -> None:
        async with stack(tmp_path, f"sqlite:{tmp_path / 'gw.db'}", issuer.url, http=True) as s:
            port = s.gateway.http_port
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and no more
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the gateway
            writer.close()

            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head = (
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {token(issuer)}\r\nContent-Length: 1000\r\n\r\n"
            )
            writer.write(head.encode() + b'{"model": ')  # 10 of the 1,000 bytes promised
            answer = await asyncio.wait_for(reader.read(), 5)  # then the connection closes
            writer.close()
            assert answer.startswith(b"HTTP/1.1 408 ")
            assert b"did not arrive within 0.5 s" in answer

    run(body(), timeout=30)


def test_a_store_that_cannot_keep_up_makes_the_gateway_refuse_new_calls(
    tmp_path: Path, issuer: Issuer
) -> None:
    """A flood (unauthenticated calls write an audit record each) against a slow store:
    past the settler's bound new calls get UNAVAILABLE with RetryInfo, before anything
    would queue a record, instead of the queue growing without end in memory."""

    async def body() -> None:
        async with stack(tmp_path, f"sqlite:{tmp_path / 'gw.db'}", issuer.url, http=True) as s:
            settler = s.gateway.service.pipeline.settler
            settler.max_backlog = 0  # as if 50,000 records were waiting
            for credential in (token(issuer), "not-a-credential"):
                reply = await s.generate(credential, prompt_token_ids=[1], max_tokens=2)
                assert reply.code == grpc.StatusCode.UNAVAILABLE
                assert "usage store is not keeping up" in reply.details
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{s.gateway.http_port}/v1/models") as answer,
            ):
                assert (answer.status, answer.headers["Retry-After"]) == (503, "1")
            assert s.audit() == []  # no decision was made, nothing queued
            settler.max_backlog = settler_module.MAX_BACKLOG
            reply = await s.generate(token(issuer), prompt_token_ids=[1], max_tokens=2)
            assert reply.code == grpc.StatusCode.OK

    run(body())
