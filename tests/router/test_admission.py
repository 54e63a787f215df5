"""Requests the router refuses before any worker runs, and prompt tokenization."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc

from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import Tokenizer
from services.router.admission import TokenizerCache, sampling_params
from services.router.config import RouterConfig
from services.stubs.tandem.v1 import inference_pb2
from tests.router.fakes import CONTEXT, MODEL
from tests.router.harness import DECODE, FAST, PREFILL, cluster, run

INVALID = [
    ({"model": ""}, "model"),
    ({"prompt": "hi", "prompt_token_ids": [1]}, "prompt"),
    ({}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"seed": 2**63}, "seed"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"prompt_token_ids": [1, 4096]}, "prompt_token_ids"),
    ({"prompt_token_ids": list(range(CONTEXT))}, "prompt_token_ids"),
]


def test_invalid_requests_are_refused_naming_the_field() -> None:
    async def body() -> None:
        async with cluster() as c:
            decode = await c.add("d1", DECODE)
            for fields, name in INVALID:
                request: dict[str, Any] = {"prompt_token_ids": [1, 2, 3], **fields}
                if not fields:
                    del request["prompt_token_ids"]
                result = await c.generate(**request)
                assert result.code == grpc.StatusCode.INVALID_ARGUMENT, fields
                assert result.details.startswith(f"{name}:"), (fields, result.details)
                assert result.messages == []
            assert decode.calls == []

    run(body())


def test_unknown_model_is_not_found_and_empty_pools_are_unavailable() -> None:
    config = RouterConfig(heartbeat_interval_s=0.1, heartbeat_timeout_s=0.5)

    async def body() -> None:
        async with cluster(config) as c:
            # Just started (a restart, say): its workers may not have registered yet.
            result = await c.generate(prompt_token_ids=[1], model="nope")
            assert result.code == grpc.StatusCode.UNAVAILABLE
            assert "no worker has registered model 'nope' yet" in result.details
            assert "workers join within 0.5 s; retry" in result.details

            await asyncio.sleep(config.heartbeat_timeout_s)
            result = await c.generate(prompt_token_ids=[1], model="nope")
            assert result.code == grpc.StatusCode.NOT_FOUND
            assert "'nope' is not served here" in result.details

            prefill = await c.add("p1", PREFILL)  # a prefill pool but no decode pool
            result = await c.generate(prompt_token_ids=[1])
            assert result.code == grpc.StatusCode.UNAVAILABLE
            assert result.details == f"no decode worker left for model {MODEL!r}"
            assert prefill.calls == []
            # Behind the gateway this message reaches callers as it is: it must not name
            # the models served (was: "served models: ..."), which a caller may not see.
            result = await c.generate(prompt_token_ids=[1], model="nope")
            assert result.code == grpc.StatusCode.NOT_FOUND
            assert MODEL not in result.details and "ListModels lists" in result.details

            await prefill.stop_heartbeats()
            await _wait_for_no_workers(c)
            result = await c.generate(prompt_token_ids=[1])
            assert result.code == grpc.StatusCode.UNAVAILABLE
            assert "no worker serving model" in result.details

    run(body())


async def _wait_for_no_workers(c: Any) -> None:
    for _ in range(200):
        if not c.router.registry.workers():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the worker did not expire")


def test_text_prompts_are_tokenized_with_the_models_tokenizer(tiny_model_dir: Path) -> None:
    tokenizers = TokenizerCache(locate=lambda name: tiny_model_dir)
    text = "The quick brown fox"

    async def body() -> None:
        async with cluster(FAST, tokenizers) as c:
            prefill = await c.add("p1", PREFILL)
            await c.add("d1", DECODE)
            result = await c.generate(prompt=text, max_tokens=2)
            assert result.code == grpc.StatusCode.OK
            expected = Tokenizer.from_dir(tiny_model_dir).encode(text)
            sent = prefill.calls[0].request
            assert list(sent.prompt_token_ids) == expected and sent.prompt == ""
            assert result.final.usage.prompt_tokens == len(expected)

    run(body())


def test_text_the_context_cannot_hold_is_refused_before_it_is_tokenized() -> None:
    """64 bytes a token at most: a longer text cannot fit, and tokenizing megabytes took
    seconds. The router never even loads a tokenizer for these."""

    def no_tokenizer(name: str) -> Path:
        raise AssertionError("the router tried to tokenize it")

    too_long = "a" * (CONTEXT * 64 + 1)
    chat = [inference_pb2.ChatMessage(role="user", content=too_long[:-2]) for _ in range(2)]
    # a template may write the role out as it is: 15 MiB of role took 20 s to tokenize
    long_role = [inference_pb2.ChatMessage(role=too_long, content="x")]
    many = [inference_pb2.ChatMessage(role="user") for _ in range(CONTEXT + 1)]

    async def body() -> None:
        async with cluster(FAST, TokenizerCache(locate=no_tokenizer)) as c:
            await c.add("p1", PREFILL)
            await c.add("d1", DECODE)
            cases = (
                ({"prompt": too_long}, "prompt", CONTEXT * 64 + 1),
                ({"messages": chat}, "messages", 2 * (CONTEXT * 64 - 1 + len("user"))),
                ({"messages": long_role}, "messages", CONTEXT * 64 + 2),
            )
            for fields, field, size in cases:
                result = await c.generate(max_tokens=2, **fields)
                assert result.code == grpc.StatusCode.INVALID_ARGUMENT, field
                assert result.details.startswith(f"{field}: has {size} bytes of text"), field
            result = await c.generate(max_tokens=2, messages=many)
            assert result.code == grpc.StatusCode.INVALID_ARGUMENT
            assert result.details.startswith(f"messages: has {CONTEXT + 1} messages")

    run(body())


def test_a_model_the_router_cannot_load_a_tokenizer_for_fails_clearly() -> None:
    async def body() -> None:
        async with cluster() as c:  # default locate: "fake-model" is no directory
            await c.add("d1", DECODE)
            result = await c.generate(prompt="hello")
            assert result.code == grpc.StatusCode.NOT_FOUND
            assert "unknown model 'fake-model'" in result.details
            # Token ids need no tokenizer.
            assert (await c.generate(prompt_token_ids=[1], max_tokens=1)).code.name == "OK"

    run(body())


def test_unset_sampling_fields_take_the_protos_defaults() -> None:
    params = sampling_params(inference_pb2.GenerateRequest(prompt_token_ids=[1]))
    assert params == SamplingParams(max_tokens=16, min_tokens=0, temperature=1.0, top_p=1.0)
    explicit = inference_pb2.GenerateRequest(temperature=0.0, max_tokens=3, seed=5, stop=["x"])
    assert sampling_params(explicit) == SamplingParams(
        max_tokens=3, temperature=0.0, seed=5, stop=("x",)
    )
