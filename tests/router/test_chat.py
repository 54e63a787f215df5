"""The router renders GenerateRequest.messages with the model's chat template and tokenizes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc

from services.engine.chat_template import load_chat_template
from services.engine.tokenizer import Tokenizer
from services.router.admission import TokenizerCache
from services.stubs.tandem.v1 import inference_pb2
from tests.router.harness import DECODE, FAST, PREFILL, cluster, run

TEMPLATE = (
    "{% for m in messages %}{{ bos_token }}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
    "{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)


def _chat(*pairs: tuple[str, str]) -> list[inference_pb2.ChatMessage]:
    return [inference_pb2.ChatMessage(role=r, content=c) for r, c in pairs]


def test_messages_use_the_plain_template_for_tandem_tiny(tiny_model_dir: Path) -> None:
    tokenizers = TokenizerCache(locate=lambda name: tiny_model_dir)

    async def body() -> None:
        async with cluster(FAST, tokenizers) as c:
            prefill = await c.add("p1", PREFILL)
            await c.add("d1", DECODE)
            messages = _chat(("system", "Be brief."), ("user", "Hi"))
            result = await c.generate(messages=messages, max_tokens=2)
            assert result.code == grpc.StatusCode.OK, result.details
            expected = Tokenizer.from_dir(tiny_model_dir).encode(
                "system: Be brief.\nuser: Hi\nassistant:"
            )
            sent = prefill.calls[0].request
            assert list(sent.prompt_token_ids) == expected
            assert len(sent.messages) == 0 and sent.prompt == ""  # workers get token ids only
            assert result.final.usage.prompt_tokens == len(expected)

    run(body())


def test_messages_use_the_models_own_template(tiny_model_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": TEMPLATE})
    )
    tokenizers = TokenizerCache(locate=lambda name: directory)

    async def body() -> None:
        async with cluster(FAST, tokenizers) as c:
            prefill = await c.add("p1", PREFILL)
            await c.add("d1", DECODE)
            result = await c.generate(messages=_chat(("user", "Hi")), max_tokens=1)
            assert result.code == grpc.StatusCode.OK, result.details
            text = load_chat_template(directory).render([("user", "Hi")])
            assert text == "<s>[user] Hi</s>[assistant]"
            tokenizer = Tokenizer.from_dir(directory)
            # One BOS, the template's: the tokenizer adds none on top.
            expected = tokenizer.encode(text, add_special_tokens=False)
            assert expected.count(tokenizer.bos_token_id) == 1
            assert list(prefill.calls[0].request.prompt_token_ids) == expected

            refused = await c.generate(messages=_chat(("user", "a"), ("tool", "b")))
            assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.details.startswith("messages: the model's chat template refuses")
            assert "no tools here" in refused.details

    run(body())


def test_messages_exclude_the_other_prompt_fields(tiny_model_dir: Path) -> None:
    tokenizers = TokenizerCache(locate=lambda name: tiny_model_dir)

    async def body() -> None:
        async with cluster(FAST, tokenizers) as c:
            decode = await c.add("d1", DECODE)
            chat = _chat(("user", "Hi"))
            for fields, prefix in (
                ({"messages": chat, "prompt": "x"}, "messages: set exactly one"),
                ({"messages": chat, "prompt_token_ids": [1]}, "messages: set exactly one"),
                ({"messages": _chat(("", "Hi"))}, "messages[0].role: is required"),
                ({}, "prompt: is empty; set prompt, prompt_token_ids or messages"),
            ):
                result = await c.generate(**fields)
                assert result.code == grpc.StatusCode.INVALID_ARGUMENT, fields
                assert result.details.startswith(prefix), result.details
            assert decode.calls == []

    run(body())
