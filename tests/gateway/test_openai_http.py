"""The OpenAI HTTP API end to end, driven by the official ``openai`` SDK: real gateway (gRPC
and HTTP), real router with the fake workers, tandem-tiny's tokenizer for text and chat,
SQLite store, the test OIDC issuer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import grpc
import openai
import pytest

from services.engine.tiny import ensure_tiny_model
from services.engine.tokenizer import Tokenizer
from services.gateway.api_keys import ApiKeys
from services.gateway.audit import AuditEvent, AuditLog
from services.gateway.ledger import Ledger, UsageRecord
from services.gateway.pipeline import prompt_estimate
from services.gateway.server import Gateway, GatewayConfig, start_gateway
from services.gateway.store import open_store
from services.router.admission import TokenizerCache
from services.rpc.server import client_channel
from services.stubs.tandem.v1 import inference_pb2, inference_pb2_grpc
from tests.gateway.harness import gateway_id
from tests.gateway.issuer import Issuer
from tests.router.fakes import CONTEXT, MODEL, Behaviour, expected_completion, token_text
from tests.router.harness import DECODE, FAST, PREFILL, Cluster, cluster, run

PROMPT = [5, 6, 7, 8, 9]
GHOST = "ghost-model"  # allowed by the policy, served by nobody
POLICY = f"""
admin_role = "admin"

[models."{MODEL}"]
roles = ["model-user"]
teams = ["ml"]

[models."{GHOST}"]
teams = ["ml"]

[models.other]
roles = ["other-user"]
"""


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    server = Issuer()
    yield server
    server.close()


@dataclass
class Stack:
    gateway: Gateway
    cluster: Cluster
    issuer: Issuer
    tokenizer: Tokenizer
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}/v1"

    def client(self, api_key: str) -> openai.AsyncOpenAI:
        # No retries: a 429 or 503 must reach the test as it was sent.
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0)
        self.clients.append(client)
        return client

    def key(self, models: list[str] | None = None, **kwargs: object) -> str:
        minted = ApiKeys(self.gateway.store).mint("ml", models or [MODEL], **kwargs)
        return minted.secret

    def row(self, request_id: str) -> UsageRecord | None:
        self.gateway.service.pipeline.settler.wait()  # written after the call ends
        return Ledger(self.gateway.store).get(request_id)

    def rows(self) -> list[UsageRecord]:
        usage = Ledger(self.gateway.store)
        return [r for r in (usage.get(e.request_id) for e in self.audit()) if r is not None]

    def audit(self) -> list[AuditEvent]:
        self.gateway.service.pipeline.settler.wait()
        return [r.event for r in AuditLog(self.gateway.store).records()]


QUICK_GIVE_UP = replace(FAST, decode_wait_s=0.5)
"""A stream left without a decode worker ends in half a second, not the default ten: the
one such test here is about the 503 the client gets, not about waiting."""


@asynccontextmanager
async def stack(
    tmp_path: Path,
    issuer: Issuer,
    tiny: Path,
    limits: str = "",
    decode: Behaviour | None = None,
    cors_origins: tuple[str, ...] = (),
) -> AsyncIterator[Stack]:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY + limits)
    async with cluster(QUICK_GIVE_UP, TokenizerCache(locate=lambda name: tiny)) as c:
        await c.add("p1", PREFILL)
        await c.add("d1", DECODE, decode)
        config = GatewayConfig(
            router_address=c.router.address,
            policy_path=policy,
            store_url=f"sqlite:{tmp_path / 'gateway.db'}",
            issuer_url=issuer.url,
            http_port=0,
            cors_origins=cors_origins,
        )
        gateway = await start_gateway(config)
        s = Stack(gateway, c, issuer, Tokenizer.from_dir(tiny))
        try:
            yield s
        finally:
            for client in s.clients:
                await client.close()
            await gateway.stop(grace=0)


def _text(tokens: list[int]) -> str:
    return "".join(token_text(t) for t in tokens)


def _message(error: openai.APIStatusError) -> str:
    """The error's message as the server sent it (the SDK's ``message`` adds a prefix)."""
    assert isinstance(error.body, dict)
    return str(error.body["message"])


def _once(s: Stack, request_id: str) -> tuple[UsageRecord, AuditEvent]:
    """The request's one ledger row and its one audit record."""
    row = s.row(request_id)
    assert row is not None
    events = [e for e in s.audit() if e.request_id == request_id]
    assert len(events) == 1, events
    return row, events[0]


