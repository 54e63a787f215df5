"""A streamed request whose first token is slow (a long prompt's prefill, a queue): the event
stream opens after SSE_KEEPALIVE_S and carries a comment line that often until the first
token, so proxies that drop a connection silent for 60 s do not cut it; clients (the openai
SDK) ignore the comments. A failure after the stream opened is an error event."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import openai
import pytest

from services.gateway import openai_http
from tests.gateway.harness import DECODE, MODEL, PREFILL, Spec, stack, token, until
from tests.gateway.issuer import Issuer
from tests.router.fakes import Behaviour
from tests.router.harness import run

SLOW_PREFILL = (Spec("p1", PREFILL, behaviour=Behaviour(prefill_delay_s=0.7)), Spec("d1", DECODE))
BODY = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 4, "stream": True}


@pytest.fixture(autouse=True)
def quick_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_http, "SSE_KEEPALIVE_S", 0.2)


def _post(session: aiohttp.ClientSession, port: int, credential: str, body: dict) -> Any:
    """A /v1/completions request through the gateway's HTTP API (awaitable, or a context
    manager that closes the response)."""
    return session.post(
        f"http://127.0.0.1:{port}/v1/completions",
        json=body,
        headers={"authorization": f"Bearer {credential}"},
    )


async def _events(port: int, credential: str, body: dict) -> tuple[int, list[str]]:
    """The status and the stream's lines (blank ones left out)."""
    async with (
        aiohttp.ClientSession() as session,
        _post(session, port, credential, body) as response,
    ):
        lines = [line.decode().strip() async for line in response.content]
        return response.status, [line for line in lines if line]


def test_a_slow_first_token_keeps_the_stream_alive_and_the_sdk_reads_it(
    tmp_path: Path, issuer: Issuer
) -> None:
    async def body() -> None:
        store = f"sqlite:{tmp_path / 'gw.db'}"
        async with stack(tmp_path, store, issuer.url, workers=SLOW_PREFILL, http=True) as s:
            port, credential = s.gateway.http_port, token(issuer)
            status, lines = await _events(port, credential, BODY)
            assert status == 200
            comments = [line for line in lines if line.startswith(":")]
            assert 2 <= len(comments) <= 5 and set(comments) == {": waiting for the first token"}
            assert lines[: len(comments)] == comments  # all before the first chunk
            data = [json.loads(line[6:]) for line in lines[len(comments) : -1]]
            assert data[-1]["choices"][0]["finish_reason"] == "length"
            assert lines[-1] == "data: [DONE]"
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=credential)
            stream = await client.completions.create(
                model=MODEL, prompt=[5, 6, 7], max_tokens=4, stream=True
            )
            texts = [chunk.choices[0].text async for chunk in stream]
            assert "".join(texts) == "".join(d["choices"][0]["text"] for d in data)
            await client.close()

    run(body(), timeout=30)


def test_a_failure_after_the_stream_opened_is_an_error_event(
    tmp_path: Path, issuer: Issuer
) -> None:
    workers = (
        Spec("p1", PREFILL, behaviour=Behaviour(prefill_delay_s=0.7)),
        Spec("d1", DECODE, behaviour=Behaviour(fail_code=grpc.StatusCode.INVALID_ARGUMENT)),
    )

    async def body() -> None:
        store = f"sqlite:{tmp_path / 'gw.db'}"
        async with stack(tmp_path, store, issuer.url, workers=workers, http=True) as s:
            status, lines = await _events(s.gateway.http_port, token(issuer), BODY)
            assert status == 200 and lines[0] == ": waiting for the first token"
            error = json.loads(lines[-1].removeprefix("data: "))["error"]
            assert error["type"] and "data: [DONE]" not in lines

    run(body(), timeout=30)


def test_a_quick_refusal_keeps_its_http_status(tmp_path: Path, issuer: Issuer) -> None:
    async def body() -> None:
        store = f"sqlite:{tmp_path / 'gw.db'}"
        async with stack(tmp_path, store, issuer.url, workers=SLOW_PREFILL, http=True) as s:
            status, lines = await _events(s.gateway.http_port, "not-a-token", BODY)
            assert status == 401 and not any(line.startswith(":") for line in lines)

    run(body(), timeout=30)


def test_a_client_gone_while_waiting_is_settled_as_cancelled(
    tmp_path: Path, issuer: Issuer
) -> None:
    async def body() -> None:
        store = f"sqlite:{tmp_path / 'gw.db'}"
        async with stack(tmp_path, store, issuer.url, workers=SLOW_PREFILL, http=True) as s:
            async with aiohttp.ClientSession() as session:
                response = await _post(session, s.gateway.http_port, token(issuer), BODY)
                assert (await response.content.readline()).startswith(b": waiting")
                request_id = response.headers["x-request-id"]
                response.close()  # the client leaves before the first token
            await until(lambda: s.ledger.get(request_id) is not None)
            row = s.ledger.get(request_id)
            assert (row.outcome, row.completion_tokens) == ("cancelled", 0)

    run(body(), timeout=30)
