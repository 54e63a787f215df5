"""OpenAI request bodies → GenerateRequest: every mapped field, and refusals naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from services.gateway.openai_requests import BadRequest, parse_chat, parse_completion
from services.stubs.tandem.v1 import inference_pb2


def test_completion_fields_map_to_the_request() -> None:
    parsed = parse_completion(
        {
            "model": "m",
            "prompt": "hello",
            "max_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "seed": 11,
            "stop": "END",
            "n": 1,
            "user": "u-1",
            "top_k": 3,
            "min_tokens": 1,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "presence_penalty": 0,
            "echo": False,
            "something_new": 1,  # unknown fields are ignored
        }
    )
    request = parsed.generate
    assert (request.model, request.prompt, request.max_tokens) == ("m", "hello", 7)
    assert request.HasField("temperature") and request.temperature == 0.0
    assert (request.top_p, request.seed, list(request.stop)) == (0.5, 11, ["END"])
    assert (request.top_k, request.min_tokens, request.ignore_eos) == (3, 1, True)
    assert parsed.stream and parsed.include_usage and parsed.max_tokens_param == "max_tokens"


def test_unset_fields_stay_unset_so_the_servers_defaults_apply() -> None:
    request = parse_completion({"model": "m", "prompt": [1, 2]}).generate
    assert list(request.prompt_token_ids) == [1, 2]
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        assert not request.HasField(name), name


@pytest.mark.parametrize(
    ("prompt", "text", "ids"),
    [("a", "a", []), ([4, 5], "", [4, 5]), (["a"], "a", []), ([[4, 5]], "", [4, 5])],
)
def test_prompt_forms(prompt: Any, text: str, ids: list[int]) -> None:
    request = parse_completion({"model": "m", "prompt": prompt}).generate
    assert (request.prompt, list(request.prompt_token_ids)) == (text, ids)


def test_chat_messages_map_with_text_parts_and_the_developer_role() -> None:
    parsed = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "rules"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None},
            ],
            "max_completion_tokens": 5,
            "max_tokens": 99,
        }
    )
    assert [(m.role, m.content) for m in parsed.generate.messages] == [
        ("system", "rules"),
        ("user", "a\nb"),  # as vLLM joins text parts (was "ab": words ran together)
        ("assistant", ""),
    ]
    assert parsed.generate.max_tokens == 5
    assert parsed.max_tokens_param == "max_completion_tokens"
    assert isinstance(parsed.generate, inference_pb2.GenerateRequest)


COMPLETION_REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"model": ""}, "model"),
    ({"prompt": None}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": [1, 2**32]}, "prompt"),  # beyond protobuf's uint32
    ({"prompt": "a\ud83d"}, "prompt"),  # a lone surrogate: JSON allows it, UTF-8 cannot
    ({"model": "m\udc00"}, "model"),
    ({"stop": ["ok", "\ud83d"]}, "stop[1]"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"n": 3}, "n"),
    ({"n": True}, "n"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 2**40}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"seed": -1}, "seed"),
    ({"stop": ["a", 1]}, "stop"),
    ({"stop": ["s"] * 17}, "stop"),  # each is searched on every token of the engine's thread
    ({"stop": "x" * 1025}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"stream": False, "stream_options": {}}, "stream_options"),
    ({"user": 5}, "user"),
    ({"echo": True}, "echo"),
    ({"logprobs": 1}, "logprobs"),
    ({"logprobs": 0}, "logprobs"),  # the sampled token's logprob: not given, so refused
    ({"best_of": 2}, "best_of"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
]


@pytest.mark.parametrize(("fields", "param"), COMPLETION_REFUSALS)
def test_completion_refusals_name_the_parameter(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_completion({"model": "m", "prompt": "x", **fields})
    assert err.value.param == param
    assert str(err.value).startswith(f"{param}: ")


CHAT_REFUSALS: list[tuple[Any, str]] = [
    ([], "messages"),
    ("hi", "messages"),
    (["hi"], "messages[0]"),
    ([{"content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]"),
    ([{"role": "assistant", "tool_calls": [{"id": "1"}]}], "messages[0].tool_calls"),
    ([{"role": "user", "content": "\ud83d"}], "messages[0].content"),
    ([{"role": "user", "content": ""}] * 16_385, "messages"),  # parsed on the event loop
    ([{"role": "user\ud83d", "content": "x"}], "messages[0].role"),
    (
        [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}],
        "messages[0].content[0].text",
    ),
]


@pytest.mark.parametrize(("messages", "param"), CHAT_REFUSALS)
def test_chat_refusals_name_the_parameter(messages: Any, param: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_chat({"model": "m", "messages": messages})
    assert err.value.param == param


def test_sixteen_stop_strings_and_16384_messages_are_taken() -> None:
    parsed = parse_completion({"model": "m", "prompt": "x", "stop": ["s" * 1024] * 16})
    assert len(parsed.generate.stop) == 16
    chat = parse_chat({"model": "m", "messages": [{"role": "user", "content": ""}] * 16_384})
    assert len(chat.generate.messages) == 16_384


def test_chat_refuses_tools_and_a_non_object_body() -> None:
    with pytest.raises(BadRequest) as err:
        parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]})
    assert err.value.param == "tools"
    with pytest.raises(BadRequest) as err:
        parse_chat([1, 2])
    assert err.value.param is None and "JSON object" in str(err.value)


def test_vllms_top_k_off_is_taken_as_off() -> None:
    """Clients written for vLLM send top_k=-1 for "off"; the router refused it (negative)."""
    request = parse_completion({"model": "m", "prompt": "x", "top_k": -1}).generate
    assert request.HasField("top_k") and request.top_k == 0
    other = parse_completion({"model": "m", "prompt": "x", "top_k": -2}).generate
    assert other.top_k == -2  # passed on as it is: the router refuses it, naming top_k