def test_models_lists_only_the_callers_models(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    async def body() -> None:
        async with stack(tmp_path, issuer, tiny_model_dir) as s:
            mine = s.client(s.key())
            models = await mine.models.list()
            assert [m.id for m in models.data] == [MODEL]
            card = await mine.models.retrieve(MODEL)
            assert card.id == MODEL and card.object == "model"
            with pytest.raises(openai.NotFoundError):
                await mine.models.retrieve("other")
            # A key for another model sees nothing the router serves.
            assert (await s.client(s.key(["other"])).models.list()).data == []
            token = issuer.mint(realm_roles=["model-user"])  # a Keycloak token works too
            assert [m.id for m in (await s.client(token).models.list()).data] == [MODEL]

    run(body())


def test_completion_from_token_ids_and_from_text(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    async def body() -> None:
        async with stack(tmp_path, issuer, tiny_model_dir) as s:
            client = s.client(s.key())
            raw = await client.completions.with_raw_response.create(
                model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, seed=3, stop=["zz"]
            )
            request_id = raw.headers["x-request-id"]
            reply = raw.parse()
            assert reply.id == f"cmpl-{request_id}" and reply.object == "text_completion"
            [choice] = reply.choices
            assert choice.text == _text(expected_completion(5, 4))
            assert choice.finish_reason == "length"
            assert reply.usage is not None
            assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (5, 4)
            assert reply.usage.total_tokens == 9
            row, event = _once(s, request_id)
            assert (row.prompt_tokens, row.completion_tokens, row.outcome) == (5, 4, "ok")
            assert (event.decision, event.reason) == ("allow", "ok")
            assert event.source.startswith("http:127.0.0.1:")

            text = "The quick brown fox"
            reply = await client.completions.create(model=MODEL, prompt=[text], max_tokens=2)
            assert reply.usage is not None
            assert reply.usage.prompt_tokens == len(s.tokenizer.encode(text))

    run(body())


def test_chat_completion_renders_the_template_and_meters_once(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    async def body() -> None:
        async with stack(tmp_path, issuer, tiny_model_dir) as s:
            token = issuer.mint(realm_roles=["model-user"], groups=["/ml"], sub="ann")
            raw = await s.client(token).chat.completions.with_raw_response.create(
                model=MODEL,
                messages=[
                    {"role": "developer", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                ],
                max_completion_tokens=3,
                n=1,
                user="end-user-7",
            )
            reply = raw.parse()
            prompt = s.tokenizer.encode("system: Be brief.\nuser: Hi\nassistant:")
            assert reply.object == "chat.completion"
            [choice] = reply.choices
            assert choice.message.role == "assistant"
            assert choice.message.content == _text(expected_completion(len(prompt), 3))
            assert reply.usage is not None
            assert reply.usage.prompt_tokens == len(prompt)
            row, event = _once(s, raw.headers["x-request-id"])
            assert (row.principal, row.team) == ("ann", "ml")
            assert (row.prompt_tokens, row.completion_tokens) == (len(prompt), 3)
            assert (event.prompt_tokens, event.completion_tokens) == (len(prompt), 3)

    run(body())


def test_a_chat_without_max_tokens_may_run_to_the_context_a_completion_stops_at_16(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    """OpenAI's defaults: a chat reply runs to the end of the context (front-ends rarely
    send a limit, and got 16-token replies), a legacy completion stops at 16."""

    async def body() -> None:
        async with stack(tmp_path, issuer, tiny_model_dir) as s:
            client = s.client(s.key())
            chat = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}]
            )
            completion = await client.completions.create(model=MODEL, prompt=PROMPT)
            sent = [call.request for call in s.cluster.workers["p1"].calls]
            assert [r.max_tokens if r.HasField("max_tokens") else None for r in sent] == [
                CONTEXT,  # the router's ListModels says 512; the engine stops at the context
                None,
            ]
            assert chat.usage is not None and chat.usage.completion_tokens == CONTEXT  # a fake
            assert completion.usage is not None and completion.usage.completion_tokens == 16

    run(body())


def test_a_chat_without_max_tokens_fits_a_token_limit_below_the_context(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    """A key allowed 300 tokens a minute on a 512-token model: the chat default reserved
    prompt + 512 and was refused on every call, however short the chat. It now runs up to
    what the limit can admit (prompt estimate + reply = the limit)."""

    async def body() -> None:
        async with stack(tmp_path, issuer, tiny_model_dir) as s:
            client = s.client(s.key(limits={"tokens_per_minute": 300}))
            chat = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}]
            )
            sent = s.cluster.workers["p1"].calls[0].request
            assert 0 < sent.max_tokens < 300 and chat.usage is not None
            estimate = prompt_estimate(
                inference_pb2.GenerateRequest(
                    model=MODEL, messages=[inference_pb2.ChatMessage(role="user", content="Hi")]
                )
            )
            assert sent.max_tokens == 300 - estimate

    run(body())


def test_no_reservation_exceeds_the_models_context(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    """max_tokens of 1,000 on a 512-token context, under a 600-token limit: the engine stops at
    the context, so the reservation is the context, and the call is served (it was a 429,
    insufficient_quota, that the SDK's retries and its billing hint made worse)."""

    async def body() -> None:
        async with stack(tmp_path, issuer, tiny_model_dir) as s:
            client = s.client(s.key(limits={"tokens_per_minute": 600}))
            await client.models.list()  # the gateway learns the contexts (kept 10 s)
            await until_cards(s, MODEL)
            completion = await client.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=1_000
            )
            assert completion.usage is not None and completion.usage.completion_tokens > 0

    run(body())


async def until_cards(s: Stack, model: str) -> None:
    """Until the gateway's model cards know ``model`` (a background refresh after a miss)."""
    cards = s.gateway.service.pipeline.cards
    for _ in range(500):
        if cards.cached(model):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the gateway never learned {model}'s context")


def test_streaming_sends_chunks_a_usage_chunk_and_done(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    async def body() -> None:
        async with stack(tmp_path, issuer, tiny_model_dir) as s:
            client = s.client(s.key())
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=4,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [c async for c in stream]
            prompt = len(s.tokenizer.encode("user: Hi\nassistant:"))
            assert chunks[0].choices[0].delta.role == "assistant"
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert content == _text(expected_completion(prompt, 4))
            finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
            assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
            assert chunks[-1].choices == [] and chunks[-1].usage is not None
            assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
                prompt,
                4,
            )
            assert len({c.id for c in chunks}) == 1
            request_id = chunks[0].id.removeprefix("chatcmpl-")
            row, _ = _once(s, request_id)
            assert (row.prompt_tokens, row.completion_tokens) == (prompt, 4)

            # Without include_usage, no usage chunk (as OpenAI); the raw stream ends [DONE].
            events = await _raw_events(
                s,
                "completions",
                s.key(),
                {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "stream": True},
            )
            assert events[-1] == "[DONE]"
            parsed = [json.loads(e) for e in events[:-1]]
            assert all(p["choices"] and p.get("usage") is None for p in parsed)
            assert "".join(p["choices"][0]["text"] for p in parsed) == _text(
                expected_completion(5, 2)
            )

    run(body())


async def _raw_events(s: Stack, route: str, key: str, payload: dict[str, object]) -> list[str]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{s.base_url}/{route}", json=payload, headers={"Authorization": f"Bearer {key}"}
        ) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        text = await response.text()
    assert all(part.startswith("data: ") for part in text.split("\n\n") if part)
    return [part.removeprefix("data: ") for part in text.split("\n\n") if part]


def test_credentials_and_model_refusals_are_401_and_403_and_audited(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    async def body() -> None:
        async with stack(tmp_path, issuer, tiny_model_dir) as s:
            for bad in ("not-a-key", "tdm_nope_nope", issuer.mint(azp="someone-else")):
                with pytest.raises(openai.AuthenticationError) as err:
                    await s.client(bad).completions.create(model=MODEL, prompt=PROMPT)
                assert err.value.code == "invalid_api_key"
            async with aiohttp.ClientSession() as http, http.get(f"{s.base_url}/models") as r:
                assert r.status == 401
                assert (await r.json())["error"]["type"] == "invalid_request_error"
            denied = s.audit()
            assert [e.decision for e in denied] == ["deny"] * 4
            assert all(e.reason.startswith("unauthenticated") for e in denied)

            with pytest.raises(openai.PermissionDeniedError) as err:
                await s.client(s.key(["other"])).chat.completions.create(
                    model="other", messages=[{"role": "user", "content": "x"}]
                )
            assert (err.value.code, err.value.param) == ("model_not_allowed", "model")
            assert (s.audit()[-1].decision, s.audit()[-1].reason) == ("deny", "model not allowed")
            assert s.rows() == []  # denials have no ledger row

    run(body())


def test_the_credential_is_checked_before_the_body_is_read(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    """A caller without a credential cannot make the gateway parse its body (a deeply nested
    one used to escape as a 500), and its audit record carries nothing the body said."""
    nested = "[" * 200_000
    named = json.dumps({"model": "m" * 5000, "prompt": "x"})

    async def body() -> None:
        async with stack(tmp_path, issuer, tiny_model_dir) as s, aiohttp.ClientSession() as http:
            url = f"{s.base_url}/completions"
            for sent in (nested, named):
                bad = {"Authorization": "Bearer not-a-key"}
                async with http.post(url, data=sent, headers=bad) as r:
                    assert r.status == 401
            assert [(e.decision, e.model) for e in s.audit()] == [("deny", "")] * 2
            good = {"Authorization": f"Bearer {s.key()}"}
            async with http.post(url, data=nested, headers=good) as r:
                assert r.status == 400
                assert "nests JSON too deeply" in (await r.json())["error"]["message"]
            async with http.post(url, data=named, headers=good) as r:
                assert r.status == 400  # checked before authorization, which echoes it
                error = (await r.json())["error"]
                assert (error["param"], len(error["message"]) < 200) == ("model", True)

    run(body())


def test_rate_limit_is_429_with_retry_after_and_quota_without(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    limits = "\n[limits.key]\nrequests_per_minute = 1\n\n[limits.team]\ntokens_per_month = 40\n"

    async def body() -> None:
        async with stack(tmp_path, issuer, tiny_model_dir, limits) as s:
            client = s.client(s.key())
            await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
            with pytest.raises(openai.RateLimitError) as err:
                await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
            assert err.value.code == "rate_limit_exceeded"
            # The one request weighs fully until the next minute starts, then fades over it.
            assert 60 <= int(err.value.response.headers["Retry-After"]) <= 120
            assert "requests_per_minute=1" in err.value.message

            # Another key of the same team: the team's monthly quota (7 used of 40) is next.
            with pytest.raises(openai.RateLimitError) as err:
                await s.client(s.key()).completions.create(
                    model=MODEL, prompt=PROMPT, max_tokens=30
                )
            assert err.value.code == "insufficient_quota"
            assert "Retry-After" not in err.value.response.headers
            reasons = [e.reason for e in s.audit()]
            assert reasons[0] == "ok"
            assert [r.startswith("limit exceeded") for r in reasons[1:]] == [True, True]
            assert len(s.rows()) == 1

    run(body())


def test_bad_input_is_400_naming_the_parameter_and_unknowns_are_404(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    async def body() -> None:
        async with stack(tmp_path, issuer, tiny_model_dir) as s:
            key = s.key([MODEL, GHOST])
            client = s.client(key)
            cases: list[tuple[dict[str, object], str]] = [
                ({"n": 2}, "n"),
                ({"temperature": -1}, "temperature"),  # checked by the router
                ({"max_tokens": 0}, "max_tokens"),
                ({"prompt": ["a", "b"]}, "prompt"),
                ({"logprobs": 2}, "logprobs"),
                ({"stop": 5}, "stop"),
            ]
            for fields, param in cases:
                request = {"model": MODEL, "prompt": PROMPT, **fields}
                with pytest.raises(openai.BadRequestError) as err:
                    await client.completions.create(**request)  # type: ignore[call-overload]
                assert err.value.param == param, (fields, err.value.message)
                assert _message(err.value).startswith(f"{param}:"), err.value.message
            with pytest.raises(openai.BadRequestError) as err:
                await client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "x"}],
                    max_completion_tokens=-1,
                )
            assert err.value.param == "max_completion_tokens"
            with pytest.raises(openai.BadRequestError) as err:
                await client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": [{"type": "image_url"}]}],  # type: ignore[list-item]
                )
            assert err.value.param == "messages[0].content[0]"

            # A router that has just started says UNAVAILABLE for a model it does not know
            # (its workers may be re-registering); NOT_FOUND only after that.
            while s.cluster.router.registry.settling_s() is not None:
                await asyncio.sleep(0.05)
            with pytest.raises(openai.NotFoundError) as err:
                await client.completions.create(model=GHOST, prompt=PROMPT)
            assert (err.value.code, err.value.param) == ("model_not_found", "model")

            headers = {"Authorization": f"Bearer {key}"}
            async with aiohttp.ClientSession(headers=headers) as http:
                huge = b'{"model": "m", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"
                for bad in (b"{nope", huge):  # Python refuses ints over 4,300 digits
                    async with http.post(f"{s.base_url}/completions", data=bad) as r:
                        assert r.status == 400, bad[:20]  # the big int was a plain-text 500
                        assert "not valid JSON" in (await r.json())["error"]["message"]
                # each was a 500 with a traceback in the log: an id protobuf's uint32 cannot
                # hold, and a lone surrogate escape (a front-end cutting inside an emoji)
                raw = (
                    (b'{"model": "%s", "prompt": [5, 4294967296]}', "completions", "prompt"),
                    (b'{"model": "%s", "prompt": "a\\ud83d"}', "completions", "prompt"),
                    (
                        b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud83d"}]}',
                        "chat/completions",
                        "messages[0].content",
                    ),
                    (
                        b'{"model": "%s", "prompt": "x", "stop": ["\\udc00"]}',
                        "completions",
                        "stop[0]",
                    ),
                )
                for data, path, param in raw:
                    async with http.post(f"{s.base_url}/{path}", data=data % MODEL.encode()) as r:
                        error = (await r.json())["error"]
                        assert (r.status, error["param"]) == (400, param), error
                async with http.post(f"{s.base_url}/embeddings", json={}) as r:
                    assert r.status == 404
                    assert (await r.json())["error"][
                        "message"
                    ] == "Invalid URL (POST /v1/embeddings)"

    run(body())


def test_a_client_that_disconnects_mid_stream_is_charged_what_was_produced(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    async def body() -> None:
        # The decode worker sends two tokens and then waits until it is cancelled.
        hang = Behaviour(hang_after=2)
        async with stack(tmp_path, issuer, tiny_model_dir, decode=hang) as s:
            client = s.client(s.key())
            stream = await client.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=50, stream=True
            )
            received = ""
            async for chunk in stream:
                received += chunk.choices[0].text
                if received == _text(expected_completion(5, 3)):  # prefill's token + 2
                    break
            request_id = chunk.id.removeprefix("cmpl-")
            await stream.close()
            await asyncio.wait_for(s.cluster.workers["d1"].cancelled.wait(), 5)
            for _ in range(100):  # the settle runs after the disconnect; audit comes last
                if any(e.request_id == request_id for e in s.audit()):
                    break
                await asyncio.sleep(0.05)
            row, event = _once(s, request_id)
            assert (row.prompt_tokens, row.completion_tokens, row.outcome) == (5, 3, "cancelled")
            assert (event.reason, event.completion_tokens) == ("cancelled", 3)

    run(body())


def test_a_client_request_id_header_is_kept_for_correlation(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    """``X-Client-Request-Id`` (OpenAI's header) lands in the ledger beside the gateway's
    id, twice when reused (it never keys metering); an unusable value is a 400."""

    async def body() -> None:
        async with stack(tmp_path, issuer, tiny_model_dir) as s:
            client = s.client(s.key())
            ids = []
            for _ in range(2):
                raw = await client.completions.with_raw_response.create(
                    model=MODEL, prompt=PROMPT, max_tokens=2,
                    extra_headers={"X-Client-Request-Id": "batch-7/item-1"},
                )  # fmt: skip
                ids.append(raw.headers["x-request-id"])
            rows = Ledger(s.gateway.store).find(s.row(ids[0]).principal, "batch-7/item-1")
            assert sorted(r.request_id for r in rows) == sorted(ids) and ids[0] != ids[1]
            assert all(r.completion_tokens == 2 for r in rows)
            with pytest.raises(openai.BadRequestError) as err:
                await client.completions.create(
                    model=MODEL, prompt=PROMPT, max_tokens=2,
                    extra_headers={"X-Client-Request-Id": "x" * 513},
                )  # fmt: skip
            assert "X-Client-Request-Id" in err.value.message

    run(body())


def test_a_text_prompt_cut_short_is_charged_its_tokenized_size_not_the_reservation(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    """Reserved: the byte bound (every token is at least a byte). Charged when the stream
    ends without a final message: the prompt size the router reported on its first
    message, i.e. what the tokenizer made of the text."""

    async def body() -> None:
        text = "The quick brown fox jumps over the lazy dog, twice."
        hang = Behaviour(hang_after=2)
        async with stack(tmp_path, issuer, tiny_model_dir, decode=hang) as s:
            tokenized = len(s.tokenizer.encode(text))  # as the router tokenizes it
            assert tokenized < len(text.encode())  # so charge and reservation differ
            stream = await s.client(s.key()).completions.create(
                model=MODEL, prompt=text, max_tokens=50, stream=True
            )
            received = ""
            async for chunk in stream:
                received += chunk.choices[0].text
                if received.count(" t") == 3:  # the prefill's token + 2, then it hangs
                    break
            request_id = chunk.id.removeprefix("cmpl-")
            await stream.close()
            await asyncio.wait_for(s.cluster.workers["d1"].cancelled.wait(), 5)
            for _ in range(100):
                if any(e.request_id == request_id for e in s.audit()):
                    break
                await asyncio.sleep(0.05)
            row, _ = _once(s, request_id)
            assert (row.prompt_tokens, row.completion_tokens, row.outcome) == (
                tokenized,
                3,
                "cancelled",
            )

    run(body())


def test_a_failure_mid_stream_ends_with_an_error_event_and_is_metered_once(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    async def body() -> None:
        # The decode worker sends two tokens, then a FINISH_REASON_ERROR and INTERNAL.
        failing = Behaviour(error_after=2)
        async with stack(tmp_path, issuer, tiny_model_dir, decode=failing) as s:
            key = s.key()
            events = await _raw_events(
                s,
                "chat/completions",
                key,
                {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True},
            )
            assert "[DONE]" not in events
            *chunks, last = [json.loads(e) for e in events]
            assert last["error"]["type"] == "server_error"
            assert "scripted engine failure" in last["error"]["message"]
            received = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            request_id = chunks[0]["id"].removeprefix("chatcmpl-")
            row, event = _once(s, request_id)
            assert row.outcome == "error" and event.decision == "allow"
            assert row.completion_tokens == received.count(" t") == 3  # prefill's + 2

            # Not streamed: the same failure is a plain 500 (INTERNAL), metered once too.
            with pytest.raises(openai.InternalServerError) as err:
                await s.client(key).completions.create(model=MODEL, prompt=PROMPT)
            assert err.value.status_code == 500
            request_id = err.value.response.headers["x-request-id"]
            row, _ = _once(s, request_id)
            assert (row.outcome, row.completion_tokens) == ("error", 3)

    run(body())


def test_grpc_clients_chat_through_the_gateway_too(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    async def body() -> None:
        async with stack(tmp_path, issuer, tiny_model_dir) as s:
            channel = client_channel(s.gateway.address)
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = inference_pb2.GenerateRequest(
                model=MODEL,
                messages=[inference_pb2.ChatMessage(role="user", content="Hi")],
                max_tokens=2,
                request_id="chat-1",
            )
            metadata = (("authorization", f"Bearer {s.key()}"),)
            try:
                call = stub.Generate(request, metadata=metadata, timeout=10)
                messages = [m async for m in call]
                request_id = await gateway_id(call)
            finally:
                await channel.close()
            prompt = len(s.tokenizer.encode("user: Hi\nassistant:"))
            assert messages[-1].usage.prompt_tokens == prompt
            assert {m.request_id for m in messages} == {"chat-1"}
            row, event = _once(s, request_id)
            assert (row.prompt_tokens, row.completion_tokens) == (prompt, 2)
            assert row.client_request_id == event.client_request_id == "chat-1"

    run(body())


def test_no_worker_left_is_503_and_wrong_methods_are_405(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    async def body() -> None:
        broken = Behaviour(fail_code=grpc.StatusCode.UNAVAILABLE)
        async with stack(tmp_path, issuer, tiny_model_dir, decode=broken) as s:
            key = s.key()
            with pytest.raises(openai.InternalServerError) as err:
                await s.client(key).completions.create(model=MODEL, prompt=PROMPT)
            assert err.value.status_code == 503
            assert _error_code(err.value) == "service_unavailable"
            row, _ = _once(s, err.value.response.headers["x-request-id"])
            # The prefill's token was produced before the decode failed: charged, as on gRPC,
            # although a non-streaming client never sees it.
            assert (row.outcome, row.prompt_tokens, row.completion_tokens) == ("error", 5, 1)
            async with aiohttp.ClientSession() as http, http.get(f"{s.base_url}/completions") as r:
                assert r.status == 405
                assert r.headers["Allow"] == "POST"  # RFC 9110: a 405 says what is allowed
                assert (await r.json())["error"]["type"] == "invalid_request_error"

    run(body())


def _error_code(error: openai.APIStatusError) -> object:
    assert isinstance(error.body, dict)
    return error.body["code"]


def test_a_draining_gateway_finishes_its_http_streams_and_stops_listening(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    async def body() -> None:
        slow = Behaviour(token_interval_s=0.05)  # 30 tokens: ~1.5 s
        async with stack(tmp_path, issuer, tiny_model_dir, decode=slow) as s:
            client = s.client(s.key())
            stream = await client.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=30, stream=True
            )
            text = ""
            async for chunk in stream:
                text += chunk.choices[0].text
                if len(text) >= 3:
                    break
            stopping = asyncio.create_task(s.gateway.stop())  # the drain timeout: 25 s
            await asyncio.sleep(0.1)
            with pytest.raises(openai.APIConnectionError):  # no longer listening
                await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
            async for chunk in stream:  # the stream in flight runs to its end
                text += chunk.choices[0].text
            assert text == _text(expected_completion(len(PROMPT), 30))
            await asyncio.wait_for(stopping, 10)
            request_id = chunk.id.removeprefix("cmpl-")
            with open_store(f"sqlite:{tmp_path / 'gateway.db'}") as store:  # stop() closed its
                row = Ledger(store).get(request_id)
            assert (row.completion_tokens, row.outcome) == (30, "ok")

    run(body())


# ---- CORS: off by default; for listed origins, preflights answered before authentication
# and every answer (SSE streams too) readable by the page.

PAGE = "https://chat.example.com"
PREFLIGHT = {
    "Origin": PAGE,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
}


def test_without_origins_there_are_no_cors_headers(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    async def body() -> None:
        async with stack(tmp_path, issuer, tiny_model_dir) as s, aiohttp.ClientSession() as http:
            url = f"{s.base_url}/chat/completions"
            async with http.options(url, headers=PREFLIGHT) as reply:
                assert reply.status == 405 and "Access-Control-Allow-Origin" not in reply.headers
            headers = {"Origin": PAGE, "Authorization": f"Bearer {s.key()}"}
            async with http.get(f"{s.base_url}/models", headers=headers) as reply:
                assert reply.status == 200 and "Access-Control-Allow-Origin" not in reply.headers

    run(body())


def test_a_listed_origin_gets_preflights_and_readable_answers(
    tmp_path: Path, issuer: Issuer, tiny_model_dir: Path
) -> None:
    async def body() -> None:
        async with (
            stack(tmp_path, issuer, tiny_model_dir, cors_origins=(PAGE,)) as s,
            aiohttp.ClientSession() as http,
        ):
            url = f"{s.base_url}/chat/completions"
            async with http.options(url, headers=PREFLIGHT) as reply:  # no credential
                assert reply.status == 204
                assert reply.headers["Access-Control-Allow-Origin"] == PAGE
                assert (
                    reply.headers["Access-Control-Allow-Headers"]
                    == PREFLIGHT["Access-Control-Request-Headers"]
                )
                assert "POST" in reply.headers["Access-Control-Allow-Methods"]
                assert "Access-Control-Allow-Credentials" not in reply.headers
            other = {**PREFLIGHT, "Origin": "https://evil.example"}
            async with http.options(url, headers=other) as reply:
                assert reply.status == 403 and "Access-Control-Allow-Origin" not in reply.headers
            headers = {"Origin": PAGE, "Authorization": f"Bearer {s.key()}"}
            chat = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2,
                "stream": True,
            }
            async with http.post(url, json=chat, headers=headers) as reply:  # SSE
                assert reply.status == 200
                assert reply.headers["Access-Control-Allow-Origin"] == PAGE
                assert "x-request-id" in reply.headers["Access-Control-Expose-Headers"]
                assert (await reply.text()).endswith("data: [DONE]\n\n")
            async with http.get(f"{s.base_url}/models", headers={"Origin": PAGE}) as reply:
                assert reply.status == 401  # refusals are readable too: the page shows why
                assert reply.headers["Access-Control-Allow-Origin"] == PAGE

    run(body())
